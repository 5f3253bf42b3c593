"""Tokens in tests: linking by code, expiring a token, token endpoints that fail or replay."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from flask import Flask

from mailboxes import linking
from models import Account, OAuthClient, User, utcnow
from oauth import errors as oauth_errors
from oauth import tokens
from tests.helpers.linking import (
    REDIRECT,
    PeerInfo,
    mailbox,
    op_sign_in,
    peer_client,
    query_of,
    register,
)


def link(
    user: User,
    peer: PeerInfo,
    *,
    client_scope: str | None = None,
    **meta: Any,
) -> tuple[Account, dict[str, Any]]:
    """An account linked by Authorization Code (driven over HTTP at the OAuth server);
    ``client_scope`` replaces the client's default scope, ``meta`` goes to the registration."""
    reg = register(peer, **meta)
    over = {"scope": client_scope} if client_scope is not None else {}
    client = peer_client(user, peer, reg, **over)
    address = mailbox("tok")
    started = linking.start(user, address, client, REDIRECT)
    back = op_sign_in(peer, started.url, address)
    account, result = linking.complete_callback(user, query_of(back), REDIRECT)
    assert result.ok, result.message
    return Account.get_by_id(account.id), reg


def expire(account: Account) -> None:
    Account.update(token_expires_at=utcnow() - dt.timedelta(minutes=1)).where(
        Account.id == account.id
    ).execute()


def next_try_in(account: Account, seconds: float) -> None:
    """Move the account's next renewal try ``seconds`` from now (negative: due already)."""
    Account.update(next_refresh_at=utcnow() + dt.timedelta(seconds=seconds)).where(
        Account.id == account.id
    ).execute()


def seconds_until_next_try(account: Account) -> float:
    stored = Account.get_by_id(account.id)
    return float((stored.next_refresh_at - utcnow()).total_seconds())


class FlakyTokenEndpoint:
    """A local token endpoint that answers 503 (or too slowly, or with a given status and body):
    the failures peers lack. ``on_request`` runs before each answer (e.g. another caller)."""

    def __init__(
        self,
        delay: float = 0.0,
        status: int = 503,
        body: dict[str, Any] | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.hits += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if delay:
                    time.sleep(delay)
                if on_request is not None:
                    on_request()
                payload = b"<html>Service Unavailable</html>"
                kind = "text/html"
                if body is not None:
                    payload, kind = json.dumps(body).encode(), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("content-type", kind)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def broken_account(app: Flask, token_url: str) -> Account:
    from people import users

    with app.app_context():
        user = users.create_user("flaky@example.org", "flaky-password-1", True)
    client = OAuthClient.create(
        owner=user,
        name="flaky",
        provider="other",
        token_url=token_url,
        scope="mail",
        client_id="id",
        client_secret="secret",
    )
    account = Account.create(
        owner=user, address="flaky@example.test", provider="other", client=client, status="active"
    )
    tokens.store_tokens(account, {"access_token": "a1", "refresh_token": "r1", "expires_in": 0})
    return Account.get_by_id(account.id)


def caller_thread(account_id: int) -> tuple[threading.Thread, list[str]]:
    """A caller of ``get_access_token`` in a thread of its own (not started), and what it got:
    the token, or "refused" (re-authorize) or "failed" (unavailable)."""
    results: list[str] = []

    def call() -> None:
        try:
            results.append(tokens.get_access_token(account_id))
        except oauth_errors.NeedsReauthorization:
            results.append("refused")
        except oauth_errors.TokenUnavailable:
            results.append("failed")

    return threading.Thread(target=call), results


def hold_after_its_read(
    monkeypatch: Any, caller: threading.Thread, until: threading.Event
) -> threading.Event:
    """Make ``caller``'s first read of the account row wait for ``until`` once it has the row
    (a late caller holding an old version); returns the event set when it has read."""
    real_load = tokens._load
    read = threading.Event()

    def load_then_wait(account_id: int) -> Account:
        row = real_load(account_id)
        if threading.current_thread() is caller and not read.is_set():
            read.set()
            until.wait(60)
        return row

    monkeypatch.setattr(tokens, "_load", load_then_wait)
    return read


class Scripted:
    """A local token endpoint that plays ``answers`` in order (the last one repeats) and
    records each request's form and Authorization header. An answer: (status, body, headers) or
    ("hang", seconds). With ``tls`` (certificate chain file, key file) it speaks https."""

    def __init__(self, *answers: tuple[Any, ...], tls: tuple[str, str] | None = None) -> None:
        self.answers = list(answers)
        self.forms: list[dict[str, str]] = []
        self.authorizations: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                # Blank values kept: "scope=" sent empty is a scope sent.
                form = parse_qs(raw.decode(), keep_blank_values=True)
                outer.forms.append({k: v[0] for k, v in form.items()})
                outer.authorizations.append(self.headers.get("authorization"))
                answer = outer.answers.pop(0) if len(outer.answers) > 1 else outer.answers[0]
                if answer[0] == "hang":
                    time.sleep(answer[1])
                    return
                status, body, headers = (*answer, {})[:3]
                if isinstance(body, dict | list):
                    payload, kind = json.dumps(body).encode(), "application/json"
                else:
                    payload, kind = str(body).encode(), "text/html"
                try:
                    self.send_response(status)
                    self.send_header("content-type", kind)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def hits(self) -> int:
        return len(self.forms)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
