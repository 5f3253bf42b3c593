"""Migration 8 upgrades a version 7 database in place: an address becomes unique per user while
its link is pending (and instance-wide only once linked), and nothing stored is lost."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee as pw
import pytest

import migrations
from mailboxes import mailbackend
from models import LINKED_ADDRESS_INDEX, Account, MailPassword, OAuthClient, User
from people.passwords import hash_password
from store.vault import Keyring, aad_for, write_private
from tests.helpers.app import make_app

NOW = "2026-11-20 10:00:00"


def account_row(db: sqlite3.Connection, ring: Keyring, **values: object) -> None:
    uid = str(values["uid"])
    row = {
        "client_id": 1, "provider": "other", "status": "active", "status_detail": "",
        "signed_in_as": "", "access_token": None, "refresh_token": None, "token_version": 3,
        "last_error": "", "granted_scope": "mail", "refresh_failures": 0,
        "refresh_error_kind": "", "protocol_state": "", "last_used_ip": "", "bytes_relayed": 42,
        "created_at": NOW, "smtp_delivery": "", "smtp_auth_refused_detail": "", **values,
    }  # fmt: skip
    for name in ("access_token", "refresh_token"):
        if row[name] is not None:
            row[name] = ring.seal(str(row[name]), aad_for("account", name, uid))
    names, marks = ", ".join(row), ", ".join("?" * len(row))
    db.execute(f"insert into account ({names}) values ({marks})", list(row.values()))


def test_a_version_7_database_is_upgraded_with_nothing_lost(instance: Path) -> None:
    instance.mkdir(parents=True, mode=0o700)
    ring = Keyring.generate()
    write_private(instance / "vault.key", ring.dump())
    db = sqlite3.connect(instance / "auth-email.db")
    db.executescript((Path(__file__).parent / "schema_v7.sql").read_text())
    secret = ring.seal("old-client-secret", aad_for("o_auth_client", "client_secret", "c" * 32))
    with db:
        db.execute("insert into meta values ('schema_version', '7')")
        for uid, email in ((1, "old@example.org"), (2, "other@example.org")):
            db.execute(
                "insert into user values (?, ?, ?, 0, 1, 1, 1, ?, null)",
                (uid, email, hash_password("old-web-password"), NOW),
            )
        db.execute(
            "insert into o_auth_client (id, uid, owner_id, name, provider, grant, tenant, "
            "authorize_url, token_url, device_url, revocation_url, scope, client_id, "
            "client_secret, credential, certificate, shared, imap_host, imap_port, "
            "imap_security, pop3_host, pop3_security, smtp_host, smtp_security, sasl_mechanism, "
            "smtp_delivery, created_at, updated_at) values (1, ?, 1, 'c', 'other', "
            "'client_credentials', '', '', 'https://t.example/token', '', '', 'mail', 'cid', ?, "
            "'secret', '', 0, 'imap.example.test', 993, 'tls', '', 'tls', '', 'starttls', "
            "'XOAUTH2', 'smtp', ?, ?)",
            ("c" * 32, secret, NOW, NOW),
        )
        account_row(db, ring, id=1, uid="a" * 32, owner_id=1, address="box@example.test",
                    access_token="old-access", refresh_token="old-refresh")  # fmt: skip
        account_row(db, ring, id=2, uid="b" * 32, owner_id=2, address="wait@example.test",
                    status="pending")  # fmt: skip
        db.execute(
            "insert into mail_password values (1, 1, 'Laptop', ?, null, ?, null, '')",
            (hash_password("old-mail-password"), NOW),
        )
    db.close()

    app = make_app(instance)

    with app.app_context():
        assert migrations.current_version() == migrations.LATEST
        box = Account.get_by_id(1)
        assert (box.owner_id, box.status, box.token_version, box.bytes_relayed) == (
            1, "active", 3, 42,
        )  # fmt: skip
        assert (box.access_token, box.refresh_token) == ("old-access", "old-refresh")
        assert Account.get_by_id(2).status == "pending"
        assert OAuthClient.get().client_secret == "old-client-secret"
        assert MailPassword.get().label == "Laptop"
        backend = mailbackend.AppBackend(app.config)
        grant = backend.authenticate("imap", "box@example.test", "old-mail-password", "192.0.2.1")
        backend.close()
        assert grant.account_id == 1  # the same mail password keeps working

        # The new rule: another user's placeholder for a linked address, but no second link.
        other = User.get_by_id(2)
        attempt = Account.create(owner=other, address="box@example.test", provider="other")
        with pytest.raises(pw.IntegrityError):
            Account.update(status="active").where(Account.id == attempt.id).execute()
        with pytest.raises(pw.IntegrityError):
            Account.create(owner=other, address="wait@example.test", provider="other")
        assert migrations.migrate() == []  # a second start applies nothing
    indexes = {
        name: sql
        for name, sql in sqlite3.connect(instance / "auth-email.db").execute(
            "select name, sql from sqlite_master where type = 'index' and tbl_name = 'account'"
        )
    }
    assert "account_address" not in indexes
    assert "UNIQUE" in indexes["account_owner_id_address"]
    assert "WHERE" in indexes[LINKED_ADDRESS_INDEX]
