"""PROXY protocol v1/v2 on the mail listeners, behind a real HAProxy.

Clients connect from 127.0.0.2 (or .4) to HAProxy, which connects to the proxy from 127.0.0.1 (the
trusted proxy) and names the client in its header; the proxy must then see the client's address
for logins (throttling, audit) and connection limits. Headers from others, and broken headers from
the trusted proxy, are refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailproxy import proxyproto
from tests.helpers.proxy import ALL_LISTENERS, RecordingBackend, client_tls, port, running_proxy
from tests.helpers.serving import free_port
from tests.peerbed import unavailable

V2 = proxyproto.V2_SIGNATURE
TLS_LISTENERS = {"imaps", "pop3s", "smtps"}
PROTOCOL = {
    "imap": "imap",
    "imaps": "imap",
    "pop3": "pop3",
    "pop3s": "pop3",
    "submission": "smtp",
    "smtps": "smtp",
}


def v2_header(source: str, port_: int, command: int = 1) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    addresses += struct.pack("!HH", port_, 993)
    return V2 + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def parse(data: bytes) -> tuple[str, int] | None:
    async def run() -> tuple[str, int] | None:
        buffer = bytearray(data)

        async def exactly(count: int) -> bytes:
            if len(buffer) < count:
                raise proxyproto.ProxyHeaderError("truncated PROXY header")
            taken = bytes(buffer[:count])
            del buffer[:count]
            return taken

        return await proxyproto.read_header(exactly, 1)

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 993\r\n", ("203.0.113.7", 51000)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 993\r\n", ("2001:db8::7", 51000)),
        (b"PROXY UNKNOWN\r\n", None),
        (v2_header("203.0.113.9", 40000), ("203.0.113.9", 40000)),
        (v2_header("203.0.113.9", 40000, command=0), None),
        (v2_header("203.0.113.9", 40000) + b"\x04\x00\x01x", ("203.0.113.9", 40000)),
    ],
)
def test_headers_are_read(header: bytes, expected: tuple[str, int] | None) -> None:
    assert parse(header) == expected


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000", "truncated"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 993\n", "CRLF"),
        (b"PROXY TCP4 2001:db8::7 192.0.2.1 51000 993\r\n", "does not match"),
        (b"PROXY TCP4 203.0.113.777 192.0.2.1 51000 993\r\n", "bad address"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 993\r\n", "bad port"),
        (b"PROXY TCP5 a b c d\r\n", "malformed"),
        (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "too long"),
        (b"a1 LOGIN x y\r\n", "not a PROXY header"),
        (v2_header("203.0.113.9", 40000)[:20], "truncated"),
        (V2[:6] + b"XXXXXX\x21\x11\x00\x00", "not a PROXY header"),
        (V2 + b"\x11\x11\x00\x00", "version"),
        (V2 + b"\x21\x11\x00\x04abcd", "truncated PROXY v2 addresses"),
        (V2 + b"\x21\x31\x00\x00", "unsupported transport"),
        (V2 + b"\x21\x11\xff\xff", "too long"),
    ],
)
def test_bad_headers_are_refused(header: bytes, message: str) -> None:
    with pytest.raises(proxyproto.ProxyHeaderError, match=message):
        parse(header)


def test_trusted_networks() -> None:
    trusted = proxyproto.parse_networks("10.0.0.0/8, 127.0.0.1 ::1")
    assert proxyproto.is_trusted("10.1.2.3", trusted)
    assert proxyproto.is_trusted("::ffff:127.0.0.1", trusted)
    assert not proxyproto.is_trusted("127.0.0.2", trusted)
    assert not proxyproto.is_trusted("10.0.0.1", ())
    with pytest.raises(ValueError, match="not an IP address"):
        proxyproto.parse_networks("10.0.0.0/8, lb.example")


# --- End to end behind HAProxy ----------------------------------------------------------------


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def proxy(backend: RecordingBackend) -> Iterator[object]:
    with running_proxy(
        backend,
        trusted_proxies=("127.0.0.1",),
        idle_timeout_prelogin=3,
        max_connections_per_ip=1,
    ) as controller:
        yield controller


@contextlib.contextmanager
def running_haproxy(
    targets: dict[str, int], directory: Path
) -> Iterator[dict[tuple[str, str], int]]:
    """HAProxy with a frontend per target and header version: (name, "v1"|"v2") -> its port."""
    binary = shutil.which("haproxy")
    if binary is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    fronts: dict[tuple[str, str], int] = {}
    config = [
        "global",
        "  maxconn 200",
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 30s",
        "  timeout server 30s",
    ]
    for target, target_port in targets.items():
        for version, option in (("v1", "send-proxy"), ("v2", "send-proxy-v2")):
            fronts[target, version] = free_port()
            name = f"{target}_{version}"
            config += [
                f"frontend f_{name}",
                f"  bind 127.0.0.1:{fronts[target, version]}",
                f"  default_backend b_{name}",
                f"backend b_{name}",
                f"  server s 127.0.0.1:{target_port} {option}",
            ]
    path = directory / "haproxy.cfg"
    path.write_text("\n".join(config) + "\n")
    log = open(directory / "haproxy.log", "wb")
    process = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", next(iter(fronts.values()))), 1).close()
                break
            except OSError:
                assert process.poll() is None, (directory / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.1)
        yield fronts
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture
def haproxy(proxy: Any, tmp_path: Path) -> Iterator[dict[tuple[str, str], int]]:
    with running_haproxy({name: port(proxy, name) for name in ALL_LISTENERS}, tmp_path) as fronts:
        yield fronts


def connect(port_: int, source: str, tls: bool) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port_), timeout=10, source_address=(source, 0))
    return client_tls().wrap_socket(raw) if tls else raw


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def failed_login(sock: socket.socket, protocol: str) -> bytes:
    """A login with a wrong password; returns the reply to it."""
    if protocol == "imap":
        sock.sendall(b"a1 LOGIN nobody@example.test wrong-password\r\n")
        return read_reply(sock)
    if protocol == "pop3":
        sock.sendall(b"USER nobody@example.test\r\n")
        read_reply(sock)
        sock.sendall(b"PASS wrong-password\r\n")
        return read_reply(sock)
    sock.sendall(b"EHLO client.example\r\n")
    reply = b""
    while b"250 " not in reply:
        reply += sock.recv(4096)
    plain = base64.b64encode(b"\0nobody@example.test\0wrong-password")
    sock.sendall(b"AUTH PLAIN " + plain + b"\r\n")
    return read_reply(sock)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", list(ALL_LISTENERS))
def test_real_client_address_reaches_logins(
    haproxy: dict[tuple[str, str], int], backend: RecordingBackend, listener: str, version: str
) -> None:
    with connect(haproxy[listener, version], "127.0.0.2", listener in TLS_LISTENERS) as sock:
        greeting = read_reply(sock)
        assert greeting[:1] in (b"*", b"+", b"2"), greeting
        reply = failed_login(sock, PROTOCOL[listener])
    assert reply[:1] not in (b"+", b"2") and b"OK" not in reply[:8], reply
    logins = backend.named("authenticate")
    assert logins and logins[-1][3] == "127.0.0.2"


def test_connection_limits_count_real_clients(haproxy: dict[tuple[str, str], int]) -> None:
    """One connection per client IP here: a second client behind the same balancer still gets in,
    a second connection of the same client does not."""
    first = connect(haproxy["imap", "v2"], "127.0.0.2", tls=False)
    try:
        assert read_reply(first).startswith(b"* OK")
        with connect(haproxy["imap", "v2"], "127.0.0.4", tls=False) as other:
            assert read_reply(other).startswith(b"* OK")
        with connect(haproxy["imap", "v1"], "127.0.0.2", tls=False) as again:
            assert read_reply(again).startswith(b"* BYE Too many connections")
    finally:
        first.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # nothing: closed after the pre-login timeout
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5",  # truncated, then the balancer closes
        b"a1 LOGIN x y\r\n",  # no header at all
        v2_header("203.0.113.9", 40000)[:18],
    ],
)
@pytest.mark.parametrize("listener", ["imap", "smtps"])
def test_trusted_proxy_without_a_good_header_is_refused(proxy, listener: str, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port(proxy, listener)), timeout=10) as sock:
        if sent:
            sock.sendall(sent)
            if sent.startswith(b"PROXY") or sent.startswith(V2[:6]):
                sock.shutdown(socket.SHUT_WR)
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with the rest of the line unread
            answer = b""
        assert answer == b""  # closed without a greeting


def test_header_from_an_untrusted_address_is_refused(proxy, backend: RecordingBackend) -> None:
    with socket.create_connection(
        ("127.0.0.1", port(proxy, "imap")), timeout=10, source_address=("127.0.0.3", 0)
    ) as sock:
        assert read_reply(sock).startswith(b"* OK")
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 143\r\n")
        assert b"OK" not in read_reply(sock)
        failed_login(sock, "imap")
    assert backend.named("authenticate")[-1][3] == "127.0.0.3"
    # On a TLS listener the header is a failed handshake.
    with socket.create_connection(
        ("127.0.0.1", port(proxy, "imaps")), timeout=10, source_address=("127.0.0.3", 0)
    ) as raw:
        raw.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 993\r\n")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            client_tls().wrap_socket(raw).recv(100)


def test_the_app_throttles_and_audits_the_real_client(instance: Path, tmp_path: Path) -> None:
    """Through the app's backend: the audit log and the throttle name the client, not HAProxy."""
    from mailboxes.mailbackend import MailProxyService, trusted_proxies
    from models import AuditEvent, Throttle
    from store.db import database
    from tests.helpers.app import make_app

    listeners = {f"{name.upper()}_LISTEN": "" for name in ALL_LISTENERS}
    listeners["IMAP_LISTEN"] = "127.0.0.1:0"
    app = make_app(instance, **listeners, MAIL_TRUSTED_PROXIES="127.0.0.1/32")
    service = MailProxyService(app)
    service.start()
    try:
        imap = service.controller.listening["imap"][1]
        with running_haproxy({"imap": imap}, tmp_path) as fronts:
            with connect(fronts["imap", "v1"], "127.0.0.2", tls=False) as sock:
                assert read_reply(sock).startswith(b"* OK")
                assert b"NO" in failed_login(sock, "imap")
    finally:
        service.stop()
    with app.app_context(), database.connection_context():
        failed = AuditEvent.get(AuditEvent.action == "mail.login_failed")
        assert failed.ip == "127.0.0.2"
        assert Throttle.get_or_none(Throttle.key == "mail:ip:127.0.0.2") is not None
        assert Throttle.get_or_none(Throttle.key == "mail:ip:127.0.0.1") is None
    with pytest.raises(ValueError, match="MAIL_TRUSTED_PROXIES: not an IP address"):
        trusted_proxies("lb.example.org")
