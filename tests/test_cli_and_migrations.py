"""Migrations, the CLI commands and backups."""

from __future__ import annotations

import sqlite3

import migrations
from db import database, open_database, use_database
from models import OAuthClient, User
from tests.conftest import make_app, stored_client


def test_database_at_first_version_is_upgraded(instance):
    instance.mkdir(parents=True)
    path = instance / "auth-email.db"
    use_database(open_database(f"sqlite:///{path}"))
    with database.connection_context():
        assert migrations.migrate(target=1) == [1]
        User.create(email="old@example.org", password_hash="h")
        assert not OAuthClient.table_exists()
    app = make_app(instance)
    with app.app_context():
        assert migrations.current_version() == migrations.LATEST
        assert OAuthClient.table_exists()
        assert User.by_email("old@example.org") is not None
    tables = {r[0] for r in sqlite3.connect(path).execute("select name from sqlite_master")}
    assert {"account", "mail_password", "o_auth_client"} <= tables


def test_create_admin_from_the_command_line(app, runner):
    result = runner.invoke(
        args=["create-admin", "root@example.org", "--password-stdin"], input="a-long-password\n"
    )
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert User.by_email("root@example.org").is_admin
    again = runner.invoke(
        args=["create-admin", "x@example.org", "--password-stdin"], input="a-long-password\n"
    )
    assert again.exit_code != 0 and "already done" in again.output


def test_create_admin_refuses_a_short_password(app, runner):
    result = runner.invoke(
        args=["create-admin", "root@example.org", "--password-stdin"], input="short\n"
    )
    assert result.exit_code != 0 and "at least 10" in result.output


def test_backup_restores_into_a_fresh_instance_that_still_decrypts(app, runner, instance, tmp_path):
    import shutil

    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        stored_client(owner, "c", "backup-secret-value")
    copy = tmp_path / "backup.db"
    result = runner.invoke(args=["backup", str(copy)])
    assert result.exit_code == 0, result.output
    assert b"backup-secret-value" not in copy.read_bytes()
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    shutil.copy(copy, restored / "auth-email.db")
    shutil.copy(instance / "vault.key", restored / "vault.key")
    fresh = make_app(restored)
    with fresh.app_context():
        assert OAuthClient.get(OAuthClient.name == "c").client_secret == "backup-secret-value"
        assert User.by_email("o@example.org") is not None
