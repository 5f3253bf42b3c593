"""The mail store behind every simulated mail server: the test bed's real Dovecot and Postfix.

Why Dovecot and not an in-memory store: mail must really flow. A message sent through the
Exchange or Gmail SMTP front end, or through Graph's sendMail, has to be readable back over IMAP
by its recipients (Bcc included) and its Sent copy has to be in the sender's Sent folder; an
in-memory store would have to re-implement IMAP (FETCH, SEARCH, IDLE, literals) badly. So the
front ends do what Exchange and Gmail do differently (greetings, capabilities, AUTH, refusals)
and, once a login is accepted, open a session at Dovecot as that mailbox and relay to it.

Dovecot checks bearer tokens at the test bed's OAuth server, so the store keeps, per mailbox, a
client registered there with that ``mailbox`` and a long-lived client_credentials token.
Delivery goes to the private Postfix, which hands example.test / example.net to Dovecot (LMTP).
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import smtplib
import threading
import time
from typing import Any

from tests.peerbed import xoauth2


class DovecotStore:
    def __init__(self, peers: Any) -> None:
        self.peers = peers
        self.host: str = peers.host
        self.lock = threading.Lock()
        self.tokens: dict[str, tuple[str, float]] = {}
        self.clients: dict[str, tuple[str, str]] = {}

    def token(self, mailbox: str) -> str:
        """A bearer token Dovecot accepts for ``mailbox`` (cached, renewed before it ends)."""
        mailbox = mailbox.lower()
        with self.lock:
            cached = self.tokens.get(mailbox)
            if cached and cached[1] > time.time() + 60:
                return cached[0]
            if mailbox not in self.clients:
                self.clients[mailbox] = self.peers.register_client(
                    grant_types=["client_credentials"], mailbox=mailbox, access_token_ttl=86400
                )
            client_id, secret = self.clients[mailbox]
            answer = self.peers.client_credentials_token(client_id, secret)
            token = answer["access_token"]
            self.tokens[mailbox] = (token, time.time() + int(answer.get("expires_in", 3600)))
            return str(token)

    # ----------------------------------------------------------------- sessions (asyncio)
    async def open_imap(self, mailbox: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An authenticated IMAP connection to Dovecot (greeting and login already read)."""
        token = await asyncio.to_thread(self.token, mailbox)
        reader, writer = await asyncio.open_connection(
            self.peers.mail_host, self.peers.imaps_port, ssl=self.peers.ssl_context()
        )
        await reader.readline()  # * OK [CAPABILITY ...] Dovecot ready.
        blob = base64.b64encode(xoauth2(mailbox, token).encode()).decode()
        writer.write(f"S0 AUTHENTICATE XOAUTH2 {blob}\r\n".encode())
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("Dovecot closed during login")
            if line.startswith(b"+"):
                writer.write(b"\r\n")
            elif line.startswith(b"S0 "):
                if not line.startswith(b"S0 OK"):
                    raise ConnectionError(f"Dovecot refused {mailbox}: {line!r}")
                return reader, writer

    async def open_pop3(self, mailbox: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An authenticated POP3 connection to Dovecot (greeting and login already read)."""
        token = await asyncio.to_thread(self.token, mailbox)
        reader, writer = await asyncio.open_connection(
            self.peers.mail_host, self.peers.pop3s_port, ssl=self.peers.ssl_context()
        )
        await reader.readline()  # +OK Dovecot ready.
        blob = base64.b64encode(xoauth2(mailbox, token).encode()).decode()
        writer.write(f"AUTH XOAUTH2 {blob}\r\n".encode())
        line = await reader.readline()
        if not line.startswith(b"+OK"):
            writer.close()
            raise ConnectionError(f"Dovecot refused {mailbox}: {line!r}")
        return reader, writer

    # ----------------------------------------------------------------- delivery (blocking)
    def deliver(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Hand a message to Postfix, which delivers it into Dovecot (LMTP)."""
        with smtplib.SMTP(self.host, self.peers.postfix_smtp_port, timeout=30) as smtp:
            smtp.sendmail(sender, recipients, message)

    def save_sent(self, mailbox: str, message: bytes) -> None:
        """Put the Sent copy into the sender's Sent folder, as Exchange and Gmail do."""
        token = self.token(mailbox)
        conn = imaplib.IMAP4_SSL(
            self.peers.mail_host,
            self.peers.imaps_port,
            ssl_context=self.peers.ssl_context(),
            timeout=30,
        )
        try:
            conn.authenticate("XOAUTH2", lambda _: xoauth2(mailbox, token).encode())
            conn.append("Sent", r"(\Seen)", None, message)
        finally:
            conn.logout()
