"""IMAP, POP3 and SMTP front ends of the simulated mail servers, on one asyncio loop in a thread.

A front end speaks the provider's own greeting, capabilities, AUTH exchange and refusals; the
provider modules (``exchange_sim``, ``google_sim``) subclass the sessions here and supply the
words and the decision (a :class:`Verdict`). Once a login is accepted, IMAP and POP3 sessions are
relayed line by line to Dovecot as the mailbox (``mailstore``); SMTP is handled here and each
accepted message is delivered through Postfix with a Sent copy.

Known simplifications: untagged lines the front end writes itself (the Exchange ``* BYE`` on
token expiry) are written between whole lines of Dovecot's output, never inside a literal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

from tests.providers.mailstore import DovecotStore

LINE_LIMIT = 1 << 20


@dataclass
class Verdict:
    """What the provider decides about one XOAUTH2 login."""

    ok: bool
    refusal: str = "failed"  # a provider-specific key choosing the refusal's words
    mailbox: str = ""  # the mailbox the session opens (the SASL user)
    principal: str = ""  # who the token is for: the user's UPN, or the app for app-only
    expires_at: float | None = None  # the access token's expiry


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """(user, bearer token) from a base64 XOAUTH2 initial response, or None if malformed."""
    try:
        text = base64.b64decode(blob.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    fields = dict(part.split("=", 1) for part in text.split("\x01") if "=" in part)
    user, auth = fields.get("user", ""), fields.get("auth", "")
    if not user or not auth.lower().startswith("bearer "):
        return None
    return user, auth[7:].strip()


class Loop:
    """An asyncio loop running in a daemon thread; the servers live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class MailServer:
    """One listening socket whose connections each run a new ``session_class``."""

    def __init__(
        self,
        loop: Loop,
        session_class: type[Session],
        sim: Any,
        tls: ssl.SSLContext,
        implicit_tls: bool,
    ) -> None:
        self.loop = loop
        self.session_class = session_class
        self.sim = sim
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.server: asyncio.base_events.Server = loop.call(self._start())
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.base_events.Server:
        return await asyncio.start_server(
            self._serve,
            "127.0.0.1",
            0,
            ssl=self.tls if self.implicit_tls else None,
            limit=LINE_LIMIT,
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = self.session_class(self, reader, writer)
        await session.run()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()

        with contextlib.suppress(Exception):
            self.loop.call(stop())


class Session:
    """One client connection: line reads, writes, STARTTLS, and the relay to Dovecot."""

    prelogin_timeout = 60.0

    def __init__(
        self, server: MailServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.sim = server.sim
        self.store: DovecotStore = server.sim.store
        self.reader = reader
        self.writer = writer
        self.tls = server.implicit_tls
        self.verdict: Verdict | None = None
        self.backend: asyncio.StreamWriter | None = None
        self.closed = False
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        self.client_ip = peer[0]

    async def run(self) -> None:
        try:
            await self.serve()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            await self.close()

    async def serve(self) -> None:
        raise NotImplementedError

    def push(self, *lines: str) -> None:
        if not self.closed:
            self.writer.write("".join(line + "\r\n" for line in lines).encode())

    async def readline(self, timeout: float | None = None) -> str | None:
        """One line without its CRLF; None at end of input."""
        try:
            raw = await asyncio.wait_for(self.reader.readline(), timeout or self.prelogin_timeout)
        except (asyncio.LimitOverrunError, ValueError):
            self.push(self.line_too_long())
            return None
        if not raw:
            return None
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def line_too_long(self) -> str:
        return "line too long"

    async def starttls(self) -> None:
        await self.writer.drain()
        await self.writer.start_tls(self.server.tls)
        self.tls = True

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sim.sessions_ended(self)
        for writer in (self.writer, self.backend):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()

    def kill(self, *lines: str) -> None:
        """Say ``lines`` and drop the connection (token expired, too many errors)."""
        self.push(*lines)
        asyncio.ensure_future(self.close())

    async def check(self, protocol: str, blob: bytes) -> Verdict:
        parsed = parse_xoauth2(blob)
        if parsed is None:
            return Verdict(False, "malformed")
        user, token = parsed
        verdict: Verdict = await asyncio.to_thread(self.sim.check_login, protocol, user, token)
        if verdict.ok:
            self.verdict = verdict
            self.sim.sessions_started(self, protocol)
        return verdict

    def watch_expiry(self, line: str) -> None:
        """Drop the session with ``line`` when the access token expires (as Exchange does)."""
        if self.verdict and self.verdict.expires_at:
            delay = max(0.0, self.verdict.expires_at - self.sim.clock.now())
            loop = asyncio.get_running_loop()
            loop.call_later(delay, lambda: None if self.closed else self.kill(line))

    async def relay(
        self,
        backend: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        client_line: Callable[[bytes], Awaitable[bool]],
        server_line: Callable[[bytes], bytes],
    ) -> None:
        """Relay until either side ends. ``client_line`` may answer a command itself (returns
        True when it did); ``server_line`` may rewrite a line from Dovecot."""
        b_reader, self.backend = backend

        async def up() -> None:
            while not self.closed:
                line = await self.reader.readline()
                if not line or await client_line(line):
                    if not line:
                        return
                    continue
                assert self.backend is not None
                self.backend.write(line)
                literal = re.search(rb"\{(\d+)\+?\}\r?\n$", line)
                while literal:
                    self.backend.write(await self.reader.readexactly(int(literal.group(1))))
                    line = await self.reader.readline()
                    self.backend.write(line)
                    literal = re.search(rb"\{(\d+)\+?\}\r?\n$", line)

        async def down() -> None:
            while not self.closed:
                line = await b_reader.readline()
                if not line:
                    return
                self.writer.write(server_line(line))

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


class ConnectionCounter:
    """Authenticated sessions per (protocol, mailbox), for the providers' concurrency limits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.of_session: dict[int, tuple[str, str]] = {}

    def started(self, session: Session, protocol: str) -> None:
        assert session.verdict is not None
        key = (protocol, session.verdict.mailbox.lower())
        with self.lock:
            self.counts[key] += 1
            self.of_session[id(session)] = key

    def ended(self, session: Session) -> None:
        with self.lock:
            key = self.of_session.pop(id(session), None)
            if key:
                self.counts[key] -= 1

    def active(self, protocol: str, mailbox: str) -> int:
        with self.lock:
            return self.counts[(protocol, mailbox.lower())]


def header_from(message: bytes) -> str:
    """The address in the message's From header ("" if none)."""
    headers = BytesHeaderParser().parsebytes(message)
    found = getaddresses(headers.get_all("From", []))
    return found[0][1] if found else ""


def split_command(line: str) -> tuple[str, str]:
    """(upper-case verb, rest) of a POP3/SMTP command line."""
    verb, _, rest = line.strip().partition(" ")
    return verb.upper(), rest.strip()
