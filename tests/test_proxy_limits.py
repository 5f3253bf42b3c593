"""What a connection may cost before login, and what all connections together may cost: bounded
commands, literals and lifetime, TLS handshakes counted and timed out, connection limits that fit
in the open-file limit, and one log line when accept() runs out of descriptors."""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailproxy import Controller, ProxySettings
from mailproxy.common import BoundedReads
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

ROOT = Path(__file__).resolve().parent.parent

LIMITS = dict(
    idle_timeout_prelogin=3.0,
    max_literal=256,
    max_literals_per_command=3,
    max_literal_bytes_per_command=600,
    max_prelogin_commands=20,
    max_connections_per_ip=1000,
)


@pytest.fixture(scope="module")
def proxy() -> Iterator[Controller]:
    with running_proxy(RecordingBackend(), **LIMITS) as controller:
        yield controller


# ---- one command ----------------------------------------------------------------------------
def test_imap_refuses_a_fourth_synchronizing_literal_and_goes_on(proxy: Controller) -> None:
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b"a1 ID {4}\r\n")
        for _ in range(2):
            assert read_line(s).startswith(b"+ ")
            s.sendall(b"abcd {4}\r\n")
        assert read_line(s).startswith(b"+ ")
        s.sendall(b"abcd {4}\r\n")  # the fourth literal of the command
        assert read_line(s) == b"a1 BAD Too many literals in one command\r\n"
        s.sendall(b"a2 NOOP\r\n")
        assert read_line(s) == b"a2 OK NOOP completed\r\n"


def test_imap_chained_literals_end_the_connection_at_the_command_limit(proxy: Controller) -> None:
    """The attack of issue 12: LITERAL+ literals chained without end before login."""
    link = b"x" * 250 + b" {250+}\r\n"
    with raw_connect(proxy, "imap") as s:
        read_line(s)
        s.sendall(b"a1 ID {250+}\r\n" + link * 2)  # the third literal passes 600 bytes
        bye = read_line(s)
        try:
            for _ in range(200):
                s.sendall(link)
            rest = read_until_closed(s)
        except (BrokenPipeError, ConnectionResetError):
            rest = b""  # closed while we were still sending: what the test wants
    assert bye == b"* BYE Command too long\r\n"
    assert rest == b""


def test_imap_login_on_plain_text_asks_for_no_literal_when_credentials_need_tls() -> None:
    with running_proxy(RecordingBackend(), allow_plaintext_from_loopback=False) as proxy:
        with raw_connect(proxy, "imap") as s:
            read_line(s)
            s.sendall(b"a1 LOGIN {16}\r\n")
            assert read_line(s).startswith(b"a1 NO [PRIVACYREQUIRED]")
            s.sendall(b"a2 LOGIN {16+}\r\nlit@example.test {3+}\r\npw!\r\n")
            assert read_until_closed(s).startswith(b"* BYE Use STARTTLS")


# ---- one connection before login ----------------------------------------------------------------
@pytest.mark.parametrize(
    "listener,noop,bye",
    [("imap", b"a NOOP\r\n", b"* BYE Too many commands"),
     ("pop3", b"NOOP\r\n", b"-ERR Too many commands"),
     ("submission", b"NOOP\r\n", b"421 4.7.0 Too many commands")],
)  # fmt: skip
def test_commands_before_login_are_counted(
    proxy: Controller, listener: str, noop: bytes, bye: bytes
) -> None:
    with raw_connect(proxy, listener) as s:
        read_line(s)
        s.sendall(noop * (LIMITS["max_prelogin_commands"] + 1))  # type: ignore[operator]
        answer = read_until_closed(s)
    assert answer.count(b"\r\n") == LIMITS["max_prelogin_commands"] + 1  # type: ignore[operator]
    assert bye in answer


@pytest.mark.parametrize(
    "listener,noop,bye",
    [("imap", b"a NOOP\r\n", b"* BYE Too long without logging in"),
     ("pop3", b"NOOP\r\n", b"-ERR Too long without logging in"),
     ("submission", b"NOOP\r\n", b"421 4.7.0 Too long without logging in")],
)  # fmt: skip
def test_a_noop_now_and_then_does_not_keep_a_connection_forever(
    listener: str, noop: bytes, bye: bytes
) -> None:
    with running_proxy(RecordingBackend(), idle_timeout_prelogin=1.5, prelogin_lifetime=2.5) as p:
        with raw_connect(p, listener) as s:
            started = time.monotonic()
            read_line(s)
            answer = b""
            try:
                while b"Too long" not in answer and time.monotonic() - started < 6:
                    s.sendall(noop)  # each well within the idle timeout
                    line = read_line(s)
                    if not line:
                        break
                    answer += line
                    time.sleep(0.5)
                answer += read_until_closed(s)
            except (BrokenPipeError, ConnectionResetError):
                pass
            lived = time.monotonic() - started
    assert bye in answer
    assert 2.4 < lived < 4


# ---- TLS handshakes ------------------------------------------------------------------------------
def test_connections_in_the_tls_handshake_count_against_the_limits() -> None:
    with running_proxy(RecordingBackend(), max_connections_per_ip=3) as proxy:
        silent = [raw_connect(proxy, name) for name in ("imaps", "pop3s", "smtps")]
        time.sleep(0.2)
        with raw_connect(proxy, "imap") as s:
            refused = read_until_closed(s)
        with raw_connect(proxy, "imaps") as s:
            closed_at_once = read_until_closed(s, timeout=2)
        silent.pop().close()
        time.sleep(0.3)
        with raw_connect(proxy, "imap") as s:
            greeting = read_line(s)
        for s in silent:
            s.close()
    assert refused.startswith(b"* BYE Too many connections")
    assert closed_at_once == b""  # no plain text on a TLS port
    assert greeting.startswith(b"* OK")


def test_global_limit_counts_handshakes_too() -> None:
    with running_proxy(RecordingBackend(), max_connections=2) as proxy:
        silent = [raw_connect(proxy, "imaps") for _ in range(2)]
        time.sleep(0.2)
        with raw_connect(proxy, "submission") as s:
            assert read_until_closed(s).startswith(b"421 4.7.0 Too many connections")
        for s in silent:
            s.close()


@pytest.mark.parametrize("listener", ["imaps", "pop3s", "smtps"])
def test_a_silent_tls_handshake_is_closed_after_the_handshake_timeout(listener: str) -> None:
    with running_proxy(RecordingBackend(), handshake_timeout=1.0) as proxy:
        with raw_connect(proxy, listener) as s:
            started = time.monotonic()
            assert read_until_closed(s, timeout=5) == b""
            waited = time.monotonic() - started
        # A real client still gets through.
        with socket.create_connection(("127.0.0.1", port(proxy, listener)), timeout=5) as raw:
            with client_tls().wrap_socket(raw) as tls:
                greeting = read_line(tls)
    assert 0.8 < waited < 3
    assert greeting[:1] in (b"*", b"+", b"2")


def test_starttls_handshake_has_the_same_timeout() -> None:
    with running_proxy(RecordingBackend(), handshake_timeout=1.0) as proxy:
        with raw_connect(proxy, "imap") as s:
            read_line(s)
            s.sendall(b"a STARTTLS\r\n")
            assert read_line(s).startswith(b"a OK")
            started = time.monotonic()
            read_until_closed(s, timeout=5)
            assert time.monotonic() - started < 3


def test_a_client_is_read_through_the_bounded_buffer_after_starttls_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The TLS transport STARTTLS makes reads into the shared pre-login buffer, as the plain one
    did (common.BoundedReads): the command sent over TLS arrives through it in clear."""
    seen: list[bytes] = []
    feed = BoundedReads.buffer_updated

    def recording(self: BoundedReads, nbytes: int) -> None:
        seen.append(bytes(self.buffer[:nbytes]))
        feed(self, nbytes)

    monkeypatch.setattr(BoundedReads, "buffer_updated", recording)
    with running_proxy(RecordingBackend(), listeners={"imap": "127.0.0.1:0"}) as proxy:
        with raw_connect(proxy, "imap") as s:
            read_line(s)
            s.sendall(b"a STARTTLS\r\n")
            assert read_line(s).startswith(b"a OK")
            with client_tls().wrap_socket(s) as tls:
                tls.sendall(b"b NOOP\r\n")
                assert read_line(tls) == b"b OK NOOP completed\r\n"
    assert b"b NOOP\r\n" in seen


@pytest.mark.parametrize("listener", ["imap", "imaps"])  # after STARTTLS, implicit TLS
def test_inside_tls_the_start_of_a_tls_record_is_not_taken_for_a_handshake(listener: str) -> None:
    """Over TLS a line may begin with the bytes of a TLS record header (0x16 0x03): the proxy
    waits for the rest of it (here until the idle timeout), it does not hang up as it does
    when a TLS handshake comes to a plain-text port."""
    with running_proxy(
        RecordingBackend(), listeners={listener: "127.0.0.1:0"}, idle_timeout_prelogin=1.0
    ) as proxy:
        with raw_connect(proxy, listener) as s:
            if listener == "imap":
                read_line(s)
                s.sendall(b"a STARTTLS\r\n")
                assert read_line(s).startswith(b"a OK")
            with client_tls().wrap_socket(s) as tls:
                if listener == "imaps":
                    read_line(tls)
                tls.sendall(b"\x16\x03")
                assert read_line(tls) == b"* BYE Idle timeout, closing connection\r\n"


def test_a_line_over_the_limit_is_answered_and_the_connection_closed() -> None:
    with running_proxy(RecordingBackend(), listeners={"imap": "127.0.0.1:0"}, max_line=64) as p:
        with raw_connect(p, "imap") as s:
            read_line(s)
            s.sendall(b"a NOOP " + b"x" * 100 + b"\r\n")
            assert read_until_closed(s) == b"* BYE Line too long\r\n"


def test_a_tls_handshake_on_a_plain_text_port_is_closed_at_once_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    with running_proxy(RecordingBackend(), listeners={"imap": "127.0.0.1:0"}) as proxy:
        with raw_connect(proxy, "imap") as s:
            read_line(s)
            s.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header
            assert read_until_closed(s, timeout=5) == b""  # well before the idle timeout
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "127.0.0.1: TLS handshake on a plain-text port, closing" in said


# ---- the listener key ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,group_may_read,refused",
    [(0o600, False, False), (0o640, False, True), (0o644, False, True),
     (0o640, True, False), (0o644, True, True)],
)  # fmt: skip
def test_listener_key_readable_by_others_is_refused_at_start(
    tmp_path: Path, mode: int, group_may_read: bool, refused: bool
) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(KEY, key)
    key.chmod(mode)
    settings = ProxySettings(
        listeners={"imaps": "127.0.0.1:0"},
        tls_cert=CERT,
        tls_key=str(key),
        tls_key_group_readable=group_may_read,
    )
    controller = Controller(RecordingBackend(), settings)
    if refused:
        with pytest.raises(PermissionError, match=r"readable by other users.*chmod 6[04]0"):
            controller.start()
        controller.stop()
    else:
        controller.start()
        controller.stop()


# ---- the process's open files ----------------------------------------------------------------
SQUEEZED = """
import logging, os, resource, sys, time
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from mailproxy import Controller, ProxySettings
from tests.helpers.proxy import RecordingBackend
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
settings = ProxySettings(listeners={{"imap": "127.0.0.1:0"}}, max_connections_per_ip=4096)
controller = Controller(RecordingBackend(), settings)
controller.start()
print(controller.max_connections, controller.listening["imap"][1], flush=True)
sys.stdin.readline()
# Leave room for 20 more descriptors only, as if something else had used the rest.
used = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
print("squeezed", flush=True)
sys.stdin.readline()
controller.stop()
print("errors", controller.errors, flush=True)
"""


def test_out_of_file_descriptors_pauses_accepting_with_one_log_line(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    with open(log, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", SQUEEZED.format(root=str(ROOT))],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert child.stdin is not None and child.stdout is not None
    held: list[socket.socket] = []
    try:
        limit, imap = (int(v) for v in child.stdout.readline().split())
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"squeezed\n"
        for _ in range(60):  # many more than fit: the kernel queues them
            held.append(socket.create_connection(("127.0.0.1", imap), timeout=5))
        time.sleep(2.5)  # a few backoff periods
        readable = select.select(held, [], [], 0)[0]
        greeted = sum(read_line(s).startswith(b"* OK") for s in readable)
        for s in held[:-1]:
            s.close()
        # The queued connections are taken once descriptors are free again.
        late = held[-1]
        late.settimeout(10)
        late_greeting = read_line(late)
        child.stdin.write(b"\n")
        child.stdin.flush()
        stopped = child.stdout.readline()
        child.wait(10)
    finally:
        for s in held:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait(10)
    output = log.read_text()
    assert limit == (128 - 42) // 2  # two descriptors a connection, a third kept in reserve
    assert "mail connections limited to 43 instead of 4096" in output
    assert 1 <= greeted <= 21
    assert late_greeting.startswith(b"* OK")
    assert output.count("not accepting mail connections for a moment") == 1, output
    assert "Too many open files" in output and "Traceback" not in output, output
    assert stopped == b"errors 0\n"


def test_tls_client_gets_through_a_crowd_of_refused_ones() -> None:
    with running_proxy(RecordingBackend(), max_connections_per_ip=2) as proxy:
        crowd = [raw_connect(proxy, "imaps") for _ in range(50)]
        for s in crowd[2:]:
            assert read_until_closed(s, timeout=3) == b""
        for s in crowd:
            s.close()
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port(proxy, "imaps")), timeout=5) as raw:
            with client_tls().wrap_socket(raw) as tls:
                assert read_line(tls).startswith(b"* OK")
