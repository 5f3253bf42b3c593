"""What the three protocol sessions share: bounded line reads, the masked write path, idle
timeouts, the unknown-command budget, upstream connections and the relay's TLS buffer sizing."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backend import Endpoint, Grant
from .metrics import LOGINS, UPSTREAM_CONNECTIONS, UPSTREAM_ERRORS

if TYPE_CHECKING:
    from .controller import Hub

RELAY_CHUNK = 65536
UPSTREAM_MAX_LINE = 65536


class LineTooLong(Exception):
    """A line (or the data before its end) exceeded the configured maximum."""


class PeerGone(Exception):
    """The peer closed the connection."""


class ClientNotReading(Exception):
    """Before login, the client left the proxy's answers unread for the idle timeout."""


class TLSOnPlainPort(Exception):
    """The client opened with a TLS handshake on a plain-text listener."""


class UpstreamError(Exception):
    """The upstream server could not be used; message is shown to the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # metrics label: connect, tls, timeout, protocol, refused
        self.message = message


class LineReader:
    """Bounded reads of CRLF lines and counted data from a StreamReader.

    It keeps what it read past a line so that the relay can forward it untouched.
    """

    __slots__ = ("reader", "buf", "max_line", "sniff_tls", "chunk")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_line: int,
        sniff_tls: bool = False,
        chunk: int = RELAY_CHUNK,
    ):
        self.reader = reader
        self.buf = bytearray()
        self.max_line = max_line
        self.sniff_tls = sniff_tls
        self.chunk = chunk

    async def _fill(self) -> None:
        chunk = await self.reader.read(self.chunk)
        if not chunk:
            raise PeerGone()
        self.buf += chunk

    async def readline(self) -> bytes:
        """Return the next line including its end of line."""
        scanned = 0
        while True:
            i = self.buf.find(b"\n", scanned)
            if i >= 0:
                if i >= self.max_line:
                    raise LineTooLong()
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > self.max_line:
                raise LineTooLong()
            # A TLS record header (handshake, 0x16 0x03) where a command should be.
            if self.sniff_tls and self.buf[:2] == b"\x16\x03":
                raise TLSOnPlainPort()
            scanned = len(self.buf)
            await self._fill()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is loopback: an IP literal in 127.0.0.0/8 or ::1 (IPv4-mapped too), or
    exactly ``localhost``. The one definition, the app's included (``config.is_loopback_host``):
    it decides where plain http and plain mail are allowed, so a name is never trusted for what
    it looks like ("127.evil.example", "x.localhost")."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def one_line(text: str) -> str:
    """A message safe to put on one protocol line."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())[:400]


def sasl_initial_response(grant: Grant, token: str) -> str:
    """Base64 XOAUTH2 or OAUTHBEARER initial client response."""
    if grant.mechanism == "OAUTHBEARER":
        user = grant.address.replace("=", "=3D").replace(",", "=2C")
        ep = grant.upstream
        raw = f"n,a={user},\x01host={ep.host}\x01port={ep.port}\x01auth=Bearer {token}\x01\x01"
    else:
        raw = f"user={grant.address}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


def decode_challenge(b64: str) -> str:
    """The JSON error a server sends as a SASL challenge, for logs and token_rejected()."""
    try:
        return one_line(base64.b64decode(b64.strip(), validate=False).decode("utf-8", "replace"))
    except ValueError:
        return ""


class Upstream:
    """A connection to the real mail server during the login handshake."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        endpoint: Endpoint,
        timeout: float,
        log: logging.Logger,
    ):
        self.reader = reader
        self.writer = writer
        self.lines = LineReader(reader, UPSTREAM_MAX_LINE)
        self.endpoint = endpoint
        self.timeout = timeout
        self.log = log
        self._tag = 0
        self.pooled = False  # made ahead of the login by the UpstreamPool

    def next_tag(self) -> str:
        self._tag += 1
        return f"P{self._tag}"

    def count(self, protocol: str) -> None:
        """Count the connection a login uses: pooled or new, and whether TLS was resumed."""
        UPSTREAM_CONNECTIONS.labels(protocol, "pooled" if self.pooled else "new").inc()
        sslobj = self.writer.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.session_reused:
            UPSTREAM_CONNECTIONS.labels(protocol, "resumed").inc()

    def keep_tls_session(self, ctx: ssl.SSLContext) -> None:
        """Let the next connection to this server resume this TLS session (see
        tls.ResumingContext). Called after the login: a TLS 1.3 server's ticket may follow
        its greeting."""
        remember = getattr(ctx, "remember", None)
        sslobj = self.writer.get_extra_info("ssl_object")
        if remember is not None and sslobj is not None:
            remember(self.endpoint.host, sslobj)

    async def send(self, text: str, secret: bool = False) -> None:
        self.log.debug("U< %s", mask_tail(text) if secret else text)
        self.writer.write(text.encode() + b"\r\n")
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(
                "protocol", f"lost the connection to the mail server ({exc})"
            ) from exc

    async def readline(self) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.lines.readline()
        except TimeoutError:
            raise UpstreamError("timeout", "the mail server did not answer in time") from None
        except (PeerGone, OSError):
            raise UpstreamError("protocol", "the mail server closed the connection") from None
        except LineTooLong:
            raise UpstreamError("protocol", "the mail server sent an overlong line") from None
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        secret = line == "+" or line.startswith("+ ")
        self.log.debug("U> %s", "+ ****" if secret else line)
        return line

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        if self.lines.buf:
            raise UpstreamError("protocol", "the mail server sent data before TLS started")
        try:
            await self.writer.start_tls(
                ctx, server_hostname=self.endpoint.host, ssl_handshake_timeout=self.timeout
            )
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise UpstreamError("tls", f"TLS with {self.endpoint.host} failed: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise UpstreamError("tls", f"TLS with {self.endpoint.host} failed: {exc}") from exc

    def close(self) -> None:
        self.writer.close()


def mask_tail(text: str) -> str:
    """Keep a command's leading words, hide its credentials: 'A1 LOGIN ****'."""
    words = text.split(" ")
    keep = 0
    for i, w in enumerate(words[:3]):
        if w.upper() in SECRET_VERBS:
            keep = i + 1
            # keep the mechanism name of AUTH/AUTHENTICATE
            if w.upper() in ("AUTH", "AUTHENTICATE") and len(words) > i + 1:
                keep = i + 2
            break
    if keep == 0:
        return "****"
    shown = " ".join(words[:keep])
    return shown + " ****" if len(words) > keep else shown


SECRET_VERBS = frozenset({"LOGIN", "AUTHENTICATE", "AUTH", "PASS", "USER"})


async def connect_upstream(hub: Hub, ep: Endpoint, log: logging.Logger) -> Upstream:
    """Open a TCP (and for 'tls' a verified TLS) connection to the upstream server."""
    settings = hub.settings
    if ep.security == "plain" and not is_loopback(ep.host):
        raise UpstreamError("tls", f"refusing an unencrypted connection to {ep.host}")
    ctx = hub.upstream_ssl if ep.security == "tls" else None
    try:
        async with asyncio.timeout(settings.upstream_timeout):
            reader, writer = await asyncio.open_connection(
                ep.host,
                ep.port,
                ssl=ctx,
                server_hostname=ep.host if ctx else None,
                limit=RELAY_CHUNK,
            )
    except TimeoutError:
        raise UpstreamError("timeout", f"{ep.host}:{ep.port} did not answer in time") from None
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise UpstreamError("tls", f"TLS with {ep.host}:{ep.port} failed: {exc}") from exc
    except OSError as exc:
        raise UpstreamError(
            "connect", f"cannot reach {ep.host}:{ep.port}: {exc.strerror or exc}"
        ) from exc
    log.debug("connected to %s:%s (%s)", ep.host, ep.port, ep.security)
    return Upstream(reader, writer, ep, settings.upstream_timeout, log)


def count_login(protocol: str, result: str) -> None:
    LOGINS.labels(protocol, result).inc()


def count_upstream_error(protocol: str, reason: str) -> None:
    UPSTREAM_ERRORS.labels(protocol, reason).inc()


SMALL_TLS_BUFFER = 4 * 1024  # see controller.TLS_READ_BUFFER
BULK_TLS_BUFFER = 256 * 1024  # asyncio's own default
GROW_AT = 3 * 1024  # a relayed read this large (most of the small buffer): more is coming


class TLSBuffer:
    """Grow a TLS connection's read buffer while bulk data flows, shrink it once traffic is small.

    asyncio keeps the size in SSLProtocol.max_size (class attribute, lowered process-wide for
    idle sessions) and the buffer in _ssl_buffer; without those internals this does nothing.
    """

    __slots__ = ("proto", "big")

    def __init__(self, transport: asyncio.BaseTransport):
        proto = getattr(transport, "_ssl_protocol", None)
        ok = proto is not None and hasattr(proto, "_ssl_buffer") and hasattr(proto, "max_size")
        self.proto: Any = proto if ok else None
        self.big = False

    def seen(self, n: int) -> None:
        proto = self.proto
        if proto is None:
            return
        if n >= GROW_AT and not self.big:
            proto.max_size = BULK_TLS_BUFFER  # get_buffer() grows the buffer on the next read
            self.big = True
        elif n < 2048 and self.big:
            proto.max_size = SMALL_TLS_BUFFER
            proto._ssl_buffer = bytearray(SMALL_TLS_BUFFER)
            proto._ssl_buffer_view = memoryview(proto._ssl_buffer)
            self.big = False


#: Bytes read from a client at a time before login (the relay reads more).
PRELOGIN_READ = 16 * 1024


class BoundedReads(asyncio.BufferedProtocol):
    """A client connection's protocol until login: reads of at most ``len(buffer)`` bytes, fed
    to a StreamReaderProtocol (``inner``, the StreamWriter's protocol).

    Left to themselves, the transports read what the socket holds (uvloop up to 250 KB a read,
    asyncio 256 KiB) into the StreamReader at once; a stranger's commands need far less (the
    reader's pause mark, controller.STREAM_LIMIT, bounds how much piles up). Both loops'
    transports, plain and TLS, read into get_buffer()'s buffer and hand the bytes on before the
    next read, so one buffer per loop serves every connection. The relay sets its own protocol
    after login."""

    __slots__ = ("inner", "buffer")

    def __init__(self, inner: asyncio.StreamReaderProtocol, buffer: memoryview):
        self.inner = inner
        self.buffer = buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.data_received(bytes(self.buffer[:nbytes]))

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _quickack(transport: asyncio.BaseTransport) -> Callable[[], None]:
    """Acknowledge what was read at once. A client that leaves Nagle's algorithm on holds its
    next small write until our ACK, which Linux delays by up to 40 ms when we have nothing to send
    back: each SMTP message through the relay stalled that long. Linux clears the flag after each
    read, so it is set again every time."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return lambda: None

    def ack() -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass

    return ack


__all__ = [
    "LineReader",
    "LineTooLong",
    "PeerGone",
    "TLSOnPlainPort",
    "Upstream",
    "UpstreamError",
    "connect_upstream",
]
