"""Issue 12, the web/app half: each hole a probe found, closed where it arises, proven here."""

from __future__ import annotations

import contextlib
import html
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

import config
import users
from db import parse_id
from mailproxy import ProxyAuthError
from models import User
from tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    USER_PASSWORD,
    AuthActions,
    csrf_token,
    make_app,
    post_form,
)

# ---- one strict loopback check -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.attacker.example", False),
        ("127.0.0.1.nip.io", False),
        ("evil.localhost", False),
        ("localhost.attacker.example", False),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
    ],
)
def test_only_loopback_addresses_and_localhost_count_as_loopback(
    host: str | None, expected: bool
) -> None:
    assert config.is_loopback_host(host) is expected


def test_a_token_url_on_a_127_name_is_refused_over_http() -> None:
    import grants
    from forms import https_url_error

    assert https_url_error("http://127.attacker.example/token")
    with pytest.raises(grants.GrantError):
        grants.check_endpoint("http://127.attacker.example/token")
    grants.check_endpoint("http://127.0.0.1:9/token")


# ---- no SQL parameters in the log at DEBUG -----------------------------------------------------


@pytest.mark.parametrize("log_sql", [False, True])
def test_debug_logging_writes_no_password_hash_unless_sql_logging_is_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, log_sql: bool
) -> None:
    app = make_app(tmp_path / "instance", LOG_SQL=log_sql)
    caplog.set_level(logging.DEBUG)
    with app.app_context():
        user = users.create_user("someone@example.org", USER_PASSWORD, False)
    assert user.password_hash.startswith("$argon2")
    if log_sql:  # the same capture sees the hash when asked: the test can fail
        assert user.password_hash in caplog.text
    else:
        assert user.password_hash not in caplog.text
        assert "$argon2" not in caplog.text


# ---- request size limits -----------------------------------------------------------------------


class CountingStream(io.RawIOBase):
    """A request body of ``size`` bytes that counts what the app reads of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.size - self.position))
        buffer[:n] = b"a" * n
        self.position += n
        self.read_bytes += n
        return n


def test_a_100_mb_post_to_login_is_refused_unread(client: FlaskClient) -> None:
    body = CountingStream(100 * 1024 * 1024)
    answer = client.post(
        "/login",
        input_stream=body,  # type: ignore[arg-type]
        content_length=body.size,
        content_type="application/x-www-form-urlencoded",
    )
    assert answer.status_code == 413
    assert body.read_bytes == 0


def test_a_5_mb_field_is_refused_and_not_echoed(client: FlaskClient) -> None:
    big = "x" * (5 * 1024 * 1024)
    answer = client.post("/login", data={"email": big, "password": "p"})
    assert answer.status_code == 413
    assert "xxxxxxxxxx" not in answer.get_data(as_text=True)


def test_a_large_field_within_the_body_limit_is_not_echoed(
    client: FlaskClient, auth: AuthActions
) -> None:
    auth.setup_admin()
    auth.logout()
    answer = post_form(client, "/login", {"email": "x" * 200_000, "password": "p"})
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    assert "x" * 256 not in page and "254 characters" in page


def test_a_large_multipart_field_within_the_body_limit_is_refused(client: FlaskClient) -> None:
    answer = client.post(
        "/login",
        data={"email": "x" * 200_000, "password": "p"},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 413


def test_the_web_server_refuses_a_100_mb_body_before_reading_it(app: Flask) -> None:
    from serve import web_server

    server = web_server(app, "127.0.0.1", 0)

    def run() -> None:
        with contextlib.suppress(OSError):  # the loop's select() on a socket closed below
            server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as sock:
            sock.sendall(
                b"POST /login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 104857600\r\n\r\nemail=a"
            )
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head[:100]
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as sock:
            cookie = b"Cookie: " + b"c" * 70_000
            sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n\r\n")
            head = sock.recv(4096)
        assert head.split(b" ", 2)[1] == b"431", head[:100]
    finally:
        server.close()


# ---- no unhandled 500s on odd input ------------------------------------------------------------

HUGE = "9" * 20


@pytest.fixture
def alice(app: Flask, auth: AuthActions) -> User:
    auth.setup_admin()
    user = auth.create_user("alice@example.org", can_custom_clients=True)
    auth.logout()
    auth.login("alice@example.org", USER_PASSWORD)
    return user


def test_a_file_in_the_login_email_field_is_a_400(client: FlaskClient, auth: AuthActions) -> None:
    auth.setup_admin()
    auth.logout()
    token = csrf_token(client, "/login")
    answer = client.post(
        "/login",
        data={"csrf_token": token, "email": (io.BytesIO(b"x"), "a.txt"), "password": "p"},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 400
    assert "takes no files" in answer.get_data(as_text=True)


@pytest.mark.parametrize(
    "path",
    [
        f"/accounts/{HUGE}",
        f"/accounts/{'1' * 40}",
        f"/accounts/{HUGE}/mail-client",
        f"/settings/clients/{HUGE}/edit",
        f"/settings/clients/{2**63}/edit",
    ],
)
def test_ids_beyond_64_bits_in_urls_are_404(client: FlaskClient, alice: User, path: str) -> None:
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("password_id", [HUGE, str(2**63), "1" * 40])
def test_a_huge_password_id_in_the_revoke_url_is_404(
    client: FlaskClient, alice: User, password_id: str
) -> None:
    from tests.test_accounts_pages import make_account, make_client

    account = make_account(alice, "pw@example.com", make_client(alice), status="active")
    path = f"/accounts/{account.id}/passwords/{password_id}/revoke"
    answer = post_form(client, path, {}, form_page=f"/accounts/{account.id}")
    assert answer.status_code == 404


@pytest.mark.parametrize("choice", ["1" * 40, HUGE, "-1", "0", "１２", " 1"])
def test_an_impossible_client_id_when_linking_is_a_form_error(
    client: FlaskClient, alice: User, choice: str
) -> None:
    answer = post_form(
        client,
        "/accounts/new",
        {"address": "x@example.com", "provider": "other", "client": choice},
        form_page="/accounts/new?address=x@example.com",
    )
    assert answer.status_code == 400
    assert "Choose a client." in answer.get_data(as_text=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1), (str(2**63 - 1), 2**63 - 1), (str(2**63), None), ("0", None), ("+1", None),
     ("1_0", None), ("٣", None), ("", None), (None, None)],
)  # fmt: skip
def test_parse_id_accepts_only_64_bit_row_ids(value: str | None, expected: int | None) -> None:
    assert parse_id(value) == expected


# ---- backups private from the first byte -------------------------------------------------------


def test_the_backup_is_private_from_its_first_byte(
    app: Flask, runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    with app.app_context():
        User.create(email="o@example.org", password_hash="$argon2id$stand-in")
    folder = tmp_path / "backups"
    folder.mkdir()
    destination = folder / "copy.db"
    destination.write_bytes(b"an older copy")
    destination.chmod(0o644)  # an old copy someone left readable: replaced by a private one
    seen: dict[str, int | None] = {}
    real_connect = sqlite3.connect

    def watching(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        where = Path(path)
        if where.parent == folder:
            seen[where.name] = where.stat().st_mode & 0o777 if where.exists() else None
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", watching)
    result = runner.invoke(args=["backup", str(destination)])
    assert result.exit_code == 0, result.output
    assert seen and all(mode == 0o600 for mode in seen.values()), seen
    assert [p.name for p in folder.iterdir()] == ["copy.db"]
    assert destination.stat().st_mode & 0o777 == 0o600
    assert b"$argon2id$stand-in" in destination.read_bytes()


# ---- sign-out ends the session -----------------------------------------------------------------


def _cookies(client: FlaskClient) -> dict[str, str]:
    return {c.key: c.value for c in client._cookies.values()}  # type: ignore[attr-defined]


def _replay(app: Flask, cookies: dict[str, str]) -> int:
    """Status of /settings/ for a fresh browser holding ``cookies`` (200: signed in)."""
    other = app.test_client()
    for name, value in cookies.items():
        other.set_cookie(name, value)
    return other.get("/settings/").status_code


def test_cookies_captured_before_sign_out_stop_working(app: Flask, auth: AuthActions) -> None:
    auth.setup_admin()
    auth.create_user("alice@example.org")
    auth.logout()
    answer = post_form(
        auth.client,
        "/login",
        {"email": "alice@example.org", "password": USER_PASSWORD, "remember": "y"},
    )
    assert answer.status_code == 302
    captured = _cookies(auth.client)
    assert {"auth_email_session", "remember_token"} <= captured.keys()
    assert _replay(app, captured) == 200
    assert _replay(app, {"remember_token": captured["remember_token"]}) == 200
    auth.logout()
    assert _replay(app, captured) == 302
    assert _replay(app, {"remember_token": captured["remember_token"]}) == 302
    assert _replay(app, {"auth_email_session": captured["auth_email_session"]}) == 302


def test_an_admin_password_reset_ends_the_users_sessions(app: Flask, auth: AuthActions) -> None:
    auth.setup_admin()
    alice = auth.create_user("alice@example.org")
    auth.logout()
    browser = app.test_client()
    signed_in = {"email": "alice@example.org", "password": USER_PASSWORD, "remember": "y"}
    assert post_form(browser, "/login", signed_in).status_code == 302
    captured = _cookies(browser)
    assert _replay(app, captured) == 200
    auth.login()
    page = f"/admin/users/{alice.id}/password"
    answer = post_form(auth.client, page, {"password": "brand-new-pass-1"})
    assert answer.status_code == 302
    assert _replay(app, captured) == 302
    assert _replay(app, {"remember_token": captured["remember_token"]}) == 302


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
    import auth as web_auth
    from db import database

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
    import auth as web_auth

    auth.setup_admin()
    with app.app_context():
        for i in range(5):
            assert web_auth.check_login(ADMIN_EMAIL, f"guess-{i}", "203.0.113.66")[0] is None
        _, error = web_auth.check_login(ADMIN_EMAIL, ADMIN_PASSWORD, "203.0.113.66")
        assert error and error.startswith("Too many failed sign-ins")  # the guesser's IP: paused
        user, error = web_auth.check_login(ADMIN_EMAIL, ADMIN_PASSWORD, "192.0.2.10")
        assert user is not None and error is None  # the owner, from their own IP: not locked out


def test_the_per_address_ceiling_stops_guesses_spread_over_many_ips(tmp_path: Path) -> None:
    import auth as web_auth

    app = make_app(tmp_path / "instance", LOGIN_FAILURE_LIMIT_PER_ADDRESS=8)
    AuthActions(app, app.test_client()).setup_admin()
    with app.app_context():
        errors = [web_auth.check_login(ADMIN_EMAIL, "guess", f"10.9.0.{i}")[1] for i in range(10)]
    assert errors[:8] == ["Invalid email or password."] * 8
    assert all(e and e.startswith("Too many") for e in errors[8:])


@pytest.fixture
def mailbox(app: Flask, auth: AuthActions) -> Any:
    """An active account box@example.test with the mail password ``MAIL_PASSWORD``."""
    import linking
    from tests.test_accounts_pages import make_account, make_client

    auth.setup_admin()
    with app.app_context():
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        account = make_account(owner, "box@example.test", make_client(owner), status="active")
        linking.add_password(owner, account, "Laptop", MAIL_PASSWORD)
        return account


MAIL_PASSWORD = "mail-password-123"


def test_parallel_wrong_imap_passwords_are_verified_at_most_the_limit(
    app: Flask, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imaplib

    import mailbackend
    from tests.proxykit import port, running_proxy

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
    import mailbackend

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
    assert all(not isinstance(r, ProxyAuthError) for r in results), results
    assert counting.calls == 1


# ---- constant work for failed mail logins ------------------------------------------------------


def test_a_failed_mail_login_hashes_once_whatever_the_address_has(
    app: Flask, auth: AuthActions, monkeypatch: pytest.MonkeyPatch
) -> None:
    import linking
    import mailbackend
    from tests.test_accounts_pages import make_account, make_client

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
    import mailbackend
    from models import MailPassword

    with app.app_context():
        MailPassword.update(lookup=None).execute()  # as migration 4 leaves existing rows
        backend = mailbackend.AppBackend(app.config)
        grant = backend.authenticate("imap", mailbox.address, MAIL_PASSWORD, "192.0.2.1")
        backend.close()
        assert grant.address == mailbox.address
        assert MailPassword.get().lookup is not None


# ---- a wrong vault.key is refused at start -----------------------------------------------------


def _swap_key_bytes(instance: Path) -> None:
    """vault.key with the same key id and other key bytes (a copy from another instance)."""
    from vault import Keyring, write_private

    ring = Keyring.loads((instance / "vault.key").read_text())
    ring.keys[ring.current] = os.urandom(32)
    write_private(instance / "vault.key", ring.dump())


def test_a_wrong_key_with_the_right_id_is_refused_at_start(instance: Path) -> None:
    from models import Meta
    from vault import KeyFileError, Keyring

    app = make_app(instance)
    key_id = Keyring.loads((instance / "vault.key").read_text()).current
    with app.app_context():
        assert Meta.get_or_none(Meta.key == f"vault_check:{key_id}") is not None
    _swap_key_bytes(instance)
    with pytest.raises(KeyFileError, match=f"vault key {key_id} .* does not decrypt"):
        make_app(instance)


def test_an_instance_from_before_check_values_gets_one_only_with_the_right_key(
    instance: Path,
) -> None:
    from models import Meta, OAuthClient
    from tests.conftest import stored_client
    from vault import KeyFileError

    app = make_app(instance)
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        stored_client(owner, "c", "client-secret-value")
        Meta.delete().where(Meta.key.startswith("vault_check:")).execute()
    right_key = (instance / "vault.key").read_text()
    _swap_key_bytes(instance)
    with pytest.raises(KeyFileError, match="does not decrypt"):
        make_app(instance)
    (instance / "vault.key").write_text(right_key)
    again = make_app(instance)
    with again.app_context():
        assert Meta.select().where(Meta.key.startswith("vault_check:")).count() == 1
        assert OAuthClient.get().client_secret == "client-secret-value"


def test_serve_refuses_to_start_with_a_wrong_key(instance: Path) -> None:
    make_app(instance)
    _swap_key_bytes(instance)
    env = {**os.environ, "AUTH_EMAIL_INSTANCE": str(instance), "AUTH_EMAIL_BIND": "127.0.0.1:0"}
    done = subprocess.run(
        [sys.executable, "serve.py"],
        env=env,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot start" in done.stderr and "does not decrypt" in done.stderr


def test_rotating_the_key_writes_the_new_keys_check_value(app: Flask, runner: Any) -> None:
    from models import Meta
    from vault import Keyring

    result = runner.invoke(args=["rotate-key"])
    assert result.exit_code == 0, result.output
    current = Keyring.loads((Path(app.instance_path) / "vault.key").read_text()).current
    with app.app_context():
        assert Meta.get_or_none(Meta.key == f"vault_check:{current}") is not None
    make_app(Path(app.instance_path))  # and it starts with it


# ---- migration 4 upgrades a version 3 database in place ----------------------------------------


def test_a_version_3_database_is_upgraded_in_place_with_nothing_lost(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import mailbackend
    import migrations
    from models import MailPassword, OAuthClient
    from passwords import hash_password
    from vault import Keyring, aad_for, write_private

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
        assert migrations.current_version() == migrations.LATEST == 4
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


# ---- where clients may point this server -------------------------------------------------------

PRESET_HOSTS = frozenset({"login.microsoftonline.com", "outlook.office365.com"})


@pytest.mark.parametrize(
    ("hosts", "loopback", "host", "allowed"),
    [
        ("*", False, "login.example.com", True),
        ("*", False, "8.8.8.8", True),
        ("*", False, "127.0.0.1", False),
        ("*", False, "localhost", False),
        ("*", False, "[::1]", False),
        ("*", False, "app.localhost", False),
        ("*", False, "10.0.0.5", False),
        ("*", False, "169.254.169.254", False),
        ("*", False, "192.168.1.1", False),
        ("*", True, "127.0.0.1", True),
        ("*", True, "localhost", True),
        ("*.corp.example", False, "mail.corp.example", True),
        ("*.corp.example", False, "corp.example", True),
        ("*.corp.example", False, "evilcorp.example", False),
        ("*.corp.example", False, "login.example.com", False),
        ("*.corp.example, 10.0.0.5", False, "10.0.0.5", True),
        ("imap.corp.example", False, "IMAP.corp.example.", True),
        ("*.corp.example", False, "login.microsoftonline.com", True),  # a built-in provider's
        ("", False, "outlook.office365.com", True),
        ("", False, "login.example.com", False),
    ],
)
def test_the_host_policy(hosts: str, loopback: bool, host: str, allowed: bool) -> None:
    policy = config.HostPolicy.from_config(
        {"CUSTOM_CLIENT_HOSTS": hosts, "CUSTOM_CLIENT_LOOPBACK": loopback}, PRESET_HOSTS
    )
    assert (policy.refusal(host) is None) is allowed


def test_the_built_in_providers_hosts_are_known() -> None:
    import providers

    assert {"login.microsoftonline.com", "outlook.office365.com", "imap.gmail.com"} <= (
        providers.preset_hosts()
    )


@pytest.fixture
def strict_app(tmp_path: Path) -> Iterator[Flask]:
    """An instance as deployed: no loopback for clients, and only hosts under corp.example."""
    app = make_app(
        tmp_path / "instance", CUSTOM_CLIENT_LOOPBACK=False, CUSTOM_CLIENT_HOSTS="*.corp.example"
    )
    yield app
    make_app(tmp_path / "other")  # the next test's grants settings again (tests share a process)


CUSTOM_CLIENT = {
    "name": "Own IdP",
    "provider": "other",
    "grant": "authorization_code",
    "tenant": "",
    "authorize_url": "https://login.corp.example/authorize",
    "token_url": "https://login.corp.example/token",
    "device_url": "",
    "scope": "mail offline_access",
    "client_id": "own-client",
    "client_secret": "own-secret-value",
    "imap_host": "imap.corp.example",
    "imap_port": "993",
    "imap_security": "tls",
    "pop3_host": "pop.corp.example",
    "pop3_port": "995",
    "pop3_security": "tls",
    "smtp_host": "smtp.corp.example",
    "smtp_port": "587",
    "smtp_security": "starttls",
    "sasl_mechanism": "XOAUTH2",
    "revocation_url": "",
    "submit": "Save client",
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("token_url", "https://idp.elsewhere.example/token", "not among the hosts"),
        ("authorize_url", "https://127.0.0.1/authorize", "loopback host"),
        ("revocation_url", "https://10.1.2.3/revoke", "not an address this server allows"),
        ("imap_host", "127.0.0.1", "loopback host"),
        ("pop3_host", "localhost", "loopback host"),
        ("smtp_host", "smtp.elsewhere.example", "not among the hosts"),
        ("token_url", "http://127.0.0.1:9000/token", "loopback host"),
    ],
)
def test_the_client_form_keeps_to_the_allowed_hosts(
    strict_app: Flask, field: str, value: str, message: str
) -> None:
    from models import OAuthClient

    browser = strict_app.test_client()
    AuthActions(strict_app, browser).setup_admin()
    good = post_form(browser, "/settings/clients/new", {**CUSTOM_CLIENT, "name": "good"})
    assert good.status_code == 302, good.get_data(as_text=True)
    answer = post_form(browser, "/settings/clients/new", {**CUSTOM_CLIENT, field: value})
    assert answer.status_code == 400
    assert message in html.unescape(answer.get_data(as_text=True))
    with strict_app.app_context():
        assert OAuthClient.select().count() == 1


def test_hosts_are_checked_again_at_use(strict_app: Flask) -> None:
    """A client saved under a wider setting: tokens and mail logins refuse its hosts."""
    import grants
    import linking
    import mailbackend
    from tests.test_accounts_pages import make_account, make_client

    AuthActions(strict_app, strict_app.test_client()).setup_admin()
    with strict_app.app_context():
        with pytest.raises(grants.GrantError, match="loopback host"):
            grants.check_endpoint("http://127.0.0.1:9/token")
        with pytest.raises(grants.GrantError, match="not among the hosts"):
            grants.check_endpoint("https://login.example.com/token")
        grants.check_endpoint("https://login.corp.example/token")
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        client = make_client(owner, imap_host="127.0.0.1", imap_port=143, imap_security="plain")
        account = make_account(owner, "box@corp.example", client, status="active")
        linking.add_password(owner, account, "Laptop", MAIL_PASSWORD)
        backend = mailbackend.AppBackend(strict_app.config)
        with pytest.raises(ProxyAuthError, match="mail server is refused"):
            backend.authenticate("imap", "box@corp.example", MAIL_PASSWORD, "192.0.2.1")
        backend.close()


def test_plain_mail_login_from_loopback_can_be_turned_off(tmp_path: Path) -> None:
    import imaplib

    import mailbackend

    app = make_app(
        tmp_path / "instance",
        MAIL_PLAINTEXT_FROM_LOOPBACK=False,
        **{f"{n.upper()}_LISTEN": "" for n in ("imaps", "pop3", "pop3s", "submission", "smtps")},
        IMAP_LISTEN="127.0.0.1:0",
    )
    assert mailbackend.proxy_settings(app).allow_plaintext_from_loopback is False
    service = mailbackend.MailProxyService(app)
    service.start()
    try:
        conn = imaplib.IMAP4("127.0.0.1", service.controller.listening["imap"][1], timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="(?i)tls"):
            conn.login("someone@example.test", "a-password")
        conn.shutdown()
    finally:
        service.stop()
    on = make_app(tmp_path / "default")
    assert mailbackend.proxy_settings(on).allow_plaintext_from_loopback is True
