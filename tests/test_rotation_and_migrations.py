"""Key rotation that fails half-way or spans several instances, and schema migrations from every
earlier version, on SQLite and PostgreSQL, by two instances at once, and from a newer version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flask import Flask

import migrations
from models import AuditEvent, Meta, OAuthClient, Setting, User
from store.db import database, open_database, use_database
from store.vault import KeyFileError, Keyring
from tests.helpers.app import make_app, stored_client

ROOT = Path(__file__).resolve().parent.parent
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def database_url(kind: str, instance: Path, request: pytest.FixtureRequest) -> str:
    if kind == "postgres":
        return str(request.getfixturevalue("pg_url"))
    instance.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{instance / 'auth-email.db'}"


def secrets_of(app: Flask) -> list[str]:
    with app.app_context():
        return sorted(c.client_secret for c in OAuthClient.select())


def release_serving_lock(instance: Path) -> None:
    """rotate-key keeps the instance lock for the rest of its process (one command, one
    process); a test that runs the command twice in one process lets go of it in between."""
    lock = str(instance / "serving.lock")
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == lock:
                os.close(int(fd))
        except OSError:
            pass


# ---------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("kind", DATABASES)
def test_a_rotation_that_fails_midway_leaves_every_secret_readable(
    kind: str, instance: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies (here: an error) after re-encrypting some values: the transaction rolls
    back, and the key file, which already names the new key, still holds the old one."""
    app = make_app(instance, DATABASE_URL=database_url(kind, instance, request))
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        for i in range(3):
            stored_client(owner, f"c{i}", f"secret-{i}")
    before = Keyring.loads((instance / "vault.key").read_text())
    sealed: list[int] = []
    real_seal = Keyring.seal

    def seal_then_fail(self: Keyring, plaintext: str, aad: bytes) -> bytes:
        if len(sealed) == 2:
            raise OSError("the machine went down in the middle of the rotation")
        sealed.append(1)
        return real_seal(self, plaintext, aad)

    monkeypatch.setattr(Keyring, "seal", seal_then_fail)
    failed = app.test_cli_runner().invoke(args=["rotate-key"])
    monkeypatch.undo()

    assert failed.exit_code != 0 and len(sealed) == 2
    ring = Keyring.loads((instance / "vault.key").read_text())
    assert before.current in ring.keys and ring.current != before.current
    restarted = make_app(instance, DATABASE_URL=app.config["DATABASE_URL"])
    assert secrets_of(restarted) == ["secret-0", "secret-1", "secret-2"]

    release_serving_lock(instance)
    again = restarted.test_cli_runner().invoke(args=["rotate-key"])

    assert again.exit_code == 0, again.output
    done = Keyring.loads((instance / "vault.key").read_text())
    assert list(done.keys) == [done.current]
    after = make_app(instance, DATABASE_URL=app.config["DATABASE_URL"])
    assert secrets_of(after) == ["secret-0", "secret-1", "secret-2"]
    with after.app_context():
        event = AuditEvent.get(AuditEvent.action == "vault.key_rotated")
        assert (event.ip, event.detail) == ("cli", "3 values re-encrypted")


def test_a_new_key_still_reads_what_the_old_one_sealed() -> None:
    old = Keyring.generate()
    blob = old.seal("value", b"aad")
    both = old.with_new_key()
    assert both.current != old.current
    assert both.open(blob, b"aad") == "value"
    assert Keyring.loads(both.dump()).open(blob, b"aad") == "value"
    assert Keyring.key_id_of(both.seal("value", b"aad")) == both.current


@pytest.mark.postgres
def test_rotation_on_one_of_several_instances_sharing_postgres(
    instance: Path, tmp_path: Path, pg_url: str
) -> None:
    """Instances share the database and the key. After rotating on one, another that still has
    the old key refuses to start (instead of failing on every secret and writing new ones no
    one else can read) and says what to copy; with the new key it reads everything."""
    first = make_app(instance, DATABASE_URL=pg_url)
    second_dir = tmp_path / "second"
    second_dir.mkdir(mode=0o700)
    for name in ("vault.key", "secret_key"):
        shutil.copy(instance / name, second_dir / name)
    with first.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        stored_client(owner, "shared", "shared-secret")
    assert secrets_of(make_app(second_dir, DATABASE_URL=pg_url)) == ["shared-secret"]

    rotated = first.test_cli_runner().invoke(args=["rotate-key"])
    assert rotated.exit_code == 0, rotated.output

    with pytest.raises(KeyFileError, match="vault.key"):
        make_app(second_dir, DATABASE_URL=pg_url)
    shutil.copy(instance / "vault.key", second_dir / "vault.key")
    assert secrets_of(make_app(second_dir, DATABASE_URL=pg_url)) == ["shared-secret"]


# ---------------------------------------------------------------------------------- migrations


@pytest.mark.parametrize("kind", DATABASES)
@pytest.mark.parametrize("version", range(1, migrations.LATEST))
def test_a_database_at_each_earlier_version_is_upgraded_keeping_its_data(
    kind: str, version: int, instance: Path, request: pytest.FixtureRequest
) -> None:
    url = database_url(kind, instance, request)
    use_database(open_database(url))
    with database.connection_context():
        assert migrations.migrate(target=version) == list(range(1, version + 1))
        User.create(email="old@example.org", password_hash="h")
        Setting.create(key="allow_ropc", value="true")

    app = make_app(instance, DATABASE_URL=url)

    with app.app_context():
        assert migrations.current_version() == migrations.LATEST
        assert User.by_email("old@example.org") is not None
        assert Setting.get_by_id("allow_ropc").value == "true"
        owner = User.by_email("old@example.org")
        stored_client(owner, "after-upgrade", "works")  # the newer tables are usable
    assert secrets_of(app) == ["works"]
    again = make_app(instance, DATABASE_URL=url)  # a second start applies nothing
    with again.app_context():
        assert migrations.migrate() == []


@pytest.mark.parametrize("kind", DATABASES)
def test_a_database_newer_than_the_code_is_refused_clearly(
    kind: str, instance: Path, request: pytest.FixtureRequest
) -> None:
    url = database_url(kind, instance, request)
    app = make_app(instance, DATABASE_URL=url)
    with app.app_context():
        Meta.update(value=str(migrations.LATEST + 1)).where(Meta.key == "schema_version").execute()

    with pytest.raises(migrations.SchemaTooNew, match=f"version {migrations.LATEST + 1}"):
        make_app(instance, DATABASE_URL=url)

    use_database(open_database(url))
    with database.connection_context():  # untouched
        assert migrations.current_version() == migrations.LATEST + 1


STARTER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.helpers.app import make_app
    from pathlib import Path
    time.sleep(max(0.0, {start_at!r} - time.time()))
    make_app(Path(sys.argv[1]), DATABASE_URL={url!r})
    print("started")
    """
)


@pytest.mark.postgres
def test_two_instances_starting_at_once_on_an_empty_postgres_both_migrate_it(
    tmp_path: Path, pg_url: str
) -> None:
    folders = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir(mode=0o700)
        folders.append(folder)
    script = STARTER.format(root=str(ROOT), start_at=time.time() + 3, url=pg_url)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    outputs = [w.communicate(timeout=120) for w in workers]

    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0 and "started" in out, err[-3000:]
    use_database(open_database(pg_url))
    with database.connection_context():
        assert migrations.current_version() == migrations.LATEST
        assert OAuthClient.table_exists()
