"""Logins without the upstream handshake on their path: pooled greeted connections, TLS session
resumption towards the mail server, session tickets for returning clients, the ECDSA listener
certificate. Against the real Dovecot and OAuth server (the `peers` fixture)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import imaplib
import logging
import os
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

import mailproxy.pool
from mailproxy import Controller, Endpoint, ensure_self_signed
from mailproxy.tls import server_context
from tests.helpers.proxy import (
    CERT,
    KEY,
    Account,
    RecordingBackend,
    client_tls,
    port,
    running_proxy,
)

PASSWORD = "device-pw-" + secrets.token_hex(4)


def connections(kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "mailproxy_upstream_connections_total", {"protocol": "imap", "kind": kind}
    )
    return value or 0.0


@pytest.fixture(scope="module")
def address(peers: Any) -> str:
    return str(peers.new_mailbox("pool", messages=1)[0])


@pytest.fixture(scope="module")
def backend(peers: Any, address: str) -> RecordingBackend:
    client_id, secret = peers.register_client(grant_types=["client_credentials"], mailbox=address)

    def real_token(acct: Account, force: bool) -> str:
        return str(peers.client_credentials_token(client_id, secret)["access_token"])

    host = peers.mail_host  # the strict Dovecot of the test bed
    acct = Account(1, address, PASSWORD, {"imap": Endpoint(host, peers.imaps_port, "tls")})
    return RecordingBackend(accounts={address: acct}, token_source=real_token)


def login_select(proxy: Controller, address: str) -> None:
    m = imaplib.IMAP4_SSL("127.0.0.1", port(proxy, "imaps"), ssl_context=client_tls(), timeout=20)
    m.login(address, PASSWORD)
    typ, data = m.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0] or 0) >= 1
    m.logout()


def ready(proxy: Controller) -> int:
    assert proxy.hub is not None and proxy.hub.pool is not None
    return sum(len(q) for q in proxy.hub.pool.ready.values())


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture
def proxy(backend: RecordingBackend, peers: Any) -> Iterator[Controller]:
    with running_proxy(
        backend, listeners={"imaps": "127.0.0.1:0"}, upstream_ca_file=peers.ca_file
    ) as c:
        yield c


@pytest.mark.peers
def test_login_after_a_login_takes_a_greeted_connection(proxy: Controller, address: str) -> None:
    pooled = connections("pooled")
    login_select(proxy, address)  # nothing pooled yet: connects, then fills the pool
    wait_for(lambda: ready(proxy) == 2)
    login_select(proxy, address)
    assert connections("pooled") == pooled + 1
    assert proxy.hub is not None and proxy.hub.pool is not None
    assert proxy.hub.pool.hits == 1
    wait_for(lambda: ready(proxy) == 2)  # refilled behind the login, never more than the size


@pytest.mark.peers
def test_pooled_connections_are_closed_unused_after_their_age(
    backend: RecordingBackend, peers: Any, address: str
) -> None:
    with running_proxy(
        backend,
        listeners={"imaps": "127.0.0.1:0"},
        upstream_ca_file=peers.ca_file,
        upstream_pool_max_age=0.3,
    ) as proxy:
        login_select(proxy, address)
        wait_for(lambda: ready(proxy) == 2)
        wait_for(lambda: ready(proxy) == 0, timeout=5)  # expired, and not refilled
        time.sleep(0.5)
        assert ready(proxy) == 0
        login_select(proxy, address)  # still logs in: a new connection


@pytest.mark.peers
def test_pooled_connection_dropped_by_the_server_falls_back_to_a_new_one(
    proxy: Controller,
    address: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    login_select(proxy, address)
    wait_for(lambda: ready(proxy) == 2)
    assert proxy.hub is not None and proxy.hub.pool is not None and proxy.loop is not None
    # The server closes them after the pool's check said they were fine.
    monkeypatch.setattr(mailproxy.pool, "usable", lambda up: True)
    for q in proxy.hub.pool.ready.values():
        for _, up in q:
            shut_down(up.writer.get_extra_info("socket").fileno())
    new = connections("new")
    login_select(proxy, address)
    assert connections("new") == new + 1
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    hosts = {key[1].host for key in proxy.hub.pool.ready}
    assert any(f"pooled connection to {h} lost, connecting anew" in said for h in hosts), said


def shut_down(fd: int) -> None:
    """End a connection under asyncio's feet, as a server closing it would."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class StallingIMAP:
    """A plain IMAP server on loopback that accepts any token, except on the connections it
    accepted before ``stall()``: those never answer AUTHENTICATE (a server that stopped serving
    a greeted connection without closing it). ``tokens`` lists (connection number, bearer token)
    of every AUTHENTICATE read."""

    def __init__(self) -> None:
        self.accepted = 0
        self.stalled_upto = 0
        self.tokens: list[tuple[int, str]] = []
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def stall(self) -> None:
        self.stalled_upto = self.accepted

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(conn, self.accepted), daemon=True).start()

    def _talk(self, conn: socket.socket, number: int) -> None:
        with contextlib.suppress(OSError), conn:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
            for raw in conn.makefile("rb"):
                tag, _, rest = raw.strip().decode().partition(" ")
                if rest.upper().startswith("AUTHENTICATE XOAUTH2 "):
                    sasl = base64.b64decode(rest.split(" ")[2]).decode()
                    self.tokens.append((number, sasl.split("auth=Bearer ")[1].strip("\x01")))
                    if number <= self.stalled_upto:
                        continue
                if rest.upper() == "LOGOUT":
                    conn.sendall(f"* BYE bye\r\n{tag} OK done\r\n".encode())
                    return
                conn.sendall(f"{tag} OK [CAPABILITY IMAP4rev1] done\r\n".encode())

    def close(self) -> None:
        self.srv.close()


def plain_login(proxy: Controller, address: str) -> None:
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=20)
    assert m.login(address, PASSWORD)[0] == "OK"
    m.logout()


def test_a_pooled_connection_that_times_out_in_the_login_is_tried_again_with_the_same_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    upstream = StallingIMAP()
    issued = iter(range(1, 100))
    acct = Account(
        1, "a@example.test", PASSWORD, {"imap": Endpoint("127.0.0.1", upstream.port, "plain")}
    )
    backend = RecordingBackend(
        accounts={acct.address: acct}, token_source=lambda a, f: f"token-{next(issued)}"
    )
    try:
        with running_proxy(backend, listeners={"imap": "127.0.0.1:0"}, upstream_timeout=1.0) as p:
            plain_login(p, acct.address)  # connection 1; the pool greets 2 and 3 behind it
            wait_for(lambda: ready(p) == 2)
            upstream.stall()
            plain_login(p, acct.address)
    finally:
        upstream.close()
    stalled, fresh = [t for t in upstream.tokens if t[1] == "token-2"]
    assert stalled[0] <= 3 < fresh[0]  # a pooled connection, then a new one, one token
    assert [c[2] for c in backend.named("access_token")] == [False, False]  # no refresh
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "pooled connection to 127.0.0.1 lost, connecting anew" in said


class TicketIMAP:
    """A one-process IMAPS server (as most providers' front ends are to their tickets):
    greeting, any AUTHENTICATE accepted, LOGOUT; it records which handshakes resumed."""

    def __init__(self) -> None:
        self.resumed: list[bool] = []
        self.loop = asyncio.new_event_loop()
        ctx = server_context(CERT, KEY)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.resumed.append(w.get_extra_info("ssl_object").session_reused)
            w.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
            while line := await r.readline():
                tag, _, rest = line.strip().decode().partition(" ")
                if rest.upper() == "LOGOUT":
                    w.write(f"* BYE bye\r\n{tag} OK done\r\n".encode())
                    break
                w.write(f"{tag} OK [CAPABILITY IMAP4rev1] done\r\n".encode())
                await w.drain()
            w.close()

        start = asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
        self.server = self.loop.run_until_complete(start)
        self.port = self.server.sockets[0].getsockname()[1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_next_upstream_connection_resumes_the_tls_session() -> None:
    upstream = TicketIMAP()
    acct = Account(
        1, "a@example.test", PASSWORD, {"imap": Endpoint("127.0.0.1", upstream.port, "tls")}
    )
    backend = RecordingBackend(accounts={acct.address: acct}, token_source=lambda a, f: "t")
    try:
        with running_proxy(
            backend, listeners={"imaps": "127.0.0.1:0"}, upstream_ca_file=CERT, upstream_pool_size=0
        ) as proxy:
            for _ in range(3):
                m = imaplib.IMAP4_SSL(
                    "127.0.0.1", port(proxy, "imaps"), ssl_context=client_tls(), timeout=20
                )
                m.login(acct.address, PASSWORD)
                m.logout()
    finally:
        upstream.close()
    assert upstream.resumed == [False, True, True]


def test_returning_client_resumes_its_session_with_a_ticket() -> None:
    """The listener sends TLS 1.3 session tickets; a client offering one skips the full
    handshake (no certificate, no signature)."""
    ctx = server_context(*generated_pair())
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bool] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.session_reused)
                tls.sendall(b"* OK\r\n")
                tls.recv(10)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = ssl.create_default_context(cafile=generated_pair()[0])
    client.check_hostname = False
    session = None
    for _ in range(2):
        raw = socket.create_connection(srv.getsockname(), timeout=5)
        with client.wrap_socket(raw, session=session) as tls:
            assert tls.recv(10) == b"* OK\r\n"  # the ticket arrives before the greeting
            session = tls.session
            tls.sendall(b"x")
    t.join(5)
    srv.close()
    assert seen == [False, True]


_PAIR: list[str] = []


def generated_pair() -> tuple[str, str]:
    if not _PAIR:
        folder = tempfile.mkdtemp(prefix="pool-tls-")
        _PAIR.extend([os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")])
        ensure_self_signed(_PAIR[0], _PAIR[1], ["localhost"])
    return _PAIR[0], _PAIR[1]


def test_generated_listener_certificate_is_ecdsa_p256() -> None:
    cert_path, _ = generated_pair()
    with open(cert_path, "rb") as f:
        key = x509.load_pem_x509_certificate(f.read()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_an_existing_rsa_pair_is_kept_and_served(tmp_path: Any) -> None:
    cert_path, key_path = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(cert_path, "wb") as f:
        f.write(pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    ensure_self_signed(cert_path, key_path, ["localhost"])
    with open(cert_path, "rb") as f:
        assert f.read() == pem  # not replaced by a new ECDSA pair
    server_context(cert_path, key_path)  # and still loads
