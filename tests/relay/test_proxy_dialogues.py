"""Each protocol before and at login, line by line as a client reads it: commands out of order,
cancelled and malformed authentication, capability lists that follow TLS and the loopback rule,
and upstream servers that answer oddly. The scripted upstreams of test_proxy_relay, no peers.

Written to kill the surviving mutants of mailproxy/{pop3,smtp,imap,session}.py (tests/MUTATION.md):
each reply a client acts on is checked as the client sees it."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from mailproxy import Controller, Endpoint, Grant, ProxyAuthError
from tests.helpers.proxy import (
    CERT,
    KEY,
    RecordingBackend,
    client_tls,
    raw_connect,
    running_proxy,
)
from tests.helpers.upstreams import sample

PLAIN_OK = base64.b64encode(b"\0carol@example.test\0pw").decode()


def lines(sock: socket.socket, n: int = 1) -> list[bytes]:
    """The next n lines the server sends, without their CRLF."""
    out: list[bytes] = []
    data = b""
    while len(out) < n:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"closed after {out!r} + {data!r}")
        data += chunk
        if data.endswith(b"\r\n"):
            out.append(data[:-2])
            data = b""
    return out


def line(sock: socket.socket) -> bytes:
    return lines(sock)[0]


def closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def ask(sock: socket.socket, command: bytes, n: int = 1) -> list[bytes]:
    sock.sendall(command + b"\r\n")
    return lines(sock, n)


# ---- POP3 before login -------------------------------------------------------------------------
def test_pop3_capabilities_name_stls_user_and_sasl_plain_on_a_loopback_plain_port(
    proxy: Controller,
) -> None:
    with raw_connect(proxy, "pop3") as s:
        assert line(s) == b"+OK Auth-Email POP3 proxy ready"
        s.sendall(b"CAPA\r\n")
        got = lines(s, 10)
        assert got == [
            b"+OK Capability list follows",
            b"TOP",
            b"UIDL",
            b"RESP-CODES",
            b"AUTH-RESP-CODE",
            b"STLS",
            b"USER",
            b"SASL PLAIN",
            b"IMPLEMENTATION Auth-Email",
            b".",
        ]
        assert ask(s, b"AUTH", 3) == [b"+OK Mechanisms follow", b"PLAIN", b"."]


def test_pop3_without_tls_off_loopback_offers_no_password_mechanism() -> None:
    with (
        running_proxy(
            RecordingBackend(),
            listeners={"pop3": "127.0.0.1:0"},
            allow_plaintext_from_loopback=False,
        ) as p,
        raw_connect(p, "pop3") as s,
    ):
        line(s)
        s.sendall(b"CAPA\r\n")
        caps = lines(s, 8)
        assert b"USER" not in caps and b"SASL PLAIN" not in caps and caps[-1] == b"."
        assert b"STLS" in caps
        assert ask(s, b"AUTH", 2) == [b"+OK Mechanisms follow", b"."]
        assert ask(s, b"AUTH PLAIN " + PLAIN_OK.encode()) == [
            b"-ERR [AUTH] Use STLS before logging in"
        ]
        assert ask(s, b"USER carol@example.test") == [b"-ERR [AUTH] Use STLS before logging in"]


def test_pop3_commands_out_of_order_are_refused_and_the_session_goes_on(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "pop3") as s:
        line(s)
        assert ask(s, b"PASS pw") == [b"-ERR USER first"]
        assert ask(s, b"USER   ") == [b"-ERR Missing user name"]
        assert ask(s, b"NOOP") == [b"-ERR Log in first"]
        assert ask(s, b"STAT") == [b"-ERR Unknown command or not valid before login"]
        assert ask(s, b"AUTH LOGIN") == [b"-ERR Only AUTH PLAIN is supported"]
        assert ask(s, b"AUTH PLAIN a b") == [b"-ERR Only AUTH PLAIN is supported"]
        assert ask(s, b"AUTH PLAIN !!!") == [b"-ERR Invalid SASL PLAIN response"]
        assert ask(s, b"AUTH PLAIN") == [b"+ "]
        assert ask(s, b"*") == [b"-ERR Authentication cancelled"]
        assert not backend.named("authenticate")
        assert ask(s, b"QUIT") == [b"+OK Bye"]
        assert closed(s)


def test_pop3_unknown_commands_use_up_the_budget_and_end_the_connection() -> None:
    with (
        running_proxy(
            RecordingBackend(), listeners={"pop3": "127.0.0.1:0"}, unknown_command_budget=2
        ) as p,
        raw_connect(p, "pop3") as s,
    ):
        line(s)
        assert ask(s, b"STAT") == [b"-ERR Unknown command or not valid before login"]
        assert ask(s, b"LIST", 2) == [
            b"-ERR Unknown command or not valid before login",
            b"-ERR Too many invalid commands",
        ]
        assert closed(s)


def test_pop3_user_name_is_trimmed_and_used_once(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "pop3") as s:
        line(s)
        assert ask(s, b"USER  carol@example.test  ") == [b"+OK Send the password"]
        assert ask(s, b"PASS wrong")[0].startswith(b"-ERR [AUTH] ")
        assert ask(s, b"PASS pw") == [b"-ERR USER first"]  # the name went with the failure
        assert ask(s, b"USER carol@example.test") == [b"+OK Send the password"]
        assert ask(s, b"PASS pw") == [b"+OK Logged in"]
    assert [c[2] for c in backend.named("authenticate")] == ["carol@example.test"] * 2


def test_pop3_a_name_or_password_that_is_not_utf8_is_refused_as_wrong_not_a_crash(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "pop3") as s:
        line(s)
        assert ask(s, b"USER carol@example.test") == [b"+OK Send the password"]
        assert ask(s, b"PASS p\xff\xfew")[0].startswith(b"-ERR [AUTH] ")
        assert ask(s, b"USER caro\xffl@example.test") == [b"+OK Send the password"]
        assert ask(s, b"PASS pw")[0].startswith(b"-ERR [AUTH] ")
        assert ask(s, b"NOOP") == [b"-ERR Log in first"]
    assert [c[2] for c in backend.named("authenticate")] == [
        "carol@example.test",
        "caro\ufffdl@example.test",
    ]
    assert proxy.errors == 0


@pytest.mark.parametrize("password", ["secret ", "secret\t", "secretX", "two words"])
def test_pop3_a_password_is_taken_whole_to_its_last_character(
    proxy: Controller, backend: RecordingBackend, password: str
) -> None:
    backend.accounts["carol@example.test"].password = password
    with raw_connect(proxy, "pop3") as s:
        line(s)
        assert ask(s, b"USER carol@example.test") == [b"+OK Send the password"]
        assert ask(s, b"PASS " + password.encode()) == [b"+OK Logged in"]


def test_pop3_auth_plain_in_lower_case_with_the_response_on_the_line_logs_in(
    proxy: Controller,
) -> None:
    with raw_connect(proxy, "pop3") as s:
        line(s)
        assert ask(s, b"auth plain " + PLAIN_OK.encode()) == [b"+OK Logged in"]
        assert ask(s, b"STAT") == [b"+OK 2 320"]


def test_pop3_stls_is_offered_once_and_not_on_the_tls_port() -> None:
    with running_proxy(RecordingBackend()) as p:
        with raw_connect(p, "pop3") as s:
            line(s)
            assert ask(s, b"STLS") == [b"+OK Begin TLS negotiation"]
            t = client_tls().wrap_socket(s)
            assert ask(t, b"STLS") == [b"-ERR STLS not available"]
            t.sendall(b"CAPA\r\n")
            assert b"STLS" not in lines(t, 9)
        with client_tls().wrap_socket(raw_connect(p, "pop3s")) as t:
            line(t)
            assert ask(t, b"STLS") == [b"-ERR STLS not available"]


# ---- scripted upstreams ------------------------------------------------------------------------
class Scripted:
    """An upstream mail server that sends `greeting`, then answers each line it reads with the
    next entry of `answers` (a list of lines; an empty list reads without answering; ``{tag}``
    stands for the first word of the line read, the IMAP tag). With `tls`, a line ending in
    STARTTLS is followed by a TLS handshake, and the lines read over TLS go to `secure` too.
    With `hang_up`, it closes each connection after its last answer instead of waiting for the
    proxy to."""

    def __init__(
        self,
        greeting: bytes,
        answers: list[list[bytes]],
        tls: ssl.SSLContext | None = None,
        hang_up: bool = False,
    ) -> None:
        self.greeting, self.answers, self.tls, self.hang_up = greeting, answers, tls, hang_up
        self.received: list[bytes] = []
        self.secure: list[bytes] = []
        self.hung_up = threading.Event()  # the proxy closed a connection
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), contextlib.ExitStack() as stack:
            stack.callback(lambda: conn.close())  # the proxy may reset it when done
            conn.sendall(self.greeting + b"\r\n")
            f = conn.makefile("rb")
            over_tls = False
            for answer in self.answers:
                got = f.readline()
                if not got:
                    return
                self.received.append(got.rstrip(b"\r\n"))
                if over_tls:
                    self.secure.append(got.rstrip(b"\r\n"))
                tag = got.split(b" ", 1)[0].strip()
                for a in answer:
                    conn.sendall(a.replace(b"{tag}", tag) + b"\r\n")
                if self.tls is not None and got.rstrip().upper().endswith(b" STARTTLS"):
                    conn = self.tls.wrap_socket(conn, server_side=True)
                    f = conn.makefile("rb")
                    over_tls = True
            if self.hang_up:
                f.close()
                conn.close()
            else:
                f.read()  # until the proxy closes
            self.hung_up.set()

    def close(self) -> None:
        self.srv.close()


@pytest.fixture
def scripted() -> Iterator[list[Scripted]]:
    made: list[Scripted] = []
    yield made
    for m in made:
        m.close()


def pop3_through(
    backend: RecordingBackend,
    scripted: list[Scripted],
    greeting: bytes,
    *answers: list[bytes],
    security: str = "plain",
) -> tuple[bytes, Scripted]:
    up = Scripted(greeting, list(answers))
    scripted.append(up)
    backend.accounts["carol@example.test"].upstreams = {
        "pop3": Endpoint("127.0.0.1", up.port, security)  # type: ignore[arg-type]
    }
    with (
        running_proxy(backend, listeners={"pop3": "127.0.0.1:0"}) as p,
        raw_connect(p, "pop3") as s,
    ):
        line(s)
        return ask(s, b"AUTH PLAIN " + PLAIN_OK.encode())[0], up


@pytest.mark.parametrize(
    ("greeting", "answers", "shown", "reason"),
    [
        (b"-ERR busy", [], b"mail server greeting: -ERR busy", "protocol"),
        (
            b"+OK hi",
            [[b"-ERR no XOAUTH2"]],
            b"mail server refused AUTH: -ERR no XOAUTH2",
            "refused",
        ),
        (b"+OK hi", [[b"+OK what?"]], b"mail server refused AUTH: +OK what?", "refused"),
        (
            b"+OK hi",
            [[b"+ "], [b"+ x"], [b"+ x"], [b"+ x"]],
            b"mail server did not finish authentication",
            "protocol",
        ),
        (
            b"+OK hi",
            [[b"+ "], [b"-ERR [IN-USE] busy"]],
            b"mail server: -ERR [IN-USE] busy",
            "refused",
        ),
    ],
)
def test_a_pop3_upstream_that_answers_out_of_protocol_is_a_temporary_refusal(
    backend: RecordingBackend,
    scripted: list[Scripted],
    greeting: bytes,
    answers: list[list[bytes]],
    shown: bytes,
    reason: str,
) -> None:
    before = sample("mailproxy_upstream_errors_total", protocol="pop3", reason=reason)
    reply, _ = pop3_through(backend, scripted, greeting, *answers)
    after = sample("mailproxy_upstream_errors_total", protocol="pop3", reason=reason)
    assert after == before + 1
    assert reply == b"-ERR [SYS/TEMP] " + shown
    assert not backend.named("token_rejected")


@pytest.mark.parametrize(
    "refusal", [b"-ERR [AUTH] Token expired", b"-ERR Authentication failed", b"-ERR auth failed"]
)
def test_a_pop3_refusal_naming_auth_counts_against_the_token(
    backend: RecordingBackend, scripted: list[Scripted], refusal: bytes
) -> None:
    reply, _ = pop3_through(backend, scripted, b"+OK hi", [b"+ "], [refusal])
    assert reply.startswith(b"-ERR [AUTH] ") and b"re-authorize" in reply
    (call,) = backend.named("token_rejected")
    assert call[2] == refusal.decode()


def test_a_pop3_upstream_refusing_stls_is_never_sent_the_token(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    before = sample("mailproxy_upstream_errors_total", protocol="pop3", reason="tls")
    reply, up = pop3_through(backend, scripted, b"+OK hi", [b"-ERR not today"], security="starttls")
    assert reply == b"-ERR [SYS/TEMP] mail server refused STLS: -ERR not today"
    assert set(up.received) == {b"STLS"}
    assert sample("mailproxy_upstream_errors_total", protocol="pop3", reason="tls") == before + 1


def test_pop3_upstream_auth_names_the_mechanism_and_sends_the_response_alone(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    reply, up = pop3_through(backend, scripted, b"+OK hi", [b"+ "], [b"+OK in"], [])
    assert reply == b"+OK Logged in"
    sasl = base64.b64encode(b"user=carol@example.test\x01auth=Bearer good\x01\x01")
    assert up.received[:2] == [b"AUTH XOAUTH2", sasl]


@pytest.mark.parametrize("lead", [b"+ ", b"+"], ids=["rfc5034", "no-space"])
def test_a_pop3_challenge_is_answered_empty_and_the_refusal_counts_against_the_token(
    backend: RecordingBackend, scripted: list[Scripted], lead: bytes
) -> None:
    """The challenge's JSON is read whether or not the server puts a space after the "+"."""
    challenge = base64.b64encode(b'{"status":"401"}')
    reply, up = pop3_through(
        backend,
        scripted,
        b"+OK hi",
        [b"+ "],
        [lead + challenge],
        [b"-ERR no"],
    )
    assert reply.startswith(b"-ERR [AUTH] ") and b"re-authorize" in reply
    assert up.received[2] == b""  # the empty answer to the challenge
    (call,) = backend.named("token_rejected")
    assert call[2] == '-ERR no {"status":"401"}'


# ---- SMTP submission before login --------------------------------------------------------------
def test_smtp_ehlo_lists_the_safe_extensions_starttls_and_auth_on_a_loopback_plain_port(
    proxy: Controller,
) -> None:
    with raw_connect(proxy, "submission") as s:
        assert line(s) == b"220 proxy.example.test ESMTP Auth-Email ready"
        assert ask(s, b"EHLO client.example", 7) == [
            b"250-proxy.example.test",
            b"250-SIZE",
            b"250-8BITMIME",
            b"250-SMTPUTF8",
            b"250-ENHANCEDSTATUSCODES",
            b"250-STARTTLS",
            b"250 AUTH PLAIN LOGIN",
        ]


def test_smtp_commands_before_auth_get_their_codes_and_the_session_goes_on(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "submission") as s:
        line(s)
        assert ask(s, b"AUTH PLAIN " + PLAIN_OK.encode()) == [b"503 5.5.1 Send EHLO first"]
        assert ask(s, b"EHLO") == [b"501 5.5.4 Syntax: EHLO hostname"]
        assert ask(s, b"HELO") == [b"501 5.5.4 Syntax: HELO hostname"]
        assert ask(s, b"AUTH PLAIN " + PLAIN_OK.encode()) == [b"503 5.5.1 Send EHLO first"]
        assert ask(s, b"HELO client.example") == [b"250 proxy.example.test"]
        assert ask(s, b"NOOP") == [b"250 2.0.0 OK"]
        assert ask(s, b"RSET") == [b"250 2.0.0 OK"]
        assert ask(s, b"VRFY carol") == [b"252 2.5.0 Cannot VRFY user"]
        assert ask(s, b"HELP") == [b"214 2.0.0 Log in with AUTH, then send mail"]
        assert ask(s, b"RCPT TO:<a@example.test>") == [b"530 5.7.0 Authentication required"]
        assert ask(s, b"STAT") == [b"500 5.5.2 Command not recognized"]
        assert ask(s, b"AUTH") == [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"]
        assert ask(s, b"AUTH PLAIN a b") == [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"]
        assert ask(s, b"AUTH CRAM-MD5") == [b"504 5.5.4 Unrecognized authentication type"]
        assert ask(s, b"AUTH PLAIN !!!") == [b"501 5.5.2 Cannot decode the response"]
        assert ask(s, b"AUTH LOGIN !!!") == [b"334 UGFzc3dvcmQ6"]
        assert ask(s, b"cHc=") == [b"501 5.5.2 Cannot decode the response"]
        assert ask(s, b"AUTH LOGIN " + base64.b64encode(b"carol@example.test")) == [
            b"334 UGFzc3dvcmQ6"
        ]
        assert ask(s, b"cHc=!") == [b"501 5.5.2 Cannot decode the response"]  # "pw" and a "!"
        assert ask(s, b"AUTH PLAIN") == [b"334 "]
        assert ask(s, b"*") == [b"501 5.7.0 Authentication cancelled"]
        assert ask(s, b"AUTH LOGIN") == [b"334 VXNlcm5hbWU6"]
        assert ask(s, b"*") == [b"501 5.7.0 Authentication cancelled"]
        assert ask(s, b"AUTH LOGIN") == [b"334 VXNlcm5hbWU6"]
        assert ask(s, base64.b64encode(b"carol@example.test")) == [b"334 UGFzc3dvcmQ6"]
        assert ask(s, b"*") == [b"501 5.7.0 Authentication cancelled"]
        assert not backend.named("authenticate")
        assert ask(s, b"QUIT") == [b"221 2.0.0 Bye"]
        assert closed(s)


def test_smtp_unknown_commands_use_up_the_budget_and_end_the_connection() -> None:
    with (
        running_proxy(
            RecordingBackend(), listeners={"submission": "127.0.0.1:0"}, unknown_command_budget=2
        ) as p,
        raw_connect(p, "submission") as s,
    ):
        line(s)
        assert ask(s, b"STAT") == [b"500 5.5.2 Command not recognized"]
        assert ask(s, b"MAIL FROM:<a@example.test>", 2) == [
            b"530 5.7.0 Authentication required",
            b"421 4.7.0 Too many invalid commands",
        ]
        assert closed(s)


@pytest.mark.parametrize(
    "dialogue",
    [
        [b"auth plain", b"334 ", PLAIN_OK.encode()],
        [b"AUTH LOGIN", b"334 VXNlcm5hbWU6", base64.b64encode(b"carol@example.test"),
         b"334 UGFzc3dvcmQ6", base64.b64encode(b"pw")],
        [b"auth login " + base64.b64encode(b"carol@example.test"), b"334 UGFzc3dvcmQ6",
         base64.b64encode(b"pw")],
    ],
)  # fmt: skip
def test_smtp_auth_plain_and_login_in_two_steps_log_in(
    proxy: Controller, backend: RecordingBackend, dialogue: list[bytes]
) -> None:
    with raw_connect(proxy, "submission") as s:
        line(s)
        ask(s, b"EHLO client.example", 7)
        for command, reply in zip(dialogue[::2], dialogue[1::2], strict=False):
            assert ask(s, command) == [reply]
        assert ask(s, dialogue[-1]) == [b"235 2.7.0 Authentication successful"]
        assert ask(s, b"NOOP") == [b"250 OK"]  # the fake upstream's answer
    assert [c[2:] for c in backend.named("authenticate")] == [("carol@example.test", "127.0.0.1")]


def test_smtp_starttls_asks_for_a_new_ehlo_and_is_not_offered_twice(proxy: Controller) -> None:
    with raw_connect(proxy, "submission") as s:
        line(s)
        ask(s, b"EHLO client.example", 7)
        assert ask(s, b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
        t = client_tls().wrap_socket(s)
        assert ask(t, b"AUTH PLAIN " + PLAIN_OK.encode()) == [b"503 5.5.1 Send EHLO first"]
        ehlo = ask(t, b"EHLO client.example", 6)
        assert b"250-STARTTLS" not in ehlo and ehlo[-1] == b"250 AUTH PLAIN LOGIN"
        assert ask(t, b"STARTTLS") == [b"454 4.7.0 TLS not available"]


def test_smtp_without_tls_off_loopback_asks_for_starttls_before_auth() -> None:
    with (
        running_proxy(
            RecordingBackend(),
            listeners={"submission": "127.0.0.1:0"},
            allow_plaintext_from_loopback=False,
        ) as p,
        raw_connect(p, "submission") as s,
    ):
        line(s)
        ehlo = ask(s, b"EHLO client.example", 6)
        assert ehlo[-1] == b"250 STARTTLS"
        assert ask(s, b"AUTH PLAIN") == [b"530 5.7.0 Must issue a STARTTLS command first"]


# ---- SMTP upstream -----------------------------------------------------------------------------
def smtp_through(
    backend: RecordingBackend,
    scripted: list[Scripted],
    greeting: bytes,
    *answers: list[bytes],
    security: str = "plain",
) -> tuple[bytes, Scripted]:
    up = Scripted(greeting, list(answers))
    scripted.append(up)
    backend.accounts["carol@example.test"].upstreams = {
        "smtp": Endpoint("127.0.0.1", up.port, security)  # type: ignore[arg-type]
    }
    with (
        running_proxy(backend, listeners={"submission": "127.0.0.1:0"}) as p,
        raw_connect(p, "submission") as s,
    ):
        line(s)
        ask(s, b"EHLO client.example", 7)
        return ask(s, b"AUTH PLAIN " + PLAIN_OK.encode())[0], up


EHLO_OK = [b"250-up.example", b"250 AUTH XOAUTH2"]


@pytest.mark.parametrize(
    ("greeting", "answers", "shown", "reason"),
    [
        (b"554 go away", [], b"mail server greeting: 554 go away", "protocol"),
        (b"hi", [], b"mail server: hi", "protocol"),
        (b"22", [], b"mail server: 22", "protocol"),
        (b"220 hi", [[b"502 no EHLO"]], b"mail server refused EHLO: 502 no EHLO", "protocol"),
        (b"220 hi", [[b"250-x"] * 100], b"mail server sent too many lines", "protocol"),
        (b"220 hi", [EHLO_OK, [b"454 4.7.0 later"]], b"mail server: 454 4.7.0 later", "refused"),
        (b"220 hi", [EHLO_OK, [b"334 x"], [b"334 x"], [b"334 x"]],
         b"mail server did not finish authentication", "protocol"),
    ],
)  # fmt: skip
def test_an_smtp_upstream_that_answers_out_of_protocol_is_a_temporary_refusal(
    backend: RecordingBackend,
    scripted: list[Scripted],
    greeting: bytes,
    answers: list[list[bytes]],
    shown: bytes,
    reason: str,
) -> None:
    before = sample("mailproxy_upstream_errors_total", protocol="smtp", reason=reason)
    reply, _ = smtp_through(backend, scripted, greeting, *answers)
    after = sample("mailproxy_upstream_errors_total", protocol="smtp", reason=reason)
    assert after == before + 1
    assert reply == b"454 4.7.0 " + shown
    assert not backend.named("token_rejected")


def test_an_smtp_upstream_refusing_starttls_is_never_sent_the_token(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    before = sample("mailproxy_upstream_errors_total", protocol="smtp", reason="tls")
    reply, up = smtp_through(
        backend, scripted, b"220 hi", EHLO_OK, [b"454 4.7.0 no TLS today"], security="starttls"
    )
    assert reply == b"454 4.7.0 mail server refused STARTTLS: 454 4.7.0 no TLS today"
    assert up.received == [b"EHLO proxy.example.test", b"STARTTLS"]
    assert sample("mailproxy_upstream_errors_total", protocol="smtp", reason="tls") == before + 1


def test_smtp_upstream_greeting_and_ehlo_may_span_lines_and_auth_carries_the_initial_response(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    reply, up = smtp_through(
        backend,
        scripted,
        b"220-up.example\r\n220 ready",
        [b"250-up.example", b"250-SIZE", b"250 AUTH XOAUTH2"],
        [b"235 2.7.0 ok"],
        [],
    )
    assert reply == b"235 2.7.0 Authentication successful"
    sasl = base64.b64encode(b"user=carol@example.test\x01auth=Bearer good\x01\x01")
    assert up.received[:2] == [b"EHLO proxy.example.test", b"AUTH XOAUTH2 " + sasl]


def test_smtp_upstream_replies_of_a_bare_code_are_whole_replies(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    reply, up = smtp_through(backend, scripted, b"220", [b"250"], [b"235"], [])
    assert reply == b"235 2.7.0 Authentication successful"
    assert up.received[0] == b"EHLO proxy.example.test"


def test_an_smtp_challenge_is_answered_empty_and_any_refusal_counts_against_the_token(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    challenge = base64.b64encode(b'{"status":"401"}')
    reply, up = smtp_through(
        backend, scripted, b"220 hi", EHLO_OK, [b"334 " + challenge], [b"454 4.7.0 no"]
    )
    assert reply.startswith(b"535 5.7.8 ") and b"re-authorize" in reply
    assert up.received[2] == b""
    (call,) = backend.named("token_rejected")
    assert call[2] == '454 4.7.0 no {"status":"401"}'


def test_an_smtp_535_without_a_challenge_counts_against_the_token_in_the_servers_words(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    reply, up = smtp_through(backend, scripted, b"220 hi", EHLO_OK, [b"535 5.7.8 bad token"])
    assert reply.startswith(b"535 5.7.8 ") and b"re-authorize" in reply
    assert [c[2] for c in backend.named("upstream_refused")] == ["535 5.7.8 bad token"]
    (call,) = backend.named("token_rejected")
    assert call[2] == "535 5.7.8 bad token"  # nothing added: no challenge came


class PolicyBackend(RecordingBackend):
    """Records smtp_auth_refused and deliver; a policy refusal switches the account to
    ``deliver`` when `switch` is set (as Microsoft Graph mode does)."""

    switch = True

    def smtp_auth_refused(self, account_id: int, detail: str) -> Grant | None:
        with self.lock:
            self.calls.append(("smtp_auth_refused", account_id, detail))
        if not self.switch:
            return None
        acct = self._by_id(account_id)
        return Grant(acct.account_id, acct.address, acct.upstreams["smtp"], "XOAUTH2", True, 1000)

    def deliver(self, account_id: int, sender: str, recipients: list[str], message: bytes) -> str:
        with self.lock:
            self.calls.append(("deliver", account_id, sender, recipients, message))
        return "2.0.0 sent through the backend"


def policy_backend(backend: RecordingBackend, switch: bool) -> PolicyBackend:
    policy = PolicyBackend(accounts=backend.accounts, token_source=backend.token_source)
    policy.switch = switch
    return policy


POLICY = b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"


def test_an_smtp_policy_refusal_switched_to_delivery_hangs_up_and_takes_the_mail_itself(
    backend: RecordingBackend, scripted: list[Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.smtp")
    ok_before = sample("mailproxy_logins_total", protocol="smtp", result="ok")
    policy = policy_backend(backend, switch=True)
    up = Scripted(b"220 hi", [EHLO_OK, [POLICY]])
    scripted.append(up)
    policy.accounts["carol@example.test"].upstreams["smtp"] = Endpoint(
        "127.0.0.1", up.port, "plain"
    )
    with (
        running_proxy(policy, listeners={"submission": "127.0.0.1:0"}) as p,
        raw_connect(p, "submission") as s,
    ):
        line(s)
        ask(s, b"EHLO client.example", 7)
        assert ask(s, b"AUTH PLAIN " + PLAIN_OK.encode()) == [
            b"235 2.7.0 Authentication successful"
        ]
        assert up.hung_up.wait(5)  # the refused upstream session is closed at once
        assert ask(s, b"MAIL FROM:<carol@example.test>") == [b"250 2.1.0 Sender OK"]
        assert ask(s, b"RCPT TO:<dan@example.test>") == [b"250 2.1.5 Recipient OK"]
        assert ask(s, b"DATA")[0].startswith(b"354 ")
        assert ask(s, b"Subject: hi\r\n\r\nbody\r\n.")[0].startswith(b"250 ")
        assert ask(s, b"QUIT") == [b"221 2.0.0 Bye"]
        assert closed(s)  # the session ends with the mail transactions
    (refused,) = policy.named("smtp_auth_refused")
    assert refused[1:] == (7, "mail server: " + POLICY.decode())
    (sent,) = policy.named("deliver")
    assert sent[1:4] == (7, "carol@example.test", ["dan@example.test"])
    assert not policy.named("token_rejected") and not policy.named("upstream_refused")
    assert [c[2] for c in policy.named("access_token")] == [False]  # no refresh for a policy
    assert sample("mailproxy_logins_total", protocol="smtp", result="ok") == ok_before + 1
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.smtp"]
    assert "login carol@example.test from 127.0.0.1, mail goes to the backend" in said


class DeliveringBackend(PolicyBackend):
    """Every SMTP login's grant is marked ``deliver`` (a mailbox in Microsoft Graph mode)."""

    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        grant = super().authenticate(protocol, address, password, client_ip)
        return dataclasses.replace(grant, deliver=True, max_message=1000)


def test_an_smtp_login_whose_grant_delivers_takes_the_mail_without_an_upstream_or_token(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    delivering = DeliveringBackend(accounts=backend.accounts, token_source=backend.token_source)
    up = Scripted(b"220 hi", [EHLO_OK, [b"235 2.7.0 ok"]])
    scripted.append(up)
    backend.accounts["carol@example.test"].upstreams["smtp"] = Endpoint(
        "127.0.0.1", up.port, "plain"
    )
    with (
        running_proxy(delivering, listeners={"submission": "127.0.0.1:0"}) as p,
        raw_connect(p, "submission") as s,
    ):
        line(s)
        ask(s, b"EHLO client.example", 7)
        assert ask(s, b"AUTH PLAIN " + PLAIN_OK.encode()) == [
            b"235 2.7.0 Authentication successful"
        ]
        assert ask(s, b"MAIL FROM:<carol@example.test>") == [b"250 2.1.0 Sender OK"]
        assert ask(s, b"RCPT TO:<dan@example.test>") == [b"250 2.1.5 Recipient OK"]
        assert ask(s, b"DATA")[0].startswith(b"354 ")
        assert ask(s, b"Subject: hi\r\n\r\nbody\r\n.")[0].startswith(b"250 ")
        assert ask(s, b"QUIT") == [b"221 2.0.0 Bye"]
    (sent,) = delivering.named("deliver")
    assert sent[1:4] == (7, "carol@example.test", ["dan@example.test"])
    assert not delivering.named("access_token") and up.received == []


def test_an_smtp_policy_refusal_without_delivery_is_refused_with_the_servers_words(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    policy = policy_backend(backend, switch=False)
    before = sample("mailproxy_upstream_errors_total", protocol="smtp", reason="policy")
    reply, _ = smtp_through(policy, scripted, b"220 hi", EHLO_OK, [POLICY])
    assert reply == b"454 4.7.0 mail server: " + POLICY
    assert sample("mailproxy_upstream_errors_total", protocol="smtp", reason="policy") == before + 1
    assert len(policy.named("smtp_auth_refused")) == 1
    assert not policy.named("deliver") and not policy.named("token_rejected")


# ---- IMAP before login -------------------------------------------------------------------------
CAPS = b"IMAP4rev1 SASL-IR LITERAL+ ID IDLE ENABLE STARTTLS AUTH=PLAIN"


def test_imap_greeting_and_capability_name_starttls_and_auth_plain_on_a_loopback_plain_port(
    proxy: Controller,
) -> None:
    with raw_connect(proxy, "imap") as s:
        assert line(s) == b"* OK [CAPABILITY " + CAPS + b"] Auth-Email IMAP proxy ready"
        assert ask(s, b"a CAPABILITY", 2) == [b"* CAPABILITY " + CAPS, b"a OK CAPABILITY completed"]
        assert ask(s, b"b NOOP") == [b"b OK NOOP completed"]
        assert ask(s, b"c ID NIL", 2) == [b'* ID ("name" "Auth-Email")', b"c OK ID completed"]
        assert ask(s, b"d LOGOUT", 2) == [b"* BYE Logging out", b"d OK LOGOUT completed"]
        assert closed(s)


def test_imap_commands_before_login_are_refused_by_tag_and_the_session_goes_on(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"+ NOOP") == [b"* BAD Invalid tag or command"]
        assert ask(s, b"a{ NOOP") == [b"* BAD Invalid tag or command"]
        assert ask(s, b"t" * 65 + b" NOOP") == [b"* BAD Invalid tag or command"]
        assert ask(s, b"t" * 64 + b" NOOP") == [b"t" * 64 + b" OK NOOP completed"]
        assert ask(s, b"a FOO") == [b"a BAD Unknown command"]
        assert ask(s, b"b select INBOX") == [b"b BAD Log in first"]
        assert ask(s, b"c LOGIN carol@example.test") == [b"c BAD Invalid arguments"]
        assert ask(s, b"d LOGIN a b c") == [b"d BAD Invalid arguments"]
        assert ask(s, b"e LOGIN (a) b") == [b"e BAD Invalid arguments"]
        assert ask(s, b'f LOGIN "carol@example.test pw') == [b"f BAD Invalid arguments"]
        assert ask(s, b"g LOGIN {x}", 2) == [
            b"g BAD Invalid arguments",
            b"* BYE Too many invalid commands",  # the tenth
        ]
    with raw_connect(proxy, "imap") as s:  # a new budget of bad commands
        line(s)
        assert ask(s, b"h AUTHENTICATE") == [b"h BAD Invalid arguments"]
        assert ask(s, b"i AUTHENTICATE PLAIN a b") == [b"i BAD Invalid arguments"]
        assert ask(s, b"j AUTHENTICATE LOGIN") == [
            b"j NO [CANNOT] Only AUTHENTICATE PLAIN is supported"
        ]
        assert ask(s, b"k AUTHENTICATE PLAIN !!!") == [b"k BAD Invalid SASL PLAIN response"]
        assert ask(s, b"l AUTHENTICATE PLAIN") == [b"+ "]
        assert ask(s, b"*") == [b"l BAD Authentication cancelled"]
        assert not backend.named("authenticate")
        assert ask(s, b"m NOOP") == [b"m OK NOOP completed"]


def test_imap_bad_commands_use_up_the_budget_and_end_the_connection() -> None:
    with running_proxy(
        RecordingBackend(), listeners={"imap": "127.0.0.1:0"}, unknown_command_budget=3
    ) as p:
        for bad in (b"+ NOOP", b"a FOO", b"a LOGIN x", b"a LOGIN {99999}"):
            with raw_connect(p, "imap") as s:
                line(s)
                s.sendall((bad + b"\r\n") * 3)
                got = lines(s, 4)
                assert got[-1] == b"* BYE Too many invalid commands", (bad, got)
                assert closed(s)


@pytest.mark.parametrize(
    ("login", "args"),
    [
        (b'a LOGIN "car\\ol@example.test" "pw"', None),
        (b"a LOGIN {18}", [b"carol@example.test {2}", b"pw"]),
        (b"a LOGIN {18+}", [b"carol@example.test {2+}", b"pw"]),
        (b"a authenticate plain " + PLAIN_OK.encode(), None),
        (b"a AUTHENTICATE PLAIN", [PLAIN_OK.encode()]),
    ],
)
def test_imap_logins_in_every_form_reach_the_upstream_and_answer_with_its_capabilities(
    proxy: Controller, backend: RecordingBackend, login: bytes, args: list[bytes] | None
) -> None:
    with raw_connect(proxy, "imap") as s:
        line(s)
        s.sendall(login + b"\r\n")
        for arg in args or []:
            if not login.endswith(b"+}") and not arg.startswith(b"carol"):
                assert line(s) == b"+ Ready for literal data" or login.endswith(b"PLAIN")
            elif not login.endswith(b"+}"):
                assert line(s) == b"+ Ready for literal data"
            s.sendall(arg + (b"\r\n" if not arg.endswith(b"}") else b"\r\n"))
        assert line(s) == b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"
    assert [c[2] for c in backend.named("authenticate")] == ["carol@example.test"]


@pytest.mark.parametrize(
    ("setting", "value", "command", "why"),
    [
        ("max_literal", 4, b"a LOGIN {5}", b"Literal too large"),
        ("max_literals_per_command", 1, b"a ID ({1}", b"Too many literals in one command"),
        ("max_literal_bytes_per_command", 4, b"a ID ({3}", b"Command too long"),
    ],
)
def test_imap_literals_are_bounded_in_size_number_and_sum(
    setting: str, value: int, command: bytes, why: bytes
) -> None:
    with (
        running_proxy(
            RecordingBackend(), listeners={"imap": "127.0.0.1:0"}, **{setting: value}
        ) as p,
        raw_connect(p, "imap") as s,
    ):
        line(s)
        s.sendall(command + b"\r\n")
        if command.endswith(b"({1}") or command.endswith(b"({3}"):
            assert line(s) == b"+ Ready for literal data"
            s.sendall(b"x" * int(command[-2:-1]) + b" {2}\r\n")
        assert line(s) == b"a BAD " + why
        assert ask(s, b"b NOOP") == [b"b OK NOOP completed"]


def test_imap_literals_of_exactly_the_limits_are_taken() -> None:
    settings = {"max_literal": 4, "max_literal_bytes_per_command": 6}
    with (
        running_proxy(RecordingBackend(), listeners={"imap": "127.0.0.1:0"}, **settings) as p,
        raw_connect(p, "imap") as s,
    ):
        line(s)
        assert ask(s, b"a LOGIN {4}") == [b"+ Ready for literal data"]
        assert ask(s, b"abcd {2}") == [b"+ Ready for literal data"]  # 6 bytes in all
        assert ask(s, b"pw") == [b"a NO [AUTHENTICATIONFAILED] Invalid address or password"]


def test_imap_quoted_strings_end_at_their_closing_quote_never_at_an_escape(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "imap") as s:
        line(s)
        # An escaped quote at the end of the line leaves the string open.
        assert ask(s, b'a LOGIN carol@example.test "pw\\"') == [b"a BAD Invalid arguments"]
        assert ask(s, b'b LOGIN carol@example.test "pw\\') == [b"b BAD Invalid arguments"]
        assert ask(s, b"c NOOP") == [b"c OK NOOP completed"]
    assert not backend.named("authenticate")


def test_imap_login_arguments_are_read_as_sent(
    proxy: Controller, backend: RecordingBackend
) -> None:
    wrong = b"NO [AUTHENTICATIONFAILED] Invalid address or password"
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"a LOGIN {18}") == [b"+ Ready for literal data"]
        assert ask(s, b"carol@example.test pwX") == [b"a " + wrong]  # not "pw"
        assert ask(s, b"b LOGIN Xavier@example.test pw") == [b"b " + wrong]
        assert ask(s, b"c LOGIN ( )", 2) == [b"c " + wrong, b"* BYE Too many failed logins"]
        assert closed(s)
    with raw_connect(proxy, "imap") as s:  # the last character of a line is its own too
        line(s)
        assert ask(s, b"d LOGIN carol@example.test pwX") == [b"d " + wrong]
        assert ask(s, b"e LOGIN carol@example.test pw\t") == [b"e " + wrong]
    addresses = [c[2] for c in backend.named("authenticate")]
    assert (
        addresses == ["carol@example.test", "Xavier@example.test", "("] + ["carol@example.test"] * 2
    )


def test_imap_bytes_that_are_not_ascii_or_utf8_are_refused_not_a_crash(
    proxy: Controller, backend: RecordingBackend
) -> None:
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"a N\xc3\xa9OOP") == [b"a BAD Unknown command"]
        assert ask(s, b'b LOGIN carol@example.test "p\xffw"') == [
            b"b NO [AUTHENTICATIONFAILED] Invalid address or password"
        ]
        assert ask(s, b"c NOOP") == [b"c OK NOOP completed"]
    assert [c[2] for c in backend.named("authenticate")] == ["carol@example.test"]


def test_imap_without_tls_off_loopback_refuses_logins_before_any_literal() -> None:
    with running_proxy(
        RecordingBackend(), listeners={"imap": "127.0.0.1:0"}, allow_plaintext_from_loopback=False
    ) as p:
        with raw_connect(p, "imap") as s:
            caps = b"IMAP4rev1 SASL-IR LITERAL+ ID IDLE ENABLE STARTTLS LOGINDISABLED"
            assert line(s).startswith(b"* OK [CAPABILITY " + caps + b"]")
            assert ask(s, b"a LOGIN x {3}") == [
                b"a NO [PRIVACYREQUIRED] Use STARTTLS before logging in"
            ]
            assert ask(s, b"b AUTHENTICATE PLAIN") == [
                b"b NO [PRIVACYREQUIRED] Use STARTTLS before logging in"
            ]
            assert ask(s, b"c LOGIN x {3+}") == [b"* BYE Use STARTTLS before logging in"]
            assert closed(s)


def test_imap_starttls_is_offered_once(proxy: Controller) -> None:
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"a STARTTLS") == [b"a OK Begin TLS negotiation now"]
        t = client_tls().wrap_socket(s)
        assert (
            ask(t, b"b CAPABILITY", 2)[0]
            == b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE ENABLE AUTH=PLAIN"
        )
        assert ask(t, b"c STARTTLS") == [b"c BAD STARTTLS not available"]


# ---- IMAP upstream -----------------------------------------------------------------------------
def imap_through(
    backend: RecordingBackend,
    scripted: list[Scripted],
    greeting: bytes,
    *answers: list[bytes],
    security: str = "plain",
    tls: ssl.SSLContext | None = None,
) -> tuple[bytes, Scripted]:
    up = Scripted(greeting, list(answers), tls)
    scripted.append(up)
    backend.accounts["carol@example.test"].upstreams = {
        "imap": Endpoint("127.0.0.1", up.port, security)  # type: ignore[arg-type]
    }
    trusted = {"upstream_ca_file": CERT} if tls is not None else {}
    with (
        running_proxy(backend, listeners={"imap": "127.0.0.1:0"}, **trusted) as p,
        raw_connect(p, "imap") as s,
    ):
        line(s)
        return ask(s, b"a LOGIN carol@example.test pw")[0], up


@pytest.mark.parametrize(
    ("greeting", "answers", "shown", "reason"),
    [
        (b"* NO go away", [], b"mail server greeting: * NO go away", "protocol"),
        (b"* ok hi", [[b"* BYE  shutting down"]], b"mail server: shutting down", "refused"),
        (
            b"* OK hi",
            [[b"* NOTE x"] * 100],
            b"mail server did not finish authentication",
            "protocol",
        ),
        (b"* OK hi", [[b"{tag} NO [LIMIT] busy"]], b"mail server: NO [LIMIT] busy", "refused"),
    ],
)
def test_an_imap_upstream_that_answers_out_of_protocol_is_a_temporary_refusal(
    backend: RecordingBackend,
    scripted: list[Scripted],
    caplog: pytest.LogCaptureFixture,
    greeting: bytes,
    answers: list[list[bytes]],
    shown: bytes,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    before = sample("mailproxy_upstream_errors_total", protocol="imap", reason=reason)
    reply, up = imap_through(backend, scripted, greeting, *answers)
    after = sample("mailproxy_upstream_errors_total", protocol="imap", reason=reason)
    assert after == before + 1
    assert reply == b"a NO [UNAVAILABLE] " + shown
    assert not backend.named("token_rejected")
    # A new (not pooled) connection is not tried again.
    assert len([r for r in up.received if b"AUTHENTICATE" in r]) <= 1
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert f"upstream for carol@example.test unavailable: {shown.decode()}" in said
    assert "login refused for 'carol@example.test' from 127.0.0.1: unavailable" in said


@pytest.mark.parametrize(
    ("answers", "shown", "reason"),
    [
        ([[b"{tag} NO not now"]], b"mail server refused STARTTLS: P1 NO not now", "tls"),
        ([[b"* BYE  bye"]], b"mail server: bye", "protocol"),
        ([[b"* x"] * 1001], b"mail server sent too many lines", "protocol"),
        (  # a thousand untagged lines are still read to the tagged answer
            [[b"* x"] * 1000 + [b"{tag} NO not now"]],
            b"mail server refused STARTTLS: P1 NO not now",
            "tls",
        ),
    ],
)
def test_an_imap_upstream_refusing_starttls_is_never_sent_the_token(
    backend: RecordingBackend,
    scripted: list[Scripted],
    answers: list[list[bytes]],
    shown: bytes,
    reason: str,
) -> None:
    before = sample("mailproxy_upstream_errors_total", protocol="imap", reason=reason)
    reply, up = imap_through(backend, scripted, b"* OK hi", *answers, security="starttls")
    assert sample("mailproxy_upstream_errors_total", protocol="imap", reason=reason) > before
    assert reply == b"a NO [UNAVAILABLE] " + shown
    assert set(up.received) == {b"P1 STARTTLS"}  # each attempt stops before the token


@pytest.mark.parametrize(
    ("answers", "caps"),
    [
        ([[b"* capability IMAP4rev1 MOVE", b"{tag} OK done"]], b"IMAP4rev1 MOVE"),
        ([[b"{tag} ok [capability IMAP4rev1 UIDPLUS] done"]], b"IMAP4rev1 UIDPLUS"),
        ([[b"{tag} OK done"], [b"* CAPABILITY IMAP4rev1 QUOTA", b"{tag} OK"]], b"IMAP4rev1 QUOTA"),
        ([[b"{tag} OK done"], [b"* OK nothing", b"{tag} OK"]], b"IMAP4rev1"),
        ([[b"{tag} OK done"], [b"{tag} NO not now"]], b"IMAP4rev1"),  # a refusal of no login
    ],
)
def test_imap_login_answers_with_the_capabilities_the_upstream_names_or_asks_for_them(
    backend: RecordingBackend, scripted: list[Scripted], answers: list[list[bytes]], caps: bytes
) -> None:
    reply, up = imap_through(backend, scripted, b"* OK hi", *answers, [])
    assert reply == b"a OK [CAPABILITY " + caps + b"] Logged in"
    sasl = base64.b64encode(b"user=carol@example.test\x01auth=Bearer good\x01\x01")
    assert up.received[0] == b"P1 AUTHENTICATE XOAUTH2 " + sasl
    if len(answers) == 2:
        assert up.received[1] == b"P2 CAPABILITY"


@pytest.mark.parametrize("plus", [b"+ ", b"+"])  # the space RFC 3501 asks for, or none
def test_an_imap_challenge_is_answered_empty_and_any_refusal_counts_against_the_token(
    backend: RecordingBackend, scripted: list[Scripted], plus: bytes
) -> None:
    challenge = base64.b64encode(b'{"status":"401"}')
    reply, up = imap_through(backend, scripted, b"* OK hi", [plus + challenge], [b"P1 NO no"])
    assert reply.startswith(b"a NO [AUTHORIZATIONFAILED] ") and b"re-authorize" in reply
    assert up.received[1] == b""
    (call,) = backend.named("token_rejected")
    assert call[2] == 'P1 NO no {"status":"401"}'


@pytest.mark.parametrize(
    "refusal",
    [
        b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)",
        b"NO AUTHENTICATE failed.",  # Microsoft's words, no code
        b"NO [ALERT] Your account is not enabled for IMAP use.",  # Gmail, IMAP off
    ],
)
def test_an_imap_refusal_naming_authentication_counts_against_the_token_in_the_servers_words(
    backend: RecordingBackend,
    scripted: list[Scripted],
    caplog: pytest.LogCaptureFixture,
    refusal: bytes,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    reply, _ = imap_through(backend, scripted, b"* OK hi", [b"{tag} " + refusal])
    assert reply.startswith(b"a NO [AUTHORIZATIONFAILED] ") and b"re-authorize" in reply
    said = "P1 " + refusal.decode()
    assert backend.named("upstream_refused") == [("upstream_refused", 7, said, "imap")]
    assert backend.named("token_rejected") == [("token_rejected", 7, said, "imap")]
    logged = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert f"upstream rejected the token of carol@example.test, refreshing: {said}" in logged
    assert f"upstream rejected a fresh token of carol@example.test: {said}" in logged
    assert "login refused for 'carol@example.test' from 127.0.0.1: reauth" in logged


@pytest.mark.parametrize("status", [b"BAD", b"NO"])
def test_an_imap_login_whose_mailbox_cannot_be_opened_counts_against_the_token(
    backend: RecordingBackend, scripted: list[Scripted], status: bytes
) -> None:
    """Exchange accepts the token but answers no command: "User is authenticated but not
    connected." (IMAP off for the mailbox, or no permission on it)."""
    refusal = status + b" User is authenticated but not connected."
    reply, up = imap_through(
        backend, scripted, b"* OK hi", [b"{tag} OK done"], [b"{tag} " + refusal], []
    )
    assert reply.startswith(b"a NO [AUTHORIZATIONFAILED] ")
    assert up.received[1] == b"P2 CAPABILITY"
    assert [c[2] for c in backend.named("token_rejected")] == [refusal.decode()]


def test_an_imap_upstream_starttls_is_negotiated_before_the_token_is_sent(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(CERT, KEY)
    reply, up = imap_through(
        backend,
        scripted,
        b"* OK hi",
        [b"{tag} OK Begin TLS negotiation now"],
        [b"{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in"],
        [],
        security="starttls",
        tls=server,
    )
    assert reply == b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
    assert up.received[0] == b"P1 STARTTLS"
    (auth,) = [r for r in up.received if b"AUTHENTICATE" in r]
    assert auth.startswith(b"P2 AUTHENTICATE XOAUTH2 ") and auth in up.secure  # over TLS


def test_the_token_sent_to_an_imap_upstream_is_masked_in_the_debug_log(
    backend: RecordingBackend, scripted: list[Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "mailproxy")
    reply, up = imap_through(backend, scripted, b"* OK hi", [b"{tag} OK [CAPABILITY IMAP4rev1] x"])
    assert reply == b"a OK [CAPABILITY IMAP4rev1] Logged in"
    sent = up.received[0].split(b" ")[-1].decode()
    assert "U< P1 AUTHENTICATE XOAUTH2 ****" in caplog.text
    assert sent not in caplog.text


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_an_upstream_that_hangs_up_during_the_login_ends_the_session_after_its_answer(
    backend: RecordingBackend, scripted: list[Scripted], event_loop: str
) -> None:
    """An end of stream from the upstream read during the login ends the relay at once (the idle
    timeout is half an hour). The upstream sends its answer to the AUTHENTICATE ahead and hangs
    up; the token comes only once it has, so the proxy reads the end before the relay starts."""
    up = Scripted(b"* OK hi\r\nP1 OK [CAPABILITY IMAP4rev1] in", [], hang_up=True)
    scripted.append(up)
    backend.accounts["carol@example.test"].upstreams = {
        "imap": Endpoint("127.0.0.1", up.port, "plain")
    }
    backend.token_source = lambda acct, force: "good" if up.hung_up.wait(5) else "late"
    with (
        running_proxy(
            backend,
            listeners={"imap": "127.0.0.1:0"},
            upstream_pool_size=0,
            event_loop=event_loop,
        ) as p,
        raw_connect(p, "imap") as s,
    ):
        line(s)
        assert ask(s, b"a LOGIN carol@example.test pw") == [
            b"a OK [CAPABILITY IMAP4rev1] Logged in"
        ]
        assert closed(s)


# ---- STARTTLS and SASL responses (session.py) ------------------------------------------------
def test_a_command_pipelined_after_starttls_closes_the_connection_unanswered(
    proxy: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    with raw_connect(proxy, "imap") as s:
        line(s)
        s.sendall(b"a STARTTLS\r\nb NOOP\r\n")  # plain text that would pass for TLS's
        assert line(s) == b"a OK Begin TLS negotiation now"
        assert closed(s)
    logged = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "127.0.0.1: data after STARTTLS, closing" in logged


@pytest.mark.parametrize(
    ("listener", "sent", "logged"),
    [
        ("imap", b"a LOGIN carol@example.test pw", "a LOGIN ****"),
        ("imap", b"a login carol@example.test pw and more", "a login ****"),
        ("imap", b"a authenticate plain AGNhcm9s", "a authenticate plain ****"),
        ("imap", b"a  LOGIN carol@example.test pw", "a  LOGIN ****"),  # two spaces
        ("imap", b"a\tLOGIN carol@example.test pw", "****"),
        ("imap", b"a SELECT LOGIN x", "a SELECT LOGIN x"),  # a secret verb as an argument
        ("imap", b"a NOOP ", "a NOOP "),
        ("imap", b"a FOOX", "a FOOX"),
        ("imap", b"a N\xffOOP", "a N\ufffdOOP"),
        ("pop3", b"PASS secret", "PASS ****"),
        ("pop3", b"pass secret", "pass ****"),
        ("submission", b"AUTH PLAIN AGNhcm9s", "AUTH PLAIN ****"),
        ("submission", b"auth plain AGNhcm9s", "auth plain ****"),
    ],
)
def test_client_lines_are_logged_without_their_credentials(
    proxy: Controller,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    sent: bytes,
    logged: str,
) -> None:
    caplog.set_level(logging.DEBUG, "mailproxy")
    with raw_connect(proxy, listener) as s:
        line(s)
        ask(s, sent)
    from_client = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C: ")]
    assert from_client == [f"C: {logged}"]


@pytest.mark.parametrize(
    ("password", "response", "said"),
    [
        ("pw", b"*", b"a BAD Authentication cancelled"),
        ("pw", b"* ", b"a BAD Invalid SASL PLAIN response"),  # only a lone star cancels
        # base64 ending in X, read whole
        ("secW", b"AGNhcm9sQGV4YW1wbGUudGVzdABzZWNX", b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] "),
    ],
)
def test_a_sasl_response_line_is_read_as_sent_and_logged_masked(
    proxy: Controller,
    backend: RecordingBackend,
    caplog: pytest.LogCaptureFixture,
    password: str,
    response: bytes,
    said: bytes,
) -> None:
    caplog.set_level(logging.DEBUG, "mailproxy")
    backend.accounts["carol@example.test"].password = password
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"a AUTHENTICATE PLAIN") == [b"+ "]
        assert ask(s, response)[0].startswith(said)
    from_client = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C: ")]
    assert from_client == ["C: a AUTHENTICATE PLAIN", "C: ****"]
    assert "S: + " in [r.getMessage() for r in caplog.records]  # the proxy's lines in clear


# ---- a refused login, in the protocol's words (session.py) ----------------------------------
@pytest.mark.parametrize(
    ("kind", "message", "retry_after", "said"),
    [
        ("credentials", "", None, b"NO [AUTHENTICATIONFAILED] Invalid address or password"),
        ("credentials", "App password", None, b"NO [AUTHENTICATIONFAILED] App password"),
        ("disabled", "Disabled.", None, b"NO [AUTHORIZATIONFAILED] Disabled."),
        ("refused", "IMAP is off", None, b"NO [AUTHORIZATIONFAILED] IMAP is off"),
        ("reauth", "Re-authorize", None, b"NO [AUTHORIZATIONFAILED] Re-authorize"),
        ("throttled", "Too many", 30, b"NO [UNAVAILABLE] Too many (retry in 30 seconds)"),
        ("throttled", "Too many", None, b"NO [UNAVAILABLE] Too many"),
        ("unavailable", "", None, b"NO [UNAVAILABLE] Temporary failure, try again later"),
    ],
)
def test_each_kind_of_refused_login_gets_its_own_words_counted_and_logged(
    proxy: Controller,
    backend: RecordingBackend,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    message: str,
    retry_after: int | None,
    said: bytes,
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    err = ProxyAuthError(kind, message, retry_after)
    backend.accounts["carol@example.test"].refuse_login = err
    before = sample("mailproxy_logins_total", protocol="imap", result=kind)
    with raw_connect(proxy, "imap") as s:
        line(s)
        assert ask(s, b"a LOGIN carol@example.test pw") == [b"a " + said]
    assert sample("mailproxy_logins_total", protocol="imap", result=kind) == before + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert f"login refused for 'carol@example.test' from 127.0.0.1: {kind}" in logged


class LoginFlowBackend(RecordingBackend):
    """The password check can fail outright, or hand over a fresh token with the grant; the
    refusal of a fresh token can come with the backend's reason."""

    check_fails = False
    token_with_grant = ""
    rejected_because: str | None = None

    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        grant = super().authenticate(protocol, address, password, client_ip)
        if self.check_fails:
            raise RuntimeError("database gone")
        return dataclasses.replace(grant, token=self.token_with_grant)

    def token_rejected(self, account_id: int, protocol: str, detail: str) -> str | None:
        super().token_rejected(account_id, protocol, detail)
        return self.rejected_because


def login_flow(backend: RecordingBackend) -> LoginFlowBackend:
    return LoginFlowBackend(accounts=backend.accounts, token_source=backend.token_source)


def test_a_password_check_that_fails_is_a_temporary_refusal_and_the_session_goes_on(
    backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    flow = login_flow(backend)
    flow.check_fails = True
    before = sample("mailproxy_logins_total", protocol="imap", result="unavailable")
    with (
        running_proxy(flow, listeners={"imap": "127.0.0.1:0"}) as p,
        raw_connect(p, "imap") as s,
    ):
        line(s)
        assert ask(s, b"a LOGIN carol@example.test pw") == [
            b"a NO [UNAVAILABLE] Internal error, try again later"
        ]
        assert ask(s, b"b NOOP") == [b"b OK NOOP completed"]
    assert sample("mailproxy_logins_total", protocol="imap", result="unavailable") == before + 1
    (failed,) = [r for r in caplog.records if r.getMessage() == "backend.authenticate failed"]
    assert failed.exc_info is not None and "database gone" in str(failed.exc_info[1])
    assert not flow.named("access_token")
    said = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "login refused for 'carol@example.test' from 127.0.0.1: unavailable" in said


def test_a_token_read_with_the_password_check_goes_upstream_without_asking_for_one(
    backend: RecordingBackend, scripted: list[Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailproxy.imap")
    flow = login_flow(backend)
    flow.token_with_grant = "from-the-check"
    before = sample("mailproxy_logins_total", protocol="imap", result="ok")
    reply, up = imap_through(flow, scripted, b"* OK hi", [b"{tag} OK [CAPABILITY IMAP4rev1] x"])
    assert reply == b"a OK [CAPABILITY IMAP4rev1] Logged in"
    sasl = base64.b64encode(b"user=carol@example.test\x01auth=Bearer from-the-check\x01\x01")
    assert up.received[0] == b"P1 AUTHENTICATE XOAUTH2 " + sasl
    assert not flow.named("access_token")
    assert sample("mailproxy_logins_total", protocol="imap", result="ok") == before + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "mailproxy.imap"]
    assert "login carol@example.test from 127.0.0.1" in logged


def test_a_fresh_token_refused_for_a_reason_the_backend_knows_is_refused_with_that_reason(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    flow = login_flow(backend)
    flow.rejected_because = "IMAP is off for this mailbox: turn it on"
    before = sample("mailproxy_upstream_errors_total", protocol="imap", reason="token_rejected")
    reply, _ = imap_through(flow, scripted, b"* OK hi", [b"{tag} NO [AUTHENTICATIONFAILED] no"])
    assert reply == b"a NO [AUTHORIZATIONFAILED] IMAP is off for this mailbox: turn it on"
    after = sample("mailproxy_upstream_errors_total", protocol="imap", reason="token_rejected")
    assert after == before + 1
    assert [c[2] for c in flow.named("access_token")] == [False, True]


def test_an_upstream_that_fails_before_a_token_read_with_the_password_check_is_unavailable(
    backend: RecordingBackend, scripted: list[Scripted]
) -> None:
    flow = login_flow(backend)
    flow.token_with_grant = "from-the-check"
    reply, _ = imap_through(flow, scripted, b"* NO go away")
    assert reply == b"a NO [UNAVAILABLE] mail server greeting: * NO go away"
    assert not flow.named("access_token")
