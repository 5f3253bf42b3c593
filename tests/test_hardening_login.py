"""Issue 12, logins: parallel guesses and the throttle, constant work for failed mail logins, and
migration 4 (the lookup digests) from a version 3 database."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailproxy import ProxyAuthError
from models import User
from tests.helpers.accounts import MAIL_PASSWORD
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.web import AuthActions

# ---- parallel guesses and the throttle ---------------------------------------------------------


class CountingVerify:
    """Wraps verify_password: counts calls, and makes each slow so that attempts overlap."""

    def __init__(self, real: Any, delay: float = 0.05) -> None:
        self.real = real
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, stored_hash: str | None, password: str) -> bool:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return bool(self.real(stored_hash, password))


def _in_parallel(count: int, attempt: Any) -> list[Any]:
    barrier = threading.Barrier(count)
    results: list[Any] = []

    def run(i: int) -> None:
        barrier.wait()
        results.append(attempt(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_parallel_wrong_web_passwords_are_verified_at_most_the_limit(
    app: Flask, auth: AuthActions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.db import database
    from web import auth as web_auth

    auth.setup_admin()
    counting = CountingVerify(web_auth.verify_password)
    monkeypatch.setattr(web_auth, "verify_password", counting)

    def attempt(i: int) -> tuple[Any, str | None]:
        with app.app_context(), database.connection_context():
            return web_auth.check_login(ADMIN_EMAIL, f"wrong-password-{i}", "198.51.100.7")

    results = _in_parallel(12, attempt)
    assert len(results) == 12 and all(user is None for user, _ in results)
    assert 1 <= counting.calls <= app.config["LOGIN_FAILURE_LIMIT"] == 5
    throttled = [e for _, e in results if e and e.startswith("Too many failed sign-ins")]
    assert len(throttled) == 12 - counting.calls


def test_a_blocked_address_still_signs_in_from_elsewhere(app: Flask, auth: AuthActions) -> None:
    from web import auth as web_auth

    auth.setup_admin()
    with app.app_context():
        for i in range(5):
            assert web_auth.check_login(ADMIN_EMAIL, f"guess-{i}", "203.0.113.66")[0] is None
        _, error = web_auth.check_login(ADMIN_EMAIL, ADMIN_PASSWORD, "203.0.113.66")
        assert error and error.startswith("Too many failed sign-ins")  # the guesser's IP: paused
        user, error = web_auth.check_login(ADMIN_EMAIL, ADMIN_PASSWORD, "192.0.2.10")
        assert user is not None and error is None  # the owner, from their own IP: not locked out


def test_the_per_address_ceiling_stops_guesses_spread_over_many_ips(tmp_path: Path) -> None:
    from web import auth as web_auth

    app = make_app(tmp_path / "instance", LOGIN_FAILURE_LIMIT_PER_ADDRESS=8)
    AuthActions(app, app.test_client()).setup_admin()
    with app.app_context():
        errors = [web_auth.check_login(ADMIN_EMAIL, "guess", f"10.9.0.{i}")[1] for i in range(10)]
    assert errors[:8] == ["Invalid email or password."] * 8
    assert all(e and e.startswith("Too many") for e in errors[8:])


@pytest.fixture
def mailbox(app: Flask, auth: AuthActions) -> Any:
    """An active account box@example.test with the mail password ``MAIL_PASSWORD``."""
    from mailboxes import linking
    from tests.helpers.accounts import make_account, make_client

    auth.setup_admin()
    with app.app_context():
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        account = make_account(owner, "box@example.test", make_client(owner), status="active")
        linking.add_password(owner, account, "Laptop", MAIL_PASSWORD)
        return account


def test_parallel_wrong_imap_passwords_are_verified_at_most_the_limit(
    app: Flask, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imaplib

    from mailboxes import mailbackend
    from tests.helpers.proxy import port, running_proxy

    counting = CountingVerify(mailbackend.verify_password)
    monkeypatch.setattr(mailbackend, "verify_password", counting)
    backend = mailbackend.AppBackend(app.config)
    with running_proxy(backend, listeners={"imap": "127.0.0.1:0"}) as proxy:

        def attempt(i: int) -> str:
            conn = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=30)
            try:
                conn.login(mailbox.address, f"wrong-guess-{i}")
            except imaplib.IMAP4.error as error:
                return str(error)
            finally:
                conn.shutdown()
            return "logged in"

        results = _in_parallel(12, attempt)
    backend.close()
    assert len(results) == 12 and "logged in" not in results
    assert 1 <= counting.calls <= app.config["LOGIN_FAILURE_LIMIT"] == 5
    assert sum("Too many failed logins" in r for r in results) == 12 - counting.calls


def test_the_same_password_on_many_connections_is_one_attempt(
    app: Flask, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client opening ten connections at once (cold cache) is not throttled by itself."""
    from mailboxes import mailbackend

    counting = CountingVerify(mailbackend.verify_password, delay=0.3)
    monkeypatch.setattr(mailbackend, "verify_password", counting)
    backend = mailbackend.AppBackend(app.config)

    def attempt(i: int) -> Any:
        try:
            return backend.authenticate("imap", mailbox.address, MAIL_PASSWORD, "127.0.0.1")
        except ProxyAuthError as error:
            return error

    results = _in_parallel(10, attempt)
    backend.close()
    assert len(results) == 10 and all(r.address == mailbox.address for r in results), results
    assert counting.calls == 1


def test_two_mailboxes_with_the_same_password_at_once_each_log_in(
    app: Flask, mailbox: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Logins in flight are shared per address and password, never per password alone."""
    from mailboxes import linking, mailbackend
    from models import Account
    from tests.helpers.accounts import make_account

    with app.app_context():
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        second = make_account(
            owner, "second@example.test", Account.get_by_id(mailbox.id).client, status="active"
        )
        linking.add_password(owner, second, "Phone", MAIL_PASSWORD)
    counting = CountingVerify(mailbackend.verify_password, delay=0.3)
    monkeypatch.setattr(mailbackend, "verify_password", counting)
    backend = mailbackend.AppBackend(app.config)
    addresses = [mailbox.address, "second@example.test"] * 3

    def attempt(i: int) -> Any:
        return backend.authenticate("imap", addresses[i], MAIL_PASSWORD, "127.0.0.1")

    results = _in_parallel(6, attempt)
    backend.close()
    assert sorted(r.address for r in results) == sorted(addresses)
    assert counting.calls == 2  # one per address
    assert "bookkeeping write failed" not in caplog.text


# ---- constant work for failed mail logins ------------------------------------------------------


def test_a_failed_mail_login_hashes_once_whatever_the_address_has(
    app: Flask, auth: AuthActions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailboxes import linking, mailbackend
    from tests.helpers.accounts import make_account, make_client

    auth.setup_admin()
    with app.app_context():
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        client = make_client(owner)
        for address, count in (("none@example.test", 0), ("one@example.test", 1),
                               ("three@example.test", 3)):  # fmt: skip
            account = make_account(owner, address, client, status="active")
            for n in range(count):
                linking.add_password(owner, account, f"device {n}", f"{address}-password-{n}")
    counting = CountingVerify(mailbackend.verify_password, delay=0)
    monkeypatch.setattr(mailbackend, "verify_password", counting)
    backend = mailbackend.AppBackend({**app.config, "LOGIN_FAILURE_LIMIT_PER_IP": 1000})
    work = {}
    for address in ("unknown@example.test", "none@example.test", "one@example.test",
                    "three@example.test"):  # fmt: skip
        before = counting.calls
        with pytest.raises(ProxyAuthError, match="Wrong address or password"):
            backend.authenticate("imap", address, "not-the-password", "192.0.2.1")
        work[address] = counting.calls - before
    before = counting.calls
    backend.authenticate("imap", "three@example.test", "three@example.test-password-2", "192.0.2.1")
    work["right password"] = counting.calls - before
    backend.close()
    assert set(work.values()) == {1}, work


def test_a_password_from_before_lookups_works_and_gets_its_lookup(app: Flask, mailbox: Any) -> None:
    from mailboxes import mailbackend
    from models import MailPassword

    with app.app_context():
        MailPassword.update(lookup=None).execute()  # as migration 4 leaves existing rows
        backend = mailbackend.AppBackend(app.config)
        grant = backend.authenticate("imap", mailbox.address, MAIL_PASSWORD, "192.0.2.1")
        backend.close()
        assert grant.address == mailbox.address
        assert MailPassword.get().lookup is not None


def test_a_password_from_before_lookups_opens_only_its_own_mailbox(
    app: Flask, mailbox: Any
) -> None:
    from mailboxes import linking, mailbackend
    from models import Account, MailPassword
    from tests.helpers.accounts import make_account

    with app.app_context():
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        other = make_account(
            owner, "other@example.test", Account.get_by_id(mailbox.id).client, status="active"
        )
        linking.add_password(owner, other, "Phone", "the-other-password-1")
        MailPassword.update(lookup=None).execute()  # both from before migration 4
        backend = mailbackend.AppBackend({**app.config, "LOGIN_FAILURE_LIMIT_PER_IP": 1000})
        try:
            with pytest.raises(ProxyAuthError, match="Wrong address or password"):
                backend.authenticate("imap", mailbox.address, "the-other-password-1", "192.0.2.1")
            grant = backend.authenticate(
                "imap", "other@example.test", "the-other-password-1", "192.0.2.1"
            )
            backend.authenticate("imap", mailbox.address, MAIL_PASSWORD, "192.0.2.1")
        finally:
            backend.close()
        assert grant.address == "other@example.test"


# ---- migration 4 upgrades a version 3 database in place ----------------------------------------


def test_a_version_3_database_is_upgraded_in_place_with_nothing_lost(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import migrations
    from mailboxes import mailbackend
    from models import MailPassword, OAuthClient
    from people.passwords import hash_password
    from store.vault import Keyring, aad_for, write_private

    instance.mkdir(parents=True, mode=0o700)
    ring = Keyring.generate()
    write_private(instance / "vault.key", ring.dump())
    db = sqlite3.connect(instance / "auth-email.db")
    db.executescript((Path(__file__).parent / "schema_v3.sql").read_text())
    now = "2026-11-01 10:00:00"
    secret = ring.seal("old-client-secret", aad_for("o_auth_client", "client_secret", "u" * 32))
    with db:
        db.execute("insert into meta values ('schema_version', '3')")
        db.execute(
            "insert into user values (1, 'old@example.org', ?, 1, 1, 1, 1, ?, null)",
            (hash_password("old-web-password"), now),
        )
        db.execute(
            "insert into o_auth_client values (1, ?, 1, 'c', 'other', 'client_credentials', '', "
            "'', 'https://t.example/token', '', '', 'mail', 'cid', ?, null, null, 0, "
            "'imap.example.test', 993, 'tls', '', null, 'tls', '', null, 'starttls', 'XOAUTH2', "
            "?, ?)",
            ("u" * 32, secret, now, now),
        )
        db.execute(
            "insert into account (id, uid, owner_id, address, provider, client_id, status, "
            "status_detail, signed_in_as, token_version, last_error, last_used_ip, bytes_relayed, "
            "created_at) values (1, ?, 1, 'old@example.test', 'other', 1, 'active', '', '', 0, '', "
            "'', 42, ?)",
            ("a" * 32, now),
        )
        db.execute(
            "insert into mail_password values (1, 1, 'Laptop', ?, ?, null, '')",
            (hash_password("old-mail-password"), now),
        )
    db.close()

    app = make_app(instance)
    with app.app_context():
        assert migrations.current_version() == migrations.LATEST
        assert OAuthClient.get().client_secret == "old-client-secret"
        assert User.get().email == "old@example.org"
        row = MailPassword.get()
        assert (row.label, row.lookup) == ("Laptop", None)
        backend = mailbackend.AppBackend(app.config)
        grant = backend.authenticate("imap", "old@example.test", "old-mail-password", "192.0.2.1")
        backend.close()
        assert grant.account_id == 1
        assert MailPassword.get().lookup is not None
    columns = [r[1] for r in sqlite3.connect(instance / "auth-email.db").execute(
        "pragma table_info(mail_password)")]  # fmt: skip
    assert "lookup" in columns
