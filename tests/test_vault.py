"""Encrypted storage: round trip, tampering, moved values, key rotation, raw file bytes."""

from __future__ import annotations

import os
import sqlite3
import stat

import peewee as pw
import pytest

from models import OAuthClient, User
from store.db import Ciphertext
from store.vault import KeyFileError, Keyring, VaultError, aad_for
from tests.helpers.app import make_app, stored_client

SECRET = "s3cr3t-Value~xyz-0123456789"


def _client(owner: User, name: str, secret: str = SECRET) -> OAuthClient:
    return stored_client(owner, name, secret)


@pytest.fixture
def owner(app):
    with app.app_context():
        yield User.create(email="o@example.org", password_hash="x")


def test_keyring_round_trip_and_tamper_detection():
    ring = Keyring.generate()
    aad = aad_for("t", "c", "row1")
    blob = ring.seal(SECRET, aad)
    assert SECRET.encode() not in blob
    assert ring.open(blob, aad) == SECRET
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(VaultError):
        ring.open(bytes(tampered), aad)
    with pytest.raises(VaultError):
        ring.open(blob, aad_for("t", "other_column", "row1"))
    with pytest.raises(VaultError):
        Keyring.generate().open(blob, aad)


def test_secret_field_round_trips_through_the_database(app, owner):
    with app.app_context():
        _client(owner, "one")
        again = OAuthClient.get(OAuthClient.name == "one")
        assert again.client_secret == SECRET
        raw = OAuthClient.select(OAuthClient.client_secret).tuples().get()[0]
        assert isinstance(raw, bytes) and SECRET.encode() not in raw


def test_value_moved_to_another_row_does_not_decrypt(app, owner):
    with app.app_context():
        first = _client(owner, "first")
        second = _client(owner, "second", "another-secret-value")
        blob = (
            OAuthClient.select(OAuthClient.client_secret)
            .where(OAuthClient.id == first.id)
            .tuples()
            .get()[0]
        )
        OAuthClient.update(client_secret=Ciphertext(blob)).where(
            OAuthClient.id == second.id
        ).execute()
        with pytest.raises(VaultError):
            _ = OAuthClient.get_by_id(second.id).client_secret
        assert OAuthClient.get_by_id(first.id).client_secret == SECRET


def test_plaintext_can_never_be_written_by_a_query(app, owner):
    with app.app_context():
        client = _client(owner, "q")
        with pytest.raises((TypeError, pw.InterfaceError)):
            OAuthClient.update(client_secret="plain").where(OAuthClient.id == client.id).execute()


def test_raw_sqlite_file_never_contains_a_secret(app, owner, instance):
    with app.app_context():
        _client(owner, "raw")
        from store.db import database

        database.execute_sql("PRAGMA wal_checkpoint(FULL)")
    for name in os.listdir(instance):
        data = (instance / name).read_bytes()
        assert SECRET.encode() not in data, name


def test_key_files_are_private(app, instance):
    for name in ("secret_key", "vault.key"):
        assert stat.S_IMODE((instance / name).stat().st_mode) == 0o600


def test_refuses_to_start_with_a_key_readable_by_others(app, instance):
    (instance / "vault.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        make_app(instance)


def test_refuses_to_replace_a_missing_key_over_existing_ciphertext(app, owner, instance):
    with app.app_context():
        _client(owner, "c")
    (instance / "vault.key").unlink()
    with pytest.raises(KeyFileError, match="Restore it from your backup"):
        make_app(instance)
    assert not (instance / "vault.key").exists()


def test_rotate_key_keeps_every_secret_readable(app, owner, instance):
    with app.app_context():
        ids = [_client(owner, f"c{i}", f"secret-{i}-value").id for i in range(3)]
        before = Keyring.loads((instance / "vault.key").read_text()).current
    result = app.test_cli_runner().invoke(args=["rotate-key"])
    assert result.exit_code == 0, result.output
    assert "Re-encrypted 3 secrets" in result.output
    ring = Keyring.loads((instance / "vault.key").read_text())
    assert ring.current != before and list(ring.keys) == [ring.current]
    fresh = make_app(instance)
    with fresh.app_context():
        for i, pk in enumerate(ids):
            client = OAuthClient.get_by_id(pk)
            assert client.client_secret == f"secret-{i}-value"
            assert Keyring.key_id_of(client.stored("client_secret") or b"") == ring.current
    db_path = instance / "auth-email.db"
    conn = sqlite3.connect(db_path)
    assert conn.execute("select count(*) from o_auth_client").fetchone()[0] == 3
    conn.close()


def test_rotate_key_refuses_while_the_service_runs(app, owner, instance):
    import os

    from store.vault import lock_instance

    with app.app_context():
        _client(owner, "running")
    before = (instance / "vault.key").read_text()
    held = lock_instance(instance)  # what serve.py holds while it runs
    assert held is not None
    try:
        result = app.test_cli_runner().invoke(args=["rotate-key"])
        assert result.exit_code != 0 and "Stop it first" in result.output
        assert (instance / "vault.key").read_text() == before
    finally:
        os.close(held)
    assert app.test_cli_runner().invoke(args=["rotate-key"]).exit_code == 0
