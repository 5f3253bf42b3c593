"""The mail server's refusals per protocol, and the refresh figures, through the real proxy.

The app's own proxy (``MailProxyService``) in front of the real peers: the OAuth server counts
the token requests, Dovecot serves IMAP. Where Dovecot cannot say what Exchange says (``535
5.7.139``, ``535 5.7.3``, a close in the middle of AUTH), a small scripted SMTP server stands in
for the SMTP side only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from mailboxes import linking, verification
from mailboxes import refusals as mailrefusals
from models import Account, User, utcnow
from oauth import clients as oauth_clients
from oauth import grants, tokens
from tests.helpers.mail import (
    PASSWORD,
    REDIRECT,
    WORDS,
    MailClients,
    closed_port,
    link_with_client_credentials,
    link_with_code,
    other_client,
    read_first_message,
    wait_until,
)

TENANT_OFF = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
NO_SEND = "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]"


# ---------------------------------------------------------------------------------- meanings


@pytest.mark.parametrize(
    ("protocol", "said", "app_only", "words", "token_may_help"),
    [
        ("smtp", TENANT_OFF, False,
         "Set-CASMailbox -Identity box@example.test -SmtpClientAuthenticationDisabled $false",
         False),
        ("smtp", TENANT_OFF.replace("Tenant", "Mailbox"), True,
         "Set-CASMailbox -Identity box@example.test -SmtpClientAuthenticationDisabled $false",
         False),
        ("smtp", "535 5.7.139 Authentication unsuccessful, user is locked by your "
         "organization's security defaults policy. Contact your administrator.", False,
         "security defaults", False),
        ("smtp", "535 5.7.139 Authentication unsuccessful, the request did not meet the "
         "criteria to be authenticated successfully. Contact your administrator.", False,
         "Conditional Access", False),
        ("smtp", NO_SEND, False, "https://outlook.office.com/SMTP.Send", True),
        ("smtp", NO_SEND, True, "SMTP.SendAsApp", True),
        ("smtp", "535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp", False,
         "https://mail.google.com/", True),
        ("imap", "P1 NO AUTHENTICATE failed.", True,
         "Add-MailboxPermission -Identity box@example.test", True),
        ("imap", "P1 NO AUTHENTICATE failed.", False,
         "Set-CASMailbox -Identity box@example.test -ImapEnabled $true", True),
        ("pop3", "-ERR Authentication failure: unknown user name or bad password.", False,
         "-PopEnabled $true", True),
        ("pop3", "-ERR Authentication failure: unknown user name or bad password.", True,
         "POP.AccessAsApp", True),
        ("imap", 'P1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure) {"status":"400"}',
         False, "scope", True),
    ],
)  # fmt: skip
def test_each_refusal_has_its_cause_and_fix(
    protocol: str, said: str, app_only: bool, words: str, token_may_help: bool
) -> None:
    refusal = mailrefusals.explain(protocol, said, "box@example.test", app_only)
    assert words in f"{refusal.title} {refusal.cause} {refusal.fix}"
    assert refusal.token_may_help is token_may_help
    assert refusal.said == said
    assert refusal.name in refusal.for_mail_client()


# ---------------------------------------------------------------------------------- a fake SMTP


class ScriptedSMTP:
    """An SMTP server for the upstream side: EHLO, AUTH answered with ``answer`` (or the
    connection closed when it is "close"); after a 235, every command gets 250."""

    def __init__(self) -> None:
        self.answer = TENANT_OFF
        self.auths = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1"))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(5)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"220 fake.outlook.office365.com Microsoft ESMTP MAIL Service ready\r\n")
            while line := await r.readline():
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"EHLO":
                    w.write(b"250-fake Hello\r\n250 AUTH LOGIN XOAUTH2\r\n")
                elif verb == b"AUTH":
                    self.auths += 1
                    if self.answer == "close":
                        break
                    w.write(self.answer.encode() + b"\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 Service closing transmission channel\r\n")
                    break
                else:
                    w.write(b"250 2.0.0 OK\r\n")
                await w.drain()
        except OSError:
            pass
        w.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def smtp_server() -> Iterator[ScriptedSMTP]:
    server = ScriptedSMTP()
    yield server
    server.close()


def smtp_at(owner: User, account: Account, port: int) -> None:
    """Point the account's client's SMTP side at ``port`` (plain: loopback only)."""
    client = account.client
    values = {name: getattr(client, name) for name in oauth_clients.EDITABLE}
    values.update({"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_security": "plain"})
    oauth_clients.save_client(owner, values, client=client)


def token_requests(peers: Any, account: Account) -> int:
    return int(peers.token_requests(Account.get_by_id(account.id).client.client_id))


# ---------------------------------------------------------------------------------- per protocol


@pytest.mark.peers
def test_smtp_auth_disabled_is_recorded_for_smtp_only_with_the_fix_and_no_token_request(
    owner: User,
    peers: Any,
    mail: MailClients,
    web: FlaskClient,
    smtp_server: ScriptedSMTP,
) -> None:
    account = link_with_client_credentials(owner, peers, "smtpoff")
    smtp_at(owner, account, smtp_server.port)
    before = token_requests(peers, account)

    first = mail.refusal("smtp", account.address, PASSWORD)
    second = mail.refusal("smtp", account.address, PASSWORD)

    fix = f"Set-CASMailbox -Identity {account.address} -SmtpClientAuthenticationDisabled $false"
    for said in (first, second):
        assert said.startswith("535 5.7.8") and "SMTP AUTH is disabled" in said, said
        assert fix in said
    assert token_requests(peers, account) == before  # a new token cannot fix a policy
    assert smtp_server.auths == 2
    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and stored.status_detail == ""
    (refusal,) = mailrefusals.states(stored).values()
    assert refusal.protocol == "smtp" and refusal.said == TENANT_OFF
    read_first_message(mail.imap(account.address, PASSWORD))  # IMAP keeps working
    page = web.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "5.7.139" in page and fix in page and "SMTP" in page
    assert "IMAP" in page

    smtp_server.answer = "235 2.7.0 Authentication successful"  # the admin ran the command
    mail.smtp(account.address, PASSWORD).quit()
    wait_until(lambda: Account.get_by_id(account.id).protocol_state == "", what="cleared")


@pytest.mark.peers
def test_a_refused_token_is_renewed_once_then_answered_from_the_record(
    owner: User,
    peers: Any,
    mail: MailClients,
    smtp_server: ScriptedSMTP,
) -> None:
    account = link_with_client_credentials(owner, peers, "nosend")
    smtp_at(owner, account, smtp_server.port)
    smtp_server.answer = NO_SEND
    before = token_requests(peers, account)

    first = mail.refusal("smtp", account.address, PASSWORD)
    after_first = token_requests(peers, account)
    for _ in range(5):
        again = mail.refusal("smtp", account.address, PASSWORD)

    assert after_first == before + 1  # one renewal: an expired token says 5.7.3 too
    assert token_requests(peers, account) == after_first  # then the record answers
    for said in (first, again):
        assert "SMTP.SendAsApp" in said and "Add-MailboxPermission" in said, said
    assert Account.get_by_id(account.id).status == "active"


@pytest.mark.peers
def test_a_mail_server_closing_mid_auth_is_a_temporary_error_and_loses_nothing(
    owner: User,
    peers: Any,
    mail: MailClients,
    smtp_server: ScriptedSMTP,
) -> None:
    account = link_with_client_credentials(owner, peers, "midauth")
    smtp_at(owner, account, smtp_server.port)
    smtp_server.answer = "close"
    kept = Account.get_by_id(account.id)
    before = token_requests(peers, account)

    said = mail.refusal("smtp", account.address, PASSWORD)

    assert said.startswith(WORDS["unavailable"]["smtp"]) and "closed the connection" in said
    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and stored.protocol_state == ""
    assert stored.access_token == kept.access_token
    assert token_requests(peers, account) == before and smtp_server.auths == 1


# ---------------------------------------------------------------------------------- figures


def expire(account: Account) -> None:
    Account.update(token_expires_at=utcnow() - dt.timedelta(minutes=1)).where(
        Account.id == account.id
    ).execute()


@pytest.mark.peers
def test_an_expired_token_and_a_burst_of_20_logins_give_20_successes_and_1_refresh(
    owner: User,
    peers: Any,
    mail: MailClients,
) -> None:
    account = link_with_code(owner, peers, "burst")
    mail.imap(account.address, PASSWORD).logout()  # the password is in the auth cache
    expire(account)
    before = token_requests(peers, account)
    barrier = threading.Barrier(20)
    results: list[str] = []

    def login() -> None:
        barrier.wait()
        conn = mail.imap(account.address, PASSWORD)
        results.append(conn.select("INBOX", readonly=True)[0])
        conn.logout()

    threads = [threading.Thread(target=login) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert results == ["OK"] * 20
    assert token_requests(peers, account) == before + 1


def login_once(port: int, address: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.recv(1000)
        s.sendall(f"a LOGIN {address} {PASSWORD}\r\n".encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += s.recv(1000)
        return reply


@pytest.mark.peers
def test_a_refusing_token_endpoint_sees_at_most_3_requests_for_1000_logins_in_a_minute(
    owner: User,
    peers: Any,
    mail: MailClients,
    web: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(A 503 or a timeout is remembered the same way: see test_token_renewal.py.)"""
    refusal = {"status": 400, "body": {"error": "invalid_client", "error_description": "no"}}
    account = link_with_code(owner, peers, "refusing")
    client_id = account.client.client_id
    mail.imap(account.address, PASSWORD).logout()
    expire(account)
    requests.post(peers.test_token_behaviour_url, json={"client_id": client_id, **refusal},
                  timeout=10).raise_for_status()  # fmt: skip
    start = utcnow()
    clock = [start]
    monkeypatch.setattr(tokens, "utcnow", lambda: clock[0])  # a minute, played quickly
    before = token_requests(peers, account)
    replies = []
    try:
        for n in range(1000):
            clock[0] = start + dt.timedelta(milliseconds=60 * n)
            replies.append(login_once(mail.port("imap"), account.address))
    finally:
        requests.post(peers.test_token_behaviour_url, json={"client_id": client_id}, timeout=10)

    sent = token_requests(peers, account) - before
    print(f"1000 logins in a (played) minute: {sent} token requests")
    assert sent <= 3, sent
    assert all(b"a NO [UNAVAILABLE]" in r for r in replies), {r for r in replies}
    assert sum(b"Next try in" in r for r in replies) >= 990  # the reason, at once
    stored = Account.get_by_id(account.id)
    assert stored.refresh_failures == sent and stored.status == "active"
    page = web.get("/").get_data(as_text=True)
    assert "Cannot renew" in page


@pytest.mark.peers
def test_a_hanging_token_endpoint_gives_a_temporary_error_and_one_request(
    owner: User,
    peers: Any,
    mail: MailClients,
    web: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.helpers.tokens import Scripted

    account = link_with_client_credentials(owner, peers, "hang")
    hanging = Scripted(("hang", 3.0))
    try:
        Account.update(token_expires_at=utcnow() - dt.timedelta(minutes=1)).where(
            Account.id == account.id
        ).execute()
        account.client.token_url = hanging.url
        account.client.save()
        app = web.application
        with app.app_context():
            quick = replace(grants.settings(), timeout=1.0)
        monkeypatch.setitem(app.extensions, "auth_email.grants", grants._State(quick))

        said = [mail.refusal("imap", account.address, PASSWORD) for _ in range(3)]
    finally:
        hanging.close()

    assert all(WORDS["unavailable"]["imap"] in s and "in time" in s for s in said), said
    assert hanging.hits == 1  # the others got the recorded reason at once
    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and stored.access_token == account.access_token
    assert "Cannot renew token" in web.get("/").get_data(as_text=True)


# ---------------------------------------------------------------------------------- link check


@pytest.mark.parametrize(
    ("scope", "covered"),
    [
        ("https://outlook.office.com/SMTP.Send offline_access", ["smtp"]),
        ("https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/"
         "POP.AccessAsUser.All offline_access", ["imap", "pop3"]),
        ("https://outlook.office365.com/.default", ["imap", "pop3", "smtp"]),
        ("https://mail.google.com/", ["imap", "pop3", "smtp"]),
        ("openid email mail", ["imap", "pop3", "smtp"]),
    ],
)  # fmt: skip
def test_the_link_check_covers_the_protocols_the_scope_grants(
    scope: str, covered: list[str]
) -> None:
    assert verification.protocols_covered(scope, ["imap", "pop3", "smtp"]) == covered


@pytest.mark.peers
def test_the_link_is_checked_over_each_protocol_and_shown_per_protocol(
    owner: User,
    peers: Any,
    web: FlaskClient,
) -> None:
    address, _ = peers.new_mailbox("perproto", messages=1)
    client_id, secret = peers.register_client(grant_types=["client_credentials"], mailbox=address)
    client = other_client(owner, peers, client_id, secret, "client_credentials",
                          pop3_port=closed_port())  # fmt: skip

    started = linking.start(owner, address, client, REDIRECT)

    assert started.done is not None and started.done.ok, started.done
    protocols = started.done.protocols
    assert protocols["imap"] is None and protocols["smtp"] is None
    assert protocols["pop3"] and "Could not connect" in protocols["pop3"]
    account = Account.get(Account.address == address)
    assert account.status == "active"
    page = web.get(f"/accounts/{account.id}").get_data(as_text=True)
    pop3 = re.search(r'<tr data-protocol="POP3">.*?</tr>', page, re.S)
    imap = re.search(r'<tr data-protocol="IMAP">.*?</tr>', page, re.S)
    assert pop3 and "Could not connect" in pop3.group(0)
    assert imap and "No refusal recorded" in imap.group(0)
