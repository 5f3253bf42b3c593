"""The data layer on a real PostgreSQL server (several instances can share one database)."""

from __future__ import annotations

import threading

import pytest

from models import OAuthClient, User
from people import throttle
from store.vault import VaultError
from tests.helpers.app import make_app, stored_client

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_app(instance, pg_url):
    return make_app(instance, DATABASE_URL=pg_url)


def test_schema_is_created_and_secrets_round_trip(pg_app, pg_url):
    import psycopg2

    with pg_app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        client = stored_client(owner, "c", "pg-secret-value")
        assert OAuthClient.get_by_id(client.id).client_secret == "pg-secret-value"
    conn = psycopg2.connect(pg_url)
    with conn.cursor() as cur:
        cur.execute("select client_secret from o_auth_client")
        raw = bytes(cur.fetchone()[0])
    conn.close()
    assert b"pg-secret-value" not in raw


def test_moved_ciphertext_fails_on_postgres(pg_app):
    from store.db import Ciphertext

    with pg_app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        a = stored_client(owner, "a", "value-a")
        b = stored_client(owner, "b", "value-b")
        b.save()
        blob = bytes(OAuthClient.get_by_id(a.id).stored("client_secret") or b"")
        OAuthClient.update(client_secret=Ciphertext(blob)).where(OAuthClient.id == b.id).execute()
        with pytest.raises(VaultError):
            _ = OAuthClient.get_by_id(b.id).client_secret


def test_rotate_key_on_postgres(pg_app):
    with pg_app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        for i in range(3):
            stored_client(owner, f"c{i}", f"secret-{i}")
    result = pg_app.test_cli_runner().invoke(args=["rotate-key"])
    assert result.exit_code == 0, result.output
    with pg_app.app_context():
        assert sorted(c.client_secret for c in OAuthClient.select()) == [
            "secret-0",
            "secret-1",
            "secret-2",
        ]


def test_two_instances_share_one_database(instance, tmp_path, pg_url):
    import shutil

    first = make_app(instance, DATABASE_URL=pg_url)
    second_dir = tmp_path / "second"
    second_dir.mkdir(mode=0o700)
    shutil.copy(instance / "vault.key", second_dir / "vault.key")
    shutil.copy(instance / "secret_key", second_dir / "secret_key")
    with first.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        stored_client(owner, "c", "shared-value")
    second = make_app(second_dir, DATABASE_URL=pg_url)
    with second.app_context():
        assert OAuthClient.get().client_secret == "shared-value"


def test_throttle_counts_concurrent_failures_on_postgres(pg_app):
    key = throttle.Key("web:addr:x", throttle.Policy(limit=50, block_seconds=60))
    from store.db import database

    def fail() -> None:
        with database.connection_context():
            for _ in range(5):
                assert throttle.reserve([key]) == 0

    threads = [threading.Thread(target=fail) for _ in range(4)]
    with pg_app.app_context():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from models import Throttle

        assert Throttle.get_by_id("web:addr:x").failures == 20
