"""Login and relay against a scripted loopback IMAP upstream: token retry, SASL challenge,
upstream ending the session (as Gmail does at token expiry), idle timeout, metrics."""

from __future__ import annotations

import imaplib
import logging
import poplib
import re
import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from mailproxy import Controller, Endpoint
from tests.helpers.proxy import Account, RecordingBackend, port, raw_connect, running_proxy
from tests.helpers.upstreams import FakeIMAP, FakePOP3, FakeSMTP, sample


def login(proxy: Controller) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    m.login("carol@example.test", "pw")
    return m


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


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_upstream_closing_ends_the_relay_cleanly(
    proxy: Controller, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    before = sample("mailproxy_sessions_open", protocol="imap")
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
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "session of carol@example.test ended: 10 bytes in, 21 out" in said
    wait_until(lambda: sample("mailproxy_sessions_open", protocol="imap") == before)  # no wait


def test_bytes_either_side_sent_past_the_login_are_relayed_first(
    proxy: Controller, fake: FakeIMAP
) -> None:
    fake.auth_script = ["{tag} OK [CAPABILITY IMAP4rev1] Logged in", "* 3 EXISTS"]
    with raw_connect(proxy, "imap") as s:
        s.recv(1000)
        s.sendall(b"a LOGIN carol@example.test pw\r\nb NOOP\r\n")  # pipelined
        got = b""
        while got.count(b"\r\n") < 3:
            chunk = s.recv(1000)
            assert chunk, got
            got += chunk
    assert got == b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n* 3 EXISTS\r\nb OK NOOP done\r\n"


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_client_that_hangs_up_right_after_its_login_ends_the_session(
    backend: RecordingBackend, event_loop: str
) -> None:
    """The client's end of stream read during the login ends the relay at once (the upstream
    never answers SLOW; the idle timeout is half an hour), and the session is closed."""
    before = sample("mailproxy_sessions_open", protocol="imap")
    with running_proxy(backend, listeners={"imap": "127.0.0.1:0"}, event_loop=event_loop) as p:
        with raw_connect(p, "imap") as s:
            s.recv(1000)
            s.sendall(b"a LOGIN carol@example.test pw\r\nb SLOW\r\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(1000):  # the socket's 5 s timeout bounds the wait
                got += chunk
        assert got == b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
        wait_until(lambda: bool(backend.named("session_closed")))
        (closed,) = backend.named("session_closed")
        assert closed[1:] == (7, "imap", len(b"b SLOW\r\n"), 0)
        wait_until(lambda: sample("mailproxy_sessions_open", protocol="imap") == before)


def test_relayed_bytes_are_counted_under_the_sessions_protocol(
    proxy: Controller, backend: RecordingBackend
) -> None:
    into = sample("mailproxy_relayed_bytes_total", protocol="imap", direction="in")
    out = sample("mailproxy_relayed_bytes_total", protocol="imap", direction="out")
    m = login(proxy)
    m.noop()
    m.logout()
    wait_until(lambda: bool(backend.named("session_closed")))
    (closed,) = backend.named("session_closed")
    assert closed[3] > 0 and closed[4] > 0
    assert (
        sample("mailproxy_relayed_bytes_total", protocol="imap", direction="in") == into + closed[3]
    )
    assert (
        sample("mailproxy_relayed_bytes_total", protocol="imap", direction="out") == out + closed[4]
    )


@pytest.mark.parametrize("step", ["session_opened", "session_closed"])
def test_a_failing_session_bookkeeping_call_is_logged_and_the_session_goes_on(
    proxy: Controller, backend: RecordingBackend, caplog: pytest.LogCaptureFixture, step: str
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("database gone")

    setattr(backend, step, broken)
    m = login(proxy)
    assert m.noop()[0] == "OK"
    m.logout()
    wait_until(lambda: any(r.getMessage() == f"backend.{step} failed" for r in caplog.records))
    (failed,) = [r for r in caplog.records if r.getMessage() == f"backend.{step} failed"]
    assert failed.exc_info is not None and "database gone" in str(failed.exc_info[1])
    assert proxy.errors == 0


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


# ---- what counts as a rejected token -------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "shown"),
    [
        (["{tag} NO [ALERT] Too many simultaneous connections"], "Too many simultaneous"),
        (["{tag} NO [LIMIT] Too many logins"], "Too many logins"),
        (["{tag} NO [UNAVAILABLE] token service down"], "token service down"),
        (["* BYE Server shutting down"], "Server shutting down"),
    ],
)
def test_imap_refusal_other_than_the_token_is_unavailable(
    proxy: Controller, backend: RecordingBackend, fake: FakeIMAP, script: list[str], shown: str
) -> None:
    fake.auth_script = script
    with pytest.raises(imaplib.IMAP4.error, match=rf"\[UNAVAILABLE\] .*{shown}"):
        login(proxy)
    assert [c[2] for c in backend.named("access_token")] == [False]  # no forced refresh
    assert not backend.named("token_rejected")


@pytest.mark.parametrize(
    "script",
    [
        ["{tag} NO AUTHENTICATE failed."],  # Microsoft's words, no code
        ["{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"],
        ["+ eyJzdGF0dXMiOiI0MDEifQ==", "{tag} NO Whatever"],  # a failure challenge
    ],
)
def test_imap_token_refusals_mark_the_account(
    proxy: Controller, backend: RecordingBackend, fake: FakeIMAP, script: list[str]
) -> None:
    fake.auth_script = script
    with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHORIZATIONFAILED\] .*re-authorize"):
        login(proxy)
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    assert len(backend.named("token_rejected")) == 1


def test_imap_untagged_lines_before_the_tagged_ok(proxy: Controller, fake: FakeIMAP) -> None:
    fake.auth_script = [
        "* OK [ALERT] x",
        "* CAPABILITY IMAP4rev1 IDLE UIDPLUS",
        "* OK y",
        "* OK z",
        "{tag} OK Logged in",
    ]
    m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=5)
    typ, data = m.login("carol@example.test", "pw")
    assert typ == "OK" and b"[CAPABILITY IMAP4rev1 IDLE UIDPLUS]" in data[0]
    assert m.noop()[0] == "OK"
    m.logout()


# ---- no exception escapes a session ---------------------------------------------------------
def test_backend_error_in_access_token_is_a_temporary_refusal(
    proxy: Controller, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(acct: Account, force: bool) -> str:
        raise RuntimeError("token store on fire")

    caplog.set_level(logging.INFO, "mailproxy.imap")
    before = sample("mailproxy_logins_total", protocol="imap", result="unavailable")
    backend.token_source = broken
    with raw_connect(proxy, "imap") as s:
        s.recv(1000)
        s.sendall(b"a LOGIN carol@example.test pw\r\n")
        reply = s.recv(1000)
        assert reply.startswith(b"a NO [UNAVAILABLE] Internal error, try again later"), reply
        s.sendall(b"b NOOP\r\n")  # still usable
        assert s.recv(1000) == b"b OK NOOP completed\r\n"
    assert proxy.errors == 0
    assert sample("mailproxy_logins_total", protocol="imap", result="unavailable") == before + 1
    (failed,) = [
        r for r in caplog.records if r.getMessage() == "upstream login of account 7 failed"
    ]
    assert failed.exc_info is not None and "token store on fire" in str(failed.exc_info[1])
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "login refused for 'carol@example.test' from 127.0.0.1: unavailable" in said


def test_backend_error_in_token_rejected_is_a_temporary_refusal(
    proxy: Controller, backend: RecordingBackend
) -> None:
    def broken(account_id: int, protocol: str, detail: str) -> None:
        raise RuntimeError("database gone")

    backend.bad_tokens += ["stale", "stale-too"]
    backend.token_rejected = broken  # type: ignore[method-assign]
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Internal error"):
        login(proxy)
    assert proxy.errors == 0


# ---- POP3 upstream ---------------------------------------------------------------------------
def pop3_login(proxy: Controller) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=5)
    p.user("carol@example.test")
    p.pass_("pw")
    return p


def test_pop3_upstream_auth_is_two_step(proxy: Controller, fake_pop3: FakePOP3) -> None:
    p = pop3_login(proxy)
    assert p.stat() == (2, 320)
    p.quit()
    assert fake_pop3.one_line_auths == 0
    assert fake_pop3.payloads[-1] == "user=carol@example.test\x01auth=Bearer good\x01\x01"


def test_pop3_rejected_twice_marks_the_account(
    proxy: Controller, backend: RecordingBackend
) -> None:
    backend.bad_tokens += ["stale", "stale-too"]
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] .*re-authorize"):
        pop3_login(proxy)
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    (call,) = backend.named("token_rejected")
    assert "Authentication failed" in call[2] and '"status":"400"' in call[2]


@pytest.mark.parametrize(
    "line", ["-ERR [AUTH] Authentication failed.", "-ERR Auth failed: bad token"]
)
def test_pop3_token_refusal_without_challenge(
    proxy: Controller, backend: RecordingBackend, fake_pop3: FakePOP3, line: str
) -> None:
    fake_pop3.auth_script = [line]
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] .*re-authorize"):
        pop3_login(proxy)
    assert len(backend.named("token_rejected")) == 1


@pytest.mark.parametrize(
    "line", ["-ERR [SYS/PERM] Account locked", "-ERR [IN-USE] Mailbox busy", "-ERR Go away"]
)
def test_pop3_refusal_other_than_the_token_is_unavailable(
    proxy: Controller, backend: RecordingBackend, fake_pop3: FakePOP3, line: str
) -> None:
    fake_pop3.auth_script = [line]
    text = line.split(" ", 1)[1]
    with pytest.raises(poplib.error_proto, match=rf"-ERR \[SYS/TEMP\] .*{re.escape(text)}"):
        pop3_login(proxy)
    assert [c[2] for c in backend.named("access_token")] == [False]
    assert not backend.named("token_rejected")


# ---- SMTP upstream ---------------------------------------------------------------------------
def smtp_login(proxy: Controller) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=5)
    s.ehlo()
    s.esmtp_features["auth"] = "PLAIN"  # smtplib would try LOGIN after a failed PLAIN
    s.login("carol@example.test", "pw")
    return s


def test_smtp_login_and_relay(proxy: Controller, fake_smtp: FakeSMTP) -> None:
    s = smtp_login(proxy)
    assert s.noop()[0] == 250
    s.quit()


def test_smtp_rejected_twice_marks_the_account(
    proxy: Controller, backend: RecordingBackend
) -> None:
    backend.bad_tokens += ["stale", "stale-too"]
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp_login(proxy)
    assert err.value.smtp_code == 535 and b"re-authorize" in err.value.smtp_error
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    assert len(backend.named("token_rejected")) == 1


@pytest.mark.parametrize(
    "line",
    [
        "454 4.7.0 Too many login attempts",
        "421 4.7.0 Try again later, closing connection",
        "530 5.7.0 Must issue a STARTTLS command first",
        "550 5.7.1 Relaying denied",
    ],
)
def test_smtp_refusal_other_than_the_token_is_unavailable(
    proxy: Controller, backend: RecordingBackend, fake_smtp: FakeSMTP, line: str
) -> None:
    fake_smtp.auth_script = [line]
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp_login(proxy)
    assert err.value.smtp_code == 454
    assert line.encode() in err.value.smtp_error
    assert [c[2] for c in backend.named("access_token")] == [False]
    assert not backend.named("token_rejected")
