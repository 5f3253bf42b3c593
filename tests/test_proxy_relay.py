"""Login and relay against a scripted loopback IMAP upstream: token retry, SASL challenge,
upstream ending the session (as Gmail does at token expiry), idle timeout, metrics."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from mailproxy import Controller, Endpoint
from tests.proxykit import Account, RecordingBackend, port, raw_connect, running_proxy


class FakeIMAP:
    """A tiny upstream: accepts the token 'good', challenges anything else, and after login
    answers every command with OK, except EXPIRE (BYE and close) and SLOW (no answer)."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.unavailable = False
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] fake ready\r\n")
        try:
            while line := await r.readline():
                tag, _, rest = line.strip().decode().partition(" ")
                if rest.startswith("AUTHENTICATE"):
                    payload = base64.b64decode(rest.split()[2]).decode()
                    self.payloads.append(payload)
                    if self.unavailable:
                        w.write(f"{tag} NO [UNAVAILABLE] token service down\r\n".encode())
                    elif "auth=Bearer good\x01" in payload:
                        w.write(f"{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n".encode())
                    else:
                        w.write(b"+ eyJzdGF0dXMiOiI0MDAifQ==\r\n")
                        await w.drain()
                        assert await r.readline() == b"\r\n"
                        w.write(f"{tag} NO [AUTHENTICATIONFAILED] bad token\r\n".encode())
                elif rest == "EXPIRE":
                    w.write(b"* BYE token expired\r\n")
                    await w.drain()
                    break
                elif rest != "SLOW":
                    w.write(f"{tag} OK {rest} done\r\n".encode())
                await w.drain()
        except (OSError, AssertionError):
            pass
        w.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeIMAP]:
    f = FakeIMAP()
    yield f
    f.close()


@pytest.fixture
def backend(fake: FakeIMAP) -> RecordingBackend:
    ep = Endpoint("127.0.0.1", fake.port, "plain")
    acct = Account(7, "carol@example.test", "pw", {"imap": ep})
    return RecordingBackend(accounts={acct.address: acct}, token_source=lambda a, force: "good")


@pytest.fixture
def proxy(backend: RecordingBackend) -> Iterator[Controller]:
    with running_proxy(backend, listeners={"imap": "127.0.0.1:0"}, idle_timeout=2.0) as c:
        yield c


def login(proxy: Controller) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    m.login("carol@example.test", "pw")
    return m


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_login_answers_with_upstream_capabilities(proxy: Controller, fake: FakeIMAP) -> None:
    before = sample("mailproxy_logins_total", protocol="imap", result="ok")
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    typ, data = m.login("carol@example.test", "pw")
    assert typ == "OK" and b"[CAPABILITY IMAP4rev1 IDLE MOVE]" in data[0]
    assert m.noop()[0] == "OK"
    m.logout()
    assert fake.payloads[-1] == "user=carol@example.test\x01auth=Bearer good\x01\x01"
    assert sample("mailproxy_logins_total", protocol="imap", result="ok") == before + 1
    assert sample("mailproxy_relayed_bytes_total", protocol="imap", direction="in") > 0


def test_challenge_then_refresh_then_success(proxy: Controller, backend: RecordingBackend) -> None:
    backend.bad_tokens.append("stale")
    login(proxy).logout()
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    assert not backend.named("token_rejected")


def test_two_rejections_mark_the_account(proxy: Controller, backend: RecordingBackend) -> None:
    backend.bad_tokens += ["stale", "stale-too"]
    with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHORIZATIONFAILED\] .*re-authorize"):
        login(proxy)
    (call,) = backend.named("token_rejected")
    assert call[1] == 7 and "AUTHENTICATIONFAILED" in call[2] and '"status":"400"' in call[2]


def test_upstream_unavailable_is_not_a_token_rejection(
    proxy: Controller, backend: RecordingBackend, fake: FakeIMAP
) -> None:
    fake.unavailable = True
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            login(proxy)
    finally:
        fake.unavailable = False
    assert len(backend.named("access_token")) == 1 and not backend.named("token_rejected")


def test_upstream_closing_ends_the_relay_cleanly(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "imap") as s:
        s.recv(1000)
        s.sendall(b"a LOGIN carol@example.test pw\r\n")
        assert b"a OK" in s.recv(1000)
        s.sendall(b"b EXPIRE\r\n")
        data = b""
        while chunk := s.recv(1000):
            data += chunk
        assert data == b"* BYE token expired\r\n"
    deadline = time.monotonic() + 3
    while not backend.named("session_closed") and time.monotonic() < deadline:
        time.sleep(0.05)
    (closed,) = backend.named("session_closed")
    assert closed[1:] == (7, "imap", len(b"b EXPIRE\r\n"), len(b"* BYE token expired\r\n"))
    assert backend.named("session_opened")[0][1:] == (7, "imap", "127.0.0.1")


def test_idle_timeout_after_login(proxy: Controller) -> None:
    with raw_connect(proxy, "imap", timeout=10) as s:
        s.recv(1000)
        s.sendall(b"a LOGIN carol@example.test pw\r\nb SLOW\r\n")
        assert b"a OK" in s.recv(1000)
        started = time.monotonic()
        assert s.recv(1000) == b""
        assert 1.5 < time.monotonic() - started < 5


def test_plain_upstream_only_on_loopback(proxy: Controller, backend: RecordingBackend) -> None:
    backend.accounts["carol@example.test"].upstreams = {
        "imap": Endpoint("mail.example.com", 143, "plain")
    }
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] refusing an unencrypted"):
        login(proxy)


def test_oauthbearer_payload(proxy: Controller, backend: RecordingBackend, fake: FakeIMAP) -> None:
    backend.accounts["carol@example.test"].mechanism = "OAUTHBEARER"
    login(proxy).logout()
    assert fake.payloads[-1] == (
        f"n,a=carol@example.test,\x01host=127.0.0.1\x01port={fake.port}\x01auth=Bearer good\x01\x01"
    )
