"""Light mail clients for the benchmarks: blocking IMAP/SMTP over TLS, and an asyncio IDLE client.

Written against raw sockets (no imaplib parsing) so the client costs little and costs the same for
every contender: the direct connection, Auth-Email's proxy and emailproxy.
"""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass

LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


def xoauth2(user: str, token: str) -> str:
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode()


@dataclass(frozen=True)
class Target:
    """Where a client connects and how it logs in: ``token`` (XOAUTH2, direct) or ``password``."""

    name: str
    host: str
    port: int
    user: str
    password: str = ""
    token: str = ""

    def login_line(self, tag: str) -> bytes:
        if self.token:
            return f"{tag} AUTHENTICATE XOAUTH2 {xoauth2(self.user, self.token)}\r\n".encode()
        return f'{tag} LOGIN "{self.user}" "{self.password}"\r\n'.encode()


class IMAPError(Exception):
    pass


class IMAP:
    """A blocking IMAP client over implicit TLS that only reads what the benchmarks need."""

    def __init__(self, target: Target, ctx: ssl.SSLContext, timeout: float = 60.0) -> None:
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=target.host)
        self.f = self.sock.makefile("rb", buffering=1 << 17)
        self.target = target
        self.n = 0
        greeting = self.f.readline()
        if not greeting.startswith(b"* OK"):
            raise IMAPError(f"{target.name}: greeting {greeting[:200]!r}")

    def _tag(self) -> str:
        self.n += 1
        return f"b{self.n}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, tag: str) -> tuple[bytes, int, int]:
        """Read to the tagged line: (tagged line, literal bytes, untagged FETCH responses)."""
        want = tag.encode() + b" "
        literal = fetches = 0
        f = self.f
        while True:
            line = f.readline()
            if not line:
                raise IMAPError(f"{self.target.name}: connection closed")
            if line.startswith(b"* ") and b" FETCH " in line[:40]:
                fetches += 1
            while line.endswith(b"}\r\n"):
                m = LITERAL.search(line)
                if m is None:
                    break
                n = int(m.group(1))
                got = len(f.read(n))
                if got != n:
                    raise IMAPError(f"{self.target.name}: short literal")
                literal += n
                line = f.readline()
            if line.startswith(want):
                return line, literal, fetches

    def command(self, text: str) -> tuple[bytes, int, int]:
        tag = self._tag()
        self.send(f"{tag} {text}\r\n".encode())
        line, literal, fetches = self.response(tag)
        if not line.startswith(f"{tag} OK".encode()):
            raise IMAPError(f"{self.target.name}: {text.split()[0]}: {line[:300]!r}")
        return line, literal, fetches

    def login(self) -> None:
        tag = self._tag()
        self.send(self.target.login_line(tag))
        line, _, _ = self.response(tag)
        if not line.startswith(f"{tag} OK".encode()):
            raise IMAPError(f"{self.target.name}: login refused: {line[:300]!r}")

    def logout(self) -> None:
        try:
            self.command("LOGOUT")
        except (IMAPError, OSError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def login_cycle(target: Target, ctx: ssl.SSLContext) -> float:
    """Connect, log in, SELECT INBOX, LOGOUT; returns the seconds it took."""
    t0 = time.perf_counter()
    c = IMAP(target, ctx)
    try:
        c.login()
        c.command("SELECT INBOX")
        c.command("LOGOUT")
    finally:
        c.close()
    return time.perf_counter() - t0


def bulk_fetch(target: Target, ctx: ssl.SSLContext, expect: int) -> tuple[float, int]:
    """Log in, SELECT, then time ``UID FETCH 1:* BODY.PEEK[]``: (seconds, literal bytes)."""
    c = IMAP(target, ctx, timeout=300)
    try:
        c.login()
        c.command("SELECT INBOX")
        t0 = time.perf_counter()
        _, literal, fetches = c.command("UID FETCH 1:* (BODY.PEEK[])")
        elapsed = time.perf_counter() - t0
        if fetches != expect:
            raise IMAPError(f"{target.name}: fetched {fetches} messages, expected {expect}")
        c.command("LOGOUT")
    finally:
        c.close()
    return elapsed, literal


# ------------------------------------------------------------------------------------- SMTP


def smtp_send(
    target: Target,
    ctx: ssl.SSLContext,
    sender: str,
    rcpt: str,
    messages: list[bytes],
    nodelay: bool = False,
) -> float:
    """One SMTP session over implicit TLS sending every message; returns the seconds.

    smtplib leaves Nagle's algorithm on (as many clients do); ``nodelay`` sets TCP_NODELAY.
    """
    t0 = time.perf_counter()
    s = smtplib.SMTP_SSL(target.host, target.port, context=ctx, timeout=120)
    if nodelay:
        s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.ehlo("bench.example.test")
        if target.token:
            payload = f"user={target.user}\x01auth=Bearer {target.token}\x01\x01"
            s.auth("XOAUTH2", lambda challenge=None: payload if challenge is None else "")
        else:
            s.login(target.user, target.password)
        for raw in messages:
            refused = s.sendmail(sender, [rcpt], raw)
            if refused:
                raise smtplib.SMTPException(f"refused: {refused}")
        s.quit()
    finally:
        s.close()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- IDLE


class IdleSession:
    """One asyncio IMAP session: log in, SELECT, IDLE, and note when a new EXISTS arrives."""

    def __init__(self, target: Target, ctx: ssl.SSLContext) -> None:
        self.target = target
        self.ctx = ctx
        self.exists = -1
        self.notified_at: float | None = None
        self.error: str = ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()
        self.listener: asyncio.Task[None] | None = None

    async def _until(self, tag: bytes) -> bytes:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise IMAPError("connection closed")
            if line.startswith(b"* ") and line.rstrip().endswith(b" EXISTS"):
                self.exists = int(line.split()[1])
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise IMAPError(line[:200].decode(errors="replace"))
                return line

    async def open(self) -> None:
        t = self.target
        self.reader, self.writer = await asyncio.open_connection(
            t.host, t.port, ssl=self.ctx, server_hostname=t.host, limit=1 << 16
        )
        greeting = await self.reader.readline()
        if not greeting.startswith(b"* OK"):
            raise IMAPError(f"greeting {greeting[:100]!r}")
        self.writer.write(t.login_line("a"))
        await self._until(b"a")
        self.writer.write(b"s SELECT INBOX\r\n")
        await self._until(b"s")
        self.writer.write(b"i IDLE\r\n")
        line = await self.reader.readline()
        if not line.startswith(b"+"):
            raise IMAPError(f"IDLE refused: {line[:100]!r}")
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        assert self.reader is not None
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    self.error = self.error or "closed while idling"
                    return
                if line.startswith(b"* ") and line.rstrip().endswith(b" EXISTS"):
                    if int(line.split()[1]) > self.exists:
                        self.notified_at = time.perf_counter()
                        self.done.set()
                        return
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = repr(exc)
        finally:
            self.done.set()

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
        w = self.writer
        if w is None:
            return
        try:
            w.write(b"DONE\r\nz LOGOUT\r\n")
            w.close()
            await asyncio.wait_for(w.wait_closed(), 5)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
