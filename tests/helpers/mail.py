"""The app's mail proxy in front of the peers: stdlib mail clients, linking by the product's own
code, and reading what the proxy accounted (shared by the mail, sims and load tests)."""

from __future__ import annotations

import imaplib
import poplib
import re
import secrets
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from mailboxes import linking
from mailboxes.listeners import tls_files
from mailboxes.mailbackend import MailProxyService
from mailproxy.settings import LISTENER_NAMES
from models import Account, OAuthClient, User
from oauth import clients as oauth_clients

PUBLIC = "http://127.0.0.1:8080"
REDIRECT = PUBLIC + "/authorize"
PASSWORD = "laptop-" + secrets.token_hex(6)
WRONG = "not-the-password-" + secrets.token_hex(3)
EVERY_LISTENER_ON_A_FREE_PORT = {f"{n.upper()}_LISTEN": "127.0.0.1:0" for n in LISTENER_NAMES}

# How each protocol says it: wrong password / re-authorize / try later.
WORDS = {
    "credentials": {"imap": "[AUTHENTICATIONFAILED]", "pop3": "-ERR [AUTH]", "smtp": "535 5.7.8"},
    "reauth": {"imap": "[AUTHORIZATIONFAILED]", "pop3": "-ERR [AUTH]", "smtp": "535 5.7.8"},
    "unavailable": {"imap": "[UNAVAILABLE]", "pop3": "-ERR [SYS/TEMP]", "smtp": "454 4.7.0"},
}


class MailClients:
    """Stdlib mail clients at the running proxy, trusting its self-signed certificate."""

    def __init__(self, app: Flask, service: MailProxyService) -> None:
        self.service = service
        self.cert = tls_files(app)[0]

    def port(self, listener: str) -> int:
        return self.service.controller.listening[listener][1]

    def flush(self) -> None:
        """Wait for the proxy's bookkeeping writes (audit, last use), which run after replies."""
        self.service.backend.flush()

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)  # checks the host name too

    def imap(self, address: str, password: str, listener: str = "imap") -> imaplib.IMAP4:
        if listener == "imaps":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                "127.0.0.1", self.port("imaps"), ssl_context=self.tls(), timeout=20
            )
        else:
            conn = imaplib.IMAP4("127.0.0.1", self.port("imap"), timeout=20)
            conn.starttls(ssl_context=self.tls())
        conn.login(address, password)
        return conn

    def pop3(self, address: str, password: str, listener: str = "pop3") -> poplib.POP3:
        if listener == "pop3s":
            conn: poplib.POP3 = poplib.POP3_SSL(
                "127.0.0.1", self.port("pop3s"), context=self.tls(), timeout=20
            )
        else:
            conn = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=20)
            conn.stls(context=self.tls())
        conn.user(address)
        conn.pass_(password)
        return conn

    def smtp(self, address: str, password: str, listener: str = "submission") -> smtplib.SMTP:
        if listener == "smtps":
            conn: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", self.port("smtps"), context=self.tls(), timeout=20
            )
        else:
            conn = smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=20)
            conn.starttls(context=self.tls())
        conn.login(address, password)
        return conn

    def refusal(self, protocol: str, address: str, password: str) -> str:
        """The text a client gets when its login is refused ('imap', 'pop3' or 'smtp')."""
        try:
            if protocol == "imap":
                self.imap(address, password).logout()
            elif protocol == "pop3":
                self.pop3(address, password).quit()
            else:
                conn = smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=20)
                conn.starttls(context=self.tls())
                conn.ehlo()
                conn.user, conn.password = address, password
                conn.auth("PLAIN", conn.auth_plain)  # login() would go on to AUTH LOGIN
                conn.quit()
        except (imaplib.IMAP4.error, poplib.error_proto) as exc:
            return str(exc)
        except smtplib.SMTPResponseException as exc:
            said = exc.smtp_error
            return f"{exc.smtp_code} {said.decode() if isinstance(said, bytes) else said}"
        raise AssertionError(f"the {protocol} login of {address} was accepted")


def other_client(
    owner: User, peers: Any, client_id: str, secret: str, grant: str, **servers: Any
) -> OAuthClient:
    """An "Other (custom server)" client with the peer's URLs and mail servers."""
    values: dict[str, Any] = {
        "name": f"peer {grant} {secrets.token_hex(3)}",
        "provider": "other",
        "grant": grant,
        "tenant": "",
        "authorize_url": peers.auth_url,
        "token_url": peers.token_url,
        "device_url": "",
        "scope": "openid email mail" if grant == "authorization_code" else "mail",
        "revocation_url": peers.revocation_url,
        "client_id": client_id,
        "secret_expires_on": None,
        "imap_host": peers.mail_host,
        "imap_port": peers.imaps_port,
        "imap_security": "tls",
        "pop3_host": peers.mail_host,
        "pop3_port": peers.pop3s_port,
        "pop3_security": "tls",
        "smtp_host": peers.mail_host,
        "smtp_port": peers.submission_port,
        "smtp_security": "starttls",
        "sasl_mechanism": "XOAUTH2",
        **servers,
    }
    return oauth_clients.save_client(owner, values, secret)


def with_password(owner: User, account: Account, password: str = PASSWORD) -> Account:
    linking.add_password(owner, account, "Laptop", password)
    return Account.get_by_id(account.id)


def link_with_client_credentials(owner: User, peers: Any, prefix: str) -> Account:
    """A mailbox linked with Client Credentials (no browser), with the mail password set."""
    address, _ = peers.new_mailbox(prefix, messages=2)
    client_id, secret = peers.register_client(grant_types=["client_credentials"], mailbox=address)
    client = other_client(owner, peers, client_id, secret, "client_credentials")
    started = linking.start(owner, address, client, REDIRECT)
    assert started.done is not None and started.done.ok, started.done
    return with_password(owner, Account.get(Account.address == address))


def link_with_code(owner: User, peers: Any, prefix: str, **registration: Any) -> Account:
    """A mailbox linked with Authorization Code + PKCE (the OP's forms over HTTP)."""
    address, _ = peers.new_mailbox(prefix, messages=2)
    client_id, secret = peers.register_client(redirect_uris=[REDIRECT], **registration)
    client = other_client(owner, peers, client_id, secret, "authorization_code")
    started = linking.start(owner, address, client, REDIRECT)
    back = peers.user_agent_login(started.url, address)
    args = {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}
    account, result = linking.complete_callback(owner, args, REDIRECT)
    assert result.ok, result.message
    return with_password(owner, account)


def wait_until(condition: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def wait_for_accounting(account: Account) -> Account:
    """Session end is accounted just after the client's connection closes."""
    return wait_until(
        lambda: (a := Account.get_by_id(account.id)).bytes_relayed > 0 and a, what="accounting"
    )


def read_first_message(conn: imaplib.IMAP4) -> bytes:
    typ, data = conn.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0] or 0) >= 1
    typ, fetched = conn.fetch("1", "(BODY.PEEK[])")
    part: Any = fetched[0]
    assert typ == "OK"
    return bytes(part[1])


def message(address: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = msg["To"] = address
    msg["Subject"] = subject
    msg.set_content("Sent through Auth-Email with the mail-client password.\n")
    return msg


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(web: FlaskClient, name: str, **labels: str) -> float:
    """One sample of /metrics (summed over label values not given)."""
    answer = web.get("/metrics")
    assert answer.status_code == 200
    total = 0.0
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def account_row(page: str, account: Account) -> str:
    found = re.search(rf'<tr data-account="{account.id}">(.*?)</tr>', page, re.S)
    assert found, f"no row for {account.address}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(1)))
