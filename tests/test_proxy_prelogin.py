"""The proxy before login, with a Backend that refuses everything: real stdlib clients, bad
input of every kind, limits and timeouts. No mail peers needed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import logging
import os
import poplib
import smtplib
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailproxy import Controller, ProxySettings, fingerprint_sha256
from mailproxy.controller import Hub
from mailproxy.imap import IMAPSession
from mailproxy.tls import ensure_self_signed
from tests.helpers.proxy import (
    CERT,
    KEY,
    RecordingBackend,
    client_tls,
    port,
    raw_connect,
    read_line,
    read_until_closed,
    running_proxy,
)

SETTINGS = dict(
    idle_timeout_prelogin=3.0,
    max_line=1024,
    max_literal=256,
    unknown_command_budget=5,
    max_connections_per_ip=1000,
)


@pytest.fixture(scope="module")
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture(scope="module")
def proxy(backend: RecordingBackend) -> Iterator[Controller]:
    with running_proxy(backend, **SETTINGS) as controller:
        yield controller


def assert_serving(controller: Controller) -> None:
    """A fresh connection still gets its greeting on every plain listener."""
    for name, greeting in (("imap", b"* OK"), ("pop3", b"+OK"), ("submission", b"220")):
        with raw_connect(controller, name) as s:
            assert read_line(s).startswith(greeting)


# ---- normal paths with stdlib clients ---------------------------------------------------------
def test_imap_wrong_password_is_authenticationfailed(proxy: Controller) -> None:
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    for cap in ("IMAP4REV1", "STARTTLS", "AUTH=PLAIN", "SASL-IR", "ID", "IDLE", "LITERAL+"):
        assert cap in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
        m.login("nobody@example.test", "wrong")
    m.logout()


def test_imap_starttls_then_authenticate_plain_reaches_backend(
    proxy: Controller, backend: RecordingBackend
) -> None:
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    m.starttls(ssl_context=client_tls())
    assert "STARTTLS" not in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        m.authenticate("PLAIN", lambda _: b"\0plain-user@example.test\0secret")
    m.logout()
    assert ("authenticate", "imap", "plain-user@example.test", "127.0.0.1") in backend.calls


def test_imap_login_with_literals(proxy: Controller, backend: RecordingBackend) -> None:
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b"a1 LOGIN {16}\r\n")
        assert read_line(s).startswith(b"+ ")
        s.sendall(b"lit@example.test {3+}\r\npw!\r\n")
        assert read_line(s).startswith(b"a1 NO [AUTHENTICATIONFAILED]")
        s.sendall(b'a2 LOGIN "quo\\"ted@example.test" "p w"\r\n')
        assert read_line(s).startswith(b"a2 NO [AUTHENTICATIONFAILED]")
    assert ("authenticate", "imap", "lit@example.test", "127.0.0.1") in backend.calls
    assert ("authenticate", "imap", 'quo"ted@example.test', "127.0.0.1") in backend.calls


def test_imap_huge_literal_is_refused(proxy: Controller) -> None:
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b"a1 LOGIN {999999}\r\n")
        assert read_line(s).startswith(b"a1 BAD Literal too large")
        s.sendall(b"a2 LOGIN {999999+}\r\n" + b"x" * 5000)
        assert read_until_closed(s).startswith(b"* BYE Literal too large")


def test_imap_id_noop_logout(proxy: Controller) -> None:
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b'a ID ("name" "test")\r\nb NOOP\r\nc SELECT INBOX\r\nd LOGOUT\r\n')
        out = read_until_closed(s)
    assert b'* ID ("name"' in out and b"a OK" in out and b"b OK" in out
    assert b"c BAD Log in first" in out and b"* BYE" in out and b"d OK" in out


def test_pop3_wrong_password_is_auth_error(proxy: Controller) -> None:
    p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=5)
    caps = p.capa()
    assert {"STLS", "USER", "SASL"} <= set(caps)
    p.user("nobody@example.test")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        p.pass_("wrong")
    p.quit()


def test_pop3_stls_and_auth_plain_continuation(
    proxy: Controller, backend: RecordingBackend
) -> None:
    p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=5)
    p.stls(context=client_tls())
    assert "STLS" not in p.capa()
    raw: Any = p  # poplib has no AUTH: speak it through its line helpers
    raw._putcmd("AUTH PLAIN")
    assert raw._getline()[0].startswith(b"+")
    raw._putcmd(base64.b64encode(b"\0pop-user@example.test\0pw").decode())
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        raw._getresp()
    p.quit()
    assert ("authenticate", "pop3", "pop-user@example.test", "127.0.0.1") in backend.calls


def test_pop3s_listener(proxy: Controller) -> None:
    p = poplib.POP3_SSL("127.0.0.1", port(proxy, "pop3s"), context=client_tls(), timeout=5)
    assert "STLS" not in p.capa()
    p.quit()


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_smtp_wrong_password_is_535(proxy: Controller, listener: str) -> None:
    if listener == "smtps":
        s: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port(proxy, listener), context=client_tls(), timeout=5
        )
    else:
        s = smtplib.SMTP("127.0.0.1", port(proxy, listener), timeout=5)
        s.starttls(context=client_tls())
    s.ehlo()
    assert s.has_extn("auth") and not s.has_extn("starttls")
    for mech in ("PLAIN", "LOGIN"):
        s.user, s.password = "nobody@example.test", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.auth(mech, getattr(s, "auth_" + mech.lower()), initial_response_ok=mech == "PLAIN")
        assert err.value.smtp_code == 535
    s.quit()


def test_smtp_mail_before_auth_is_530(proxy: Controller) -> None:
    s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=5)
    s.ehlo()
    assert s.mail("a@example.test")[0] == 530
    assert s.noop()[0] == 250
    assert s.rset()[0] == 250
    s.quit()


# ---- credentials need TLS unless loopback is allowed -------------------------------------------
def test_no_credentials_in_the_clear_when_not_allowed() -> None:
    with running_proxy(RecordingBackend(), allow_plaintext_from_loopback=False) as proxy:
        m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
        assert "LOGINDISABLED" in m.capabilities and "AUTH=PLAIN" not in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            m.login("a@example.test", "pw")
        m.starttls(ssl_context=client_tls())
        assert "AUTH=PLAIN" in m.capabilities and "LOGINDISABLED" not in m.capabilities
        m.logout()

        p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=5)
        assert "USER" not in p.capa()
        with pytest.raises(poplib.error_proto, match="STLS"):
            p.user("a@example.test")
        p.quit()

        s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=5)
        s.ehlo()
        assert not s.has_extn("auth")
        assert s.docmd("AUTH PLAIN AGFAcHc=")[0] == 530
        s.starttls(context=client_tls())
        s.ehlo()
        assert s.has_extn("auth")
        s.quit()


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "listener,expect", [("imap", b"* BYE"), ("pop3", b"-ERR"), ("submission", b"421")]
)
def test_overlong_line_is_refused_and_closed(
    proxy: Controller, listener: str, expect: bytes
) -> None:
    with raw_connect(proxy, listener) as s:
        read_line(s)
        s.sendall(b"a" * 5000)
        assert expect in read_until_closed(s)
    assert_serving(proxy)


@pytest.mark.parametrize("listener", ["imap", "pop3", "submission"])
def test_tls_handshake_on_plain_port_is_closed(proxy: Controller, listener: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with raw_connect(proxy, listener) as raw:
        raw.settimeout(5)
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw).do_handshake()
        assert time.monotonic() - started < 4
    assert_serving(proxy)


@pytest.mark.parametrize("listener", ["imaps", "pop3s", "smtps"])
def test_plain_text_on_tls_port_is_closed(proxy: Controller, listener: str) -> None:
    with raw_connect(proxy, listener) as s:
        s.sendall(b"a1 LOGIN user pass\r\nUSER x\r\nEHLO x\r\n" * 20)
        read_until_closed(s)
    assert_serving(proxy)


@pytest.mark.parametrize(
    "listener,partial",
    [("imap", b"a1 LOGIN {10}\r\nabc"), ("pop3", b"AUTH PLAIN\r\n"), ("submission", b"EHL")],
)
def test_client_vanishing_mid_command(proxy: Controller, listener: str, partial: bytes) -> None:
    for _ in range(3):
        s = raw_connect(proxy, listener)
        read_line(s)
        s.sendall(partial)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    assert_serving(proxy)


@pytest.mark.parametrize(
    "listener,junk,expect",
    [("imap", b"a FOO\r\n", b"* BYE"), ("pop3", b"FOO\r\n", b"-ERR Too many"),
     ("submission", b"FOO\r\n", b"421")],
)  # fmt: skip
def test_unknown_command_budget(
    proxy: Controller, listener: str, junk: bytes, expect: bytes
) -> None:
    with raw_connect(proxy, listener) as s:
        read_line(s)
        s.sendall(junk * SETTINGS["unknown_command_budget"])  # type: ignore[operator]
        assert expect in read_until_closed(s)


def test_idle_timeout_before_login(proxy: Controller) -> None:
    with raw_connect(proxy, "imap", timeout=10) as s:
        read_line(s)
        started = time.monotonic()
        out = read_until_closed(s, timeout=8)
        assert out.startswith(b"* BYE") and b"Idle" in out
        assert 2 < time.monotonic() - started < 6


def test_connection_limit_per_ip() -> None:
    with running_proxy(RecordingBackend(), max_connections_per_ip=2) as proxy:
        held = [raw_connect(proxy, "imap") for _ in range(2)]
        for s in held:
            assert read_line(s).startswith(b"* OK")
        with raw_connect(proxy, "imap") as s:
            assert read_until_closed(s).startswith(b"* BYE Too many connections")
        with raw_connect(proxy, "pop3") as s:
            assert read_until_closed(s).startswith(b"-ERR [SYS/TEMP]")
        held.pop().close()
        # the freed slot is counted once the proxy has seen the close: poll, generously
        deadline = time.monotonic() + 30
        while True:
            with raw_connect(proxy, "submission") as s:
                greeting = read_line(s)
            if greeting.startswith(b"220") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert greeting.startswith(b"220"), greeting
        for s in held:
            s.close()


def test_too_many_failed_logins_closes(proxy: Controller) -> None:
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b"a LOGIN x y\r\n" * 3)
        out = read_until_closed(s)
    assert out.count(b"AUTHENTICATIONFAILED") == 3 and b"* BYE" in out


def test_password_never_logged(proxy: Controller, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55word"
    with caplog.at_level(logging.DEBUG, logger="mailproxy"):
        m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
        with pytest.raises(imaplib.IMAP4.error):
            m.login("a@example.test", secret)
        with pytest.raises(imaplib.IMAP4.error):
            m.authenticate("PLAIN", lambda _: f"\0a@example.test\0{secret}".encode())
        m.logout()
        s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=5)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("a@example.test", secret)
        s.quit()
    text = caplog.text
    assert "LOGIN ****" in text
    b64 = base64.b64encode(f"\0a@example.test\0{secret}".encode()).decode()
    assert secret not in text and b64 not in text


# ---- controller and TLS helpers -------------------------------------------------------------
def test_bind_error_is_raised_in_the_caller() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        settings = ProxySettings(listeners={"imap": f"127.0.0.1:{taken}"})
        controller = Controller(RecordingBackend(), settings)
        with pytest.raises(OSError):
            controller.start()
        controller.stop()  # harmless after a failed start


def test_stop_closes_sessions_from_another_thread() -> None:
    controller = Controller(RecordingBackend(), ProxySettings(listeners={"pop3": "127.0.0.1:0"}))
    controller.start()
    s = raw_connect(controller, "pop3")
    assert read_line(s).startswith(b"+OK")
    controller.stop()
    assert read_until_closed(s) == b""
    assert controller.listening == {}
    s.close()


def test_self_signed_certificate(tmp_path: os.PathLike[str]) -> None:
    cert, key = os.path.join(tmp_path, "c.pem"), os.path.join(tmp_path, "k.pem")
    ensure_self_signed(cert, key, ["mail.example.test", "127.0.0.1"])
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    fp = fingerprint_sha256(cert)
    assert len(fp) == 95 and fp.count(":") == 31
    ensure_self_signed(cert, key, ["other"])  # kept as is
    assert fingerprint_sha256(cert) == fp
    assert fingerprint_sha256(CERT) != fp and os.path.exists(KEY)


def test_the_pre_login_lifetime_starts_at_accept_not_when_the_session_is_built() -> None:
    """A slow TLS handshake between accept() and the session's start counts against the
    lifetime: a client cannot stretch it by handshaking slowly."""
    settings = ProxySettings(prelogin_lifetime=300.0)
    hub = Hub(settings, RecordingBackend())

    class Writer:
        def get_extra_info(self, name: str) -> Any:
            return ("192.0.2.7", 50000) if name == "peername" else None

    async def build() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        accepted = loop.time() - 120.0  # accept() two minutes ago, the handshake since
        given = IMAPSession(hub, asyncio.StreamReader(), Writer(), True, accepted)  # type: ignore[arg-type]
        before = loop.time()
        fresh = IMAPSession(hub, asyncio.StreamReader(), Writer(), True)  # type: ignore[arg-type]
        return given.login_deadline - accepted, fresh.login_deadline - before

    from_accept, from_start = asyncio.run(build())
    assert from_accept == 300.0
    assert 300.0 <= from_start < 301.0  # no accept() time given: counted from now


def _holds_connection_to(client_port: int) -> bool:
    """Whether this process (the proxy runs in it) has a descriptor open on the TCP connection
    whose far end is ``client_port`` (an orphaned socket the kernel still flushes has none)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                cols = row.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == client_port and cols[9] != "0":
                    inodes.add(f"socket:[{cols[9]}]")
    fds = "/proc/self/fd"
    held = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            held.add(os.readlink(f"{fds}/{fd}"))
    return bool(inodes & held)


@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_a_client_that_never_reads_its_answers_is_cut_off_before_login(
    listener: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Commands sent without reading a single answer: once the proxy's buffers are full, its
    writes wait on the client. Before login that wait is bounded like a read (the idle timeout),
    the goodbye is bounded too, and then the connection is cut: the proxy keeps no session and no
    descriptor for a stranger who does not read."""
    settings = dict(
        idle_timeout_prelogin=1.0,
        goodbye_timeout=0.5,
        max_prelogin_commands=1_000_000,
        unknown_command_budget=1_000_000,
        listeners={"imap": "127.0.0.1:0", "imaps": "127.0.0.1:0"},
    )
    caplog.set_level(logging.INFO, logger="mailproxy")
    with running_proxy(RecordingBackend(), **settings) as proxy:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: full sooner
        s.settimeout(10)
        s.connect(("127.0.0.1", port(proxy, listener)))
        client_port = s.getsockname()[1]
        conn: Any = s
        if listener == "imaps":
            conn = client_tls().wrap_socket(s, server_hostname="proxy.example.test")
        # 80,000 answers of ~150 bytes, 12 MB: past every buffer on the way (the kernel lets a
        # socket's send buffer grow to 4 MB here).
        with contextlib.suppress(OSError):  # the proxy may cut us off while we still send
            conn.sendall(b"a CAPABILITY\r\n" * 80_000)
        # Well under the 30 s after which the event loop would give up a TLS close_notify itself.
        deadline = time.monotonic() + 15
        while proxy.hub.total or _holds_connection_to(client_port):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert proxy.hub.total == 0, "the session is still open"
        assert not _holds_connection_to(client_port), "the proxy still holds the descriptor"
        conn.close()
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "127.0.0.1: does not read the answers, closing" in said
