"""Test helpers for the mail proxy: a scriptable Backend and a Controller on loopback port 0."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mailproxy import Controller, Endpoint, Grant, ProxyAuthError, ProxySettings, ensure_self_signed

PROTOCOLS = ("imap", "pop3", "smtp")
_CERT_DIR = tempfile.mkdtemp(prefix="proxykit-tls-")
CERT = os.path.join(_CERT_DIR, "cert.pem")
KEY = os.path.join(_CERT_DIR, "key.pem")
ensure_self_signed(CERT, KEY, ["localhost", "127.0.0.1"])


@dataclass
class Account:
    account_id: int
    address: str
    password: str
    upstreams: dict[str, Endpoint]
    mechanism: str = "XOAUTH2"
    # one-shot refusal for the next authenticate() / access_token() call, e.g. ("reauth", "...")
    refuse_login: ProxyAuthError | None = None
    refuse_token: ProxyAuthError | None = None


@dataclass
class RecordingBackend:
    """A Backend whose accounts live in a dict and whose tokens come from `token_source`.

    `bad_tokens` is a queue of tokens handed out before asking the token source (to make the
    upstream reject a token). Every call is recorded for the tests to check.
    """

    accounts: dict[str, Account] = field(default_factory=dict)
    token_source: Callable[[Account, bool], str] = lambda acct, force: "no-token"
    bad_tokens: list[str] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _by_id(self, account_id: int) -> Account:
        return next(a for a in self.accounts.values() if a.account_id == account_id)

    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        with self.lock:
            self.calls.append(("authenticate", protocol, address, client_ip))
        acct = self.accounts.get(address.lower())
        if acct is None or acct.password != password:
            raise ProxyAuthError("credentials", "Invalid address or password")
        if acct.refuse_login is not None:
            err, acct.refuse_login = acct.refuse_login, None
            raise err
        return Grant(acct.account_id, acct.address, acct.upstreams[protocol], acct.mechanism)  # type: ignore[arg-type]

    def access_token(self, account_id: int, force_refresh: bool = False) -> str:
        acct = self._by_id(account_id)
        with self.lock:
            self.calls.append(("access_token", account_id, force_refresh))
            if acct.refuse_token is not None:
                err, acct.refuse_token = acct.refuse_token, None
                raise err
            if self.bad_tokens:
                token = self.bad_tokens.pop(0)
                self.tokens_issued.append(token)
                return token
        token = self.token_source(acct, force_refresh)
        with self.lock:
            self.tokens_issued.append(token)
        return token

    def upstream_refused(self, account_id: int, protocol: str, detail: str) -> None:
        with self.lock:
            self.calls.append(("upstream_refused", account_id, detail, protocol))

    def token_rejected(self, account_id: int, protocol: str, detail: str) -> str | None:
        with self.lock:
            self.calls.append(("token_rejected", account_id, detail, protocol))
        return None

    def session_opened(self, account_id: int, protocol: str, client_ip: str) -> None:
        with self.lock:
            self.calls.append(("session_opened", account_id, protocol, client_ip))

    def session_closed(self, account_id: int, protocol: str, bytes_in: int, bytes_out: int) -> None:
        with self.lock:
            self.calls.append(("session_closed", account_id, protocol, bytes_in, bytes_out))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [c for c in self.calls if c[0] == name]


def client_credentials_source(token_url: str, client_id: str, secret: str) -> Callable[..., str]:
    """A token source asking the real OAuth server (client credentials grant)."""

    def fetch(acct: Account, force: bool) -> str:
        data = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
        req = urllib.request.Request(token_url, data=data, method="POST")
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        req.add_header("Authorization", "Basic " + basic)
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(json.loads(r.read())["access_token"])

    return fetch


ALL_LISTENERS = {
    name: "127.0.0.1:0" for name in ("imap", "imaps", "pop3", "pop3s", "submission", "smtps")
}


@contextlib.contextmanager
def running_proxy(backend: Any, **overrides: Any) -> Iterator[Controller]:
    """A started Controller on loopback port 0 (all six listeners unless told otherwise)."""
    settings = ProxySettings(
        listeners=dict(overrides.pop("listeners", ALL_LISTENERS)),
        tls_cert=CERT,
        tls_key=KEY,
        hostname="proxy.example.test",
        **overrides,
    )
    controller = Controller(backend, settings)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()
    assert controller.errors == 0, "an unexpected exception reached the proxy"


def client_tls() -> ssl.SSLContext:
    """Client context that trusts the proxy's self-signed test certificate."""
    ctx = ssl.create_default_context(cafile=CERT)
    ctx.check_hostname = False
    return ctx


def port(controller: Controller, name: str) -> int:
    return controller.listening[name][1]


def raw_connect(controller: Controller, name: str, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port(controller, name)), timeout=timeout)


def _peer(peers: Any, name: str, default: Any = None) -> Any:
    """An attribute (or mapping key) of the `peers` fixture."""
    if isinstance(peers, dict):
        return peers.get(name, default)
    return getattr(peers, name, default)


def seeded_address(peers: Any) -> str:
    """The mailbox the peers seed with messages and the static `mailproxy` client acts for."""
    return str(_peer(peers, "seeded_user") or _peer(peers, "user") or "alice@example.test")


def token_source_for(peers: Any) -> Callable[[Account, bool], str]:
    """Real tokens from the peers' OAuth server for the seeded mailbox (client credentials of
    the static `mailproxy` client, whose `mailbox` metadata is that address)."""
    client = (_peer(peers, "clients") or {}).get("mailproxy") or {}
    client_id = client.get("client_id") or _peer(peers, "client_id", "mailproxy")
    secret = client.get("client_secret") or _peer(peers, "client_secret", "mailproxy-secret")
    return client_credentials_source(_peer(peers, "token_url"), client_id, secret)


def read_until_closed(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes; fails if it does not close in time."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection not closed within {timeout}s; got {data[-200:]!r}")


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data
