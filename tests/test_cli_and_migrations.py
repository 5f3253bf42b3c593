"""Migrations, the CLI commands and backups."""

from __future__ import annotations

import sqlite3

import migrations
from models import OAuthClient, User
from store.db import database, open_database, use_database
from tests.helpers.app import make_app, stored_client


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


def test_accounts_of_the_previous_schema_are_upgraded_in_place(instance):
    """Version 3 had no renewal state: the columns are added, and nothing is lost."""
    from mailboxes.mailbackend import AppBackend
    from models import Account, MailPassword
    from people.passwords import hash_password

    instance.mkdir(parents=True)
    path = instance / "auth-email.db"
    app = make_app(instance)  # keys, and today's schema
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        client = stored_client(owner, "c", "client-secret-value")
        client.imap_host, client.imap_port = "127.0.0.1", 993
        client.save()
        account = Account.create(owner=owner, address="box@example.test", provider="other",
                                 client=client, status="active")  # fmt: skip
        account.access_token, account.refresh_token = "access-value", "refresh-value"
        account.save()
        MailPassword.create(
            account=account, label="Laptop", password_hash=hash_password("mail-pw-1")
        )
    new = ["granted_scope", "refresh_failures", "refresh_failing_since", "next_refresh_at",
           "refresh_error_kind", "protocol_state"]  # fmt: skip
    with sqlite3.connect(path) as raw:  # back to version 3 as it shipped
        for column in new:
            raw.execute(f"ALTER TABLE account DROP COLUMN {column}")
        raw.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with sqlite3.connect(path) as raw:
        assert not {r[1] for r in raw.execute("PRAGMA table_info(account)")} & set(new)

    upgraded = make_app(instance)
    with upgraded.app_context():
        assert migrations.current_version() == migrations.LATEST
        stored = Account.get(Account.address == "box@example.test")
        assert (stored.access_token, stored.refresh_token) == ("access-value", "refresh-value")
        assert stored.refresh_failures == 0 and stored.granted_scope == ""
        assert stored.next_refresh_at is None and stored.protocol_state == ""
        grant = AppBackend(upgraded.config).authenticate(
            "imap", "box@example.test", "mail-pw-1", "127.0.0.1"
        )
        assert grant.account_id == stored.id
    with sqlite3.connect(path) as raw:
        assert set(new) <= {r[1] for r in raw.execute("PRAGMA table_info(account)")}


def test_a_version_3_database_gains_the_graph_delivery_columns_and_keeps_its_data(instance):
    """Schema 4 (SMTP through Microsoft Graph) upgrades a schema-3 database in place: the
    accounts, their encrypted tokens and the clients' secrets are all still there and readable."""
    import peewee as pw

    from models import Account
    from oauth import tokens

    app = make_app(instance)
    new_columns = {
        "account": [
            "smtp_delivery",
            "graph_access_token",
            "graph_token_expires_at",
            "smtp_auth_refused_at",
            "smtp_auth_refused_detail",
        ],
        "o_auth_client": ["smtp_delivery"],
    }
    with app.app_context():
        owner = User.create(email="old@example.org", password_hash="h")
        client = stored_client(owner, "old client", "the-secret")
        account = Account.create(owner=owner, address="box@example.org", provider="other",
                                 client=client, status="active")  # fmt: skip
        tokens.store_tokens(account, {"access_token": "at-1", "refresh_token": "rt-1"})
        # back to the schema that version 3 shipped: the new columns did not exist
        for table, columns in new_columns.items():
            for column in columns:
                database.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
        database.execute_sql("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        assert migrations.current_version() == 3
        with database.atomic():  # peewee cannot read a row missing a model column
            try:
                Account.get_by_id(account.id).smtp_delivery  # noqa: B018
            except pw.OperationalError:
                pass
            else:
                raise AssertionError("the column should be gone before the upgrade")

        assert migrations.migrate() == list(range(4, migrations.LATEST + 1))
        assert migrations.current_version() == migrations.LATEST
        for table, columns in new_columns.items():
            present = {c.name for c in database.get_columns(table)}
            assert set(columns) <= present
        kept = Account.get(Account.address == "box@example.org")
        assert kept.status == "active" and kept.owner.email == "old@example.org"
        assert kept.access_token == "at-1" and kept.refresh_token == "rt-1"
        assert kept.client.client_secret == "the-secret"
        assert kept.smtp_delivery == "" and kept.client.smtp_delivery == "smtp"
        assert kept.graph_access_token is None and kept.smtp_auth_refused_at is None
        assert migrations.migrate() == []  # applying again changes nothing
