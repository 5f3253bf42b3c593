"""The proxy end to end: stdlib clients and curl -> proxy -> the real Dovecot and submission
server, with real tokens from the real OAuth server (the `peers` fixture)."""

from __future__ import annotations

import base64
import imaplib
import logging
import poplib
import re
import secrets
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from mailproxy import EVENT_LOOPS, Controller, Endpoint, ProxyAuthError
from tests.helpers.proxy import (
    CERT,
    Account,
    RecordingBackend,
    client_tls,
    port,
    running_proxy,
)

pytestmark = pytest.mark.peers

PASSWORD = "device-pw-" + secrets.token_hex(4)
REAUTH_PAGE = "https://auth-email.example.test/accounts"


def upstreams(peers: Any, imap: str = "starttls") -> dict[str, Endpoint]:
    host = peers.mail_host
    return {
        "imap": Endpoint(host, peers.imap_port, "starttls")
        if imap == "starttls"
        else Endpoint(host, peers.imaps_port, "tls"),
        "pop3": Endpoint(host, peers.pop3s_port, "tls"),
        "smtp": Endpoint(host, peers.submission_port, "starttls"),
    }


@pytest.fixture(scope="module")
def address(peers: Any) -> str:
    """A mailbox of our own (3 seeded messages), so other tests' mailboxes stay untouched."""
    return str(peers.new_mailbox("proxy", messages=3)[0])


@pytest.fixture(scope="module")
def backend(peers: Any, address: str) -> RecordingBackend:
    client_id, secret = peers.register_client(grant_types=["client_credentials"], mailbox=address)

    def real_token(acct: Account, force: bool) -> str:
        return str(peers.client_credentials_token(client_id, secret)["access_token"])

    acct = Account(1, address, PASSWORD, upstreams(peers))
    return RecordingBackend(accounts={address: acct}, token_source=real_token)


@pytest.fixture(scope="module")
def proxy(backend: RecordingBackend, peers: Any) -> Iterator[Controller]:
    with running_proxy(backend, upstream_ca_file=peers.ca_file, upstream_timeout=10) as c:
        yield c


@pytest.fixture(autouse=True)
def fresh_backend(backend: RecordingBackend, peers: Any, address: str) -> Iterator[None]:
    backend.calls.clear()
    backend.bad_tokens.clear()
    yield
    backend.bad_tokens.clear()
    acct = backend.accounts[address]
    acct.upstreams = upstreams(peers)
    acct.refuse_login = acct.refuse_token = None


def imap_login(proxy: Controller, address: str, tls: bool = False) -> imaplib.IMAP4:
    if tls:
        m: imaplib.IMAP4 = imaplib.IMAP4_SSL(
            "127.0.0.1", port(proxy, "imaps"), ssl_context=client_tls(), timeout=20
        )
    else:
        m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=20)
        m.starttls(ssl_context=client_tls())
    m.login(address, PASSWORD)
    return m


def send_mail(proxy: Controller, address: str, subject: str, smtps: bool = False) -> None:
    if smtps:
        s: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port(proxy, "smtps"), context=client_tls(), timeout=20
        )
    else:
        s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=20)
        s.starttls(context=client_tls())
    s.login(address, PASSWORD)
    msg = EmailMessage()
    msg["From"] = msg["To"] = address
    msg["Subject"] = subject
    msg.set_content("sent through the Auth-Email proxy\n")
    s.send_message(msg)
    s.quit()


# ---- reading and sending -----------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True], ids=["imap-starttls", "imaps"])
def test_imap_reads_the_seeded_message(proxy: Controller, address: str, tls: bool) -> None:
    m = imap_login(proxy, address, tls=tls)
    caps = m.capability()[1][0]  # now the upstream's post-login set
    assert b"IDLE" in caps and b"AUTH=PLAIN" not in caps and b"STARTTLS" not in caps
    typ, data = m.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0] or 0) >= 1
    typ, msg = m.fetch("1", "(BODY.PEEK[])")
    part: Any = msg[0]
    assert typ == "OK" and b"Subject:" in part[1]
    m.logout()


def test_imap_through_upstream_imaps(proxy: Controller, backend: RecordingBackend, address: str,
                                     peers: Any) -> None:  # fmt: skip
    backend.accounts[address].upstreams = upstreams(peers, imap="tls")
    m = imap_login(proxy, address)
    assert m.select("INBOX", readonly=True)[0] == "OK"
    m.logout()


@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
def test_pop3_reads_the_seeded_message(proxy: Controller, address: str, listener: str) -> None:
    if listener == "pop3s":
        p: poplib.POP3 = poplib.POP3_SSL(
            "127.0.0.1", port(proxy, listener), context=client_tls(), timeout=20
        )
    else:
        p = poplib.POP3("127.0.0.1", port(proxy, listener), timeout=20)
        p.stls(context=client_tls())
    p.user(address)
    assert p.pass_(PASSWORD).startswith(b"+OK")
    count, _ = p.stat()
    assert count >= 1
    assert any(line.startswith(b"Subject:") for line in p.retr(1)[1])
    p.quit()


@pytest.mark.parametrize("smtps", [False, True], ids=["submission", "smtps"])
def test_smtp_sends_a_message_that_arrives(
    proxy: Controller, backend: RecordingBackend, address: str, peers: Any, smtps: bool
) -> None:
    subject = f"proxy e2e {secrets.token_hex(6)}"
    send_mail(proxy, address, subject, smtps=smtps)
    assert peers.wait_for_message(address, subject)
    closed = [c for c in backend.named("session_closed") if c[2] == "smtp"]
    assert closed and closed[0][3] > 0 and closed[0][4] > 0  # bytes in and out counted


def test_idle_sees_a_new_message(proxy: Controller, address: str) -> None:
    m = imap_login(proxy, address)
    m.select("INBOX")
    tag = m._new_tag().decode()  # type: ignore[attr-defined]
    m.send(f"{tag} IDLE\r\n".encode())
    assert m.readline().startswith(b"+")
    send_mail(proxy, address, f"idle {secrets.token_hex(6)}")
    m.sock.settimeout(20)
    while True:
        line = m.readline()
        assert line, "connection closed during IDLE"
        if re.match(rb"\* \d+ EXISTS", line):
            break
    m.send(b"DONE\r\n")
    while not m.readline().startswith(tag.encode()):
        pass
    m.logout()


def test_curl_lists_the_mailbox(proxy: Controller, address: str) -> None:
    url = f"imap://127.0.0.1:{port(proxy, 'imap')}/"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--ssl-reqd", "--cacert", CERT, "-u",
         f"{address}:{PASSWORD}", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "INBOX" in out.stdout


# ---- errors in each protocol's words --------------------------------------------------------
def login_error(proxy: Controller, protocol: str, address: str, password: str) -> str:
    """The refusal text a stdlib client gets for protocol 'imap', 'pop3' or 'smtp'."""
    try:
        if protocol == "imap":
            imap_login_pw = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=30)
            imap_login_pw.login(address, password)
        elif protocol == "pop3":
            p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=30)
            p.user(address)
            p.pass_(password)
        else:
            s = smtplib.SMTP("127.0.0.1", port(proxy, "submission"), timeout=30)
            s.ehlo()
            s.user, s.password = address, password
            s.auth("PLAIN", s.auth_plain)  # login() would go on to try AUTH LOGIN
    except imaplib.IMAP4.error as e:
        return str(e)
    except poplib.error_proto as e:
        return str(e)
    except smtplib.SMTPResponseException as e:
        err = e.smtp_error
        return f"{e.smtp_code} {err.decode() if isinstance(err, bytes) else err}"
    raise AssertionError("login unexpectedly succeeded")


WORDS = {
    "credentials": {"imap": "[AUTHENTICATIONFAILED]", "pop3": "-ERR [AUTH]", "smtp": "535 5.7.8"},
    "reauth": {"imap": "[AUTHORIZATIONFAILED]", "pop3": "-ERR [AUTH]", "smtp": "535 5.7.8"},
    "unavailable": {"imap": "[UNAVAILABLE]", "pop3": "-ERR [SYS/TEMP]", "smtp": "454 4.7.0"},
}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_wrong_password(proxy: Controller, address: str, protocol: str) -> None:
    assert WORDS["credentials"][protocol] in login_error(proxy, protocol, address, "wrong")


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_account_needing_reauthorization_names_the_page(
    proxy: Controller, backend: RecordingBackend, address: str, protocol: str
) -> None:
    msg = f"Re-authorize this account at {REAUTH_PAGE}"
    backend.accounts[address].refuse_token = ProxyAuthError("reauth", msg)
    text = login_error(proxy, protocol, address, PASSWORD)
    assert WORDS["reauth"][protocol] in text and REAUTH_PAGE in text


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_upstream_unreachable_is_unavailable(
    proxy: Controller, backend: RecordingBackend, address: str, protocol: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    backend.accounts[address].upstreams = {protocol: Endpoint("127.0.0.1", closed_port, "tls")}
    text = login_error(proxy, protocol, address, PASSWORD)
    assert WORDS["unavailable"][protocol] in text and str(closed_port) in text


def test_upstream_tls_failure_is_unavailable(
    proxy: Controller, backend: RecordingBackend, address: str, peers: Any
) -> None:
    # implicit TLS against the plain-text IMAP port: the handshake fails
    backend.accounts[address].upstreams = {
        "imap": Endpoint(peers.mail_host, peers.imap_port, "tls")
    }
    text = login_error(proxy, "imap", address, PASSWORD)
    assert "[UNAVAILABLE]" in text and "TLS" in text


def test_untrusted_upstream_certificate_is_unavailable(backend: RecordingBackend,
                                                       address: str) -> None:  # fmt: skip
    with running_proxy(backend, listeners={"imap": "127.0.0.1:0"}) as bare:  # no extra CA
        text = login_error(bare, "imap", address, PASSWORD)
    assert "[UNAVAILABLE]" in text and "certificate" in text.lower()


def test_rejected_token_is_refreshed_once_and_retried(
    proxy: Controller, backend: RecordingBackend, address: str
) -> None:
    backend.bad_tokens.append("bogus-" + secrets.token_hex(8))
    m = imap_login(proxy, address)
    m.logout()
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    assert not backend.named("token_rejected")


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_token_rejected_twice_marks_reauth(
    proxy: Controller, backend: RecordingBackend, address: str, protocol: str
) -> None:
    backend.bad_tokens += ["bogus-" + secrets.token_hex(8), "bogus-" + secrets.token_hex(8)]
    text = login_error(proxy, protocol, address, PASSWORD)
    assert WORDS["reauth"][protocol] in text and "re-authorize" in text
    assert [c[2] for c in backend.named("access_token")] == [False, True]
    assert len(backend.named("token_rejected")) == 1


# ---- secrets stay out of the log -----------------------------------------------------------
def test_debug_log_has_no_password_or_token(
    proxy: Controller, backend: RecordingBackend, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        m = imap_login(proxy, address)
        m.select("INBOX", readonly=True)
        m.fetch("1", "(BODY.PEEK[HEADER])")
        m.logout()
        m = imaplib.IMAP4("127.0.0.1", port(proxy, "imap"), timeout=20)
        m.authenticate("PLAIN", lambda _: f"\0{address}\0{PASSWORD}".encode())
        m.logout()
        p = poplib.POP3("127.0.0.1", port(proxy, "pop3"), timeout=20)
        p.user(address)
        p.pass_(PASSWORD)
        p.stat()
        p.quit()
        send_mail(proxy, address, f"log check {secrets.token_hex(4)}")
        backend.bad_tokens.append("bogus-" + secrets.token_hex(8))  # a rejected token too
        imap_login(proxy, address).logout()
    text = caplog.text
    assert "AUTHENTICATE XOAUTH2 ****" in text and "U> " in text  # the upstream talk is logged
    assert backend.tokens_issued
    forbidden = [PASSWORD, base64.b64encode(f"\0{address}\0{PASSWORD}".encode()).decode()]
    for token in backend.tokens_issued:
        raw = f"user={address}\x01auth=Bearer {token}\x01\x01"
        forbidden += [token, base64.b64encode(raw.encode()).decode()]
    for secret in forbidden:
        assert secret not in text


# ---- either event loop ---------------------------------------------------------------------
@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_logins_and_reads_on_either_event_loop(
    backend: RecordingBackend, peers: Any, address: str, event_loop: str
) -> None:
    """uvloop (the default) and asyncio's own loop (MAIL_EVENT_LOOP=asyncio) each carry STARTTLS
    on both sides, implicit TLS, a login on a pooled upstream connection and the relay."""
    with running_proxy(
        backend, upstream_ca_file=peers.ca_file, upstream_timeout=10, event_loop=event_loop
    ) as proxy:
        assert type(proxy.loop).__module__.split(".")[0] == event_loop
        assert proxy.hub is not None and proxy.hub.pool is not None
        pool = proxy.hub.pool
        for tls, upstream in [(False, "starttls"), (True, "tls"), (True, "tls")]:
            backend.accounts[address].upstreams = upstreams(peers, imap=upstream)
            m = imap_login(proxy, address, tls=tls)
            typ, data = m.select("INBOX", readonly=True)
            assert typ == "OK" and int(data[0] or 0) >= 1
            typ, msg = m.fetch("1", "(BODY.PEEK[])")
            part: Any = msg[0]
            assert typ == "OK" and b"Subject:" in part[1]
            m.logout()
            server = backend.accounts[address].upstreams["imap"]
            deadline = time.monotonic() + 10
            while not any(q and key[1] == server for key, q in list(pool.ready.items())):
                assert time.monotonic() < deadline, "the pool did not fill"
                time.sleep(0.02)  # behind each login
        assert pool.hits == 1  # the third login took a greeted connection
