"""Issue 12, web side: one loopback check, no SQL in debug logs, request limits, no 500s on odd
input, private backups, sign-out that ends sessions."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

import config
from models import User
from oauth import errors as oauth_errors
from people import users
from store.db import parse_id
from tests.helpers.app import USER_PASSWORD, make_app
from tests.helpers.web import AuthActions, csrf_token, post_form

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


def test_a_token_url_on_a_127_name_is_refused_over_http(app: Flask) -> None:
    """(``app`` configures grants as the tests run: loopback allowed, so only the name fails.)"""
    from oauth import grants
    from web.forms import https_url_error

    assert https_url_error("http://127.attacker.example/token")
    with pytest.raises(oauth_errors.GrantError):
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
    from tests.helpers.accounts import make_account, make_client

    account = make_account(alice, "pw@example.com", make_client(alice), status="active")
    path = f"/accounts/{account.id}/passwords/{password_id}/revoke"
    answer = post_form(client, path, {}, form_page=f"/accounts/{account.id}")
    # No route matches (werkzeug answers 405 when a same-path GET rule exists): never a 500,
    # and no query runs.
    assert answer.status_code in (404, 405)
    assert client.get(path).status_code == 404


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


def test_the_mail_proxy_and_the_app_share_one_loopback_check() -> None:
    """The proxy's plain-login and upstream checks and the app's are the same function."""
    from mailproxy import common

    assert config.is_loopback_host is common.is_loopback
    assert not common.is_loopback("evil.localhost")
