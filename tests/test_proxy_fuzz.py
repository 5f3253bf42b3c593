"""Property: whatever a client sends before login, the proxy answers or closes, no exception
escapes, and the next client is served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailproxy import Controller
from tests.helpers.proxy import RecordingBackend, raw_connect, running_proxy

KNOWN = {
    "imap": [b"a CAPABILITY", b"a LOGIN {5}", b"a LOGIN {3+}", b"a LOGIN x y", b'a LOGIN "x',
             b"a AUTHENTICATE PLAIN", b"a AUTHENTICATE PLAIN AHgAeQ==", b"a ID (", b"a NOOP",
             b"a STARTTLS", b"*", b"+", b"a SELECT INBOX", b"a LOGIN {99999999999}"],
    "pop3": [b"CAPA", b"USER x", b"PASS y", b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN AHgAeQ==",
             b"AUTH XOAUTH2", b"STLS", b"*", b"NOOP", b"STAT"],
    "submission": [b"EHLO x", b"HELO x", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH LOGIN eA==",
                   b"AUTH PLAIN AHgAeQ==", b"MAIL FROM:<a@b>", b"DATA", b"STARTTLS", b"*",
                   b"RSET", b"VRFY x"],
}  # fmt: skip
GREETING = {"imap": b"* OK", "pop3": b"+OK", "submission": b"220"}


@pytest.fixture(scope="module")
def proxy() -> Iterator[Controller]:
    with running_proxy(
        RecordingBackend(),
        idle_timeout_prelogin=3.0,
        max_line=512,
        max_literal=64,
        unknown_command_budget=4,
        max_connections_per_ip=1000,
    ) as controller:
        yield controller


def chunks(listener: str) -> st.SearchStrategy[list[bytes]]:
    piece = st.one_of(
        st.binary(max_size=80),
        st.sampled_from(KNOWN[listener]),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    ending = st.sampled_from([b"\r\n", b"\n", b"", b"\r"])
    return st.lists(st.tuples(piece, ending).map(lambda p: p[0] + p[1]), max_size=10)


def exchange(controller: Controller, listener: str, data: list[bytes]) -> bytes:
    """Send everything, then end our side; the server must close within a few seconds."""
    with raw_connect(controller, listener) as s:
        s.settimeout(5)
        out = b""
        try:
            for piece in data:
                s.sendall(piece)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may already have closed on us: fine
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, f"not closed: {out[-200:]!r}"
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
    return out


def check(controller: Controller, listener: str, data: list[bytes]) -> None:
    out = exchange(controller, listener, data)
    assert out.startswith(GREETING[listener])
    assert controller.errors == 0


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=chunks("imap"))
def test_imap_prelogin_survives_anything(proxy: Controller, data: list[bytes]) -> None:
    check(proxy, "imap", data)


@FUZZ
@given(data=chunks("pop3"))
def test_pop3_prelogin_survives_anything(proxy: Controller, data: list[bytes]) -> None:
    check(proxy, "pop3", data)


@FUZZ
@given(data=chunks("submission"))
def test_smtp_prelogin_survives_anything(proxy: Controller, data: list[bytes]) -> None:
    check(proxy, "submission", data)


def test_still_serving_after_fuzzing(proxy: Controller) -> None:
    for listener, greeting in GREETING.items():
        with raw_connect(proxy, listener) as s:
            assert s.recv(100).startswith(greeting)
    assert proxy.errors == 0
