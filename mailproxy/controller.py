"""Runs the listeners on an asyncio loop in a daemon thread of the serving process.

``start()`` binds every configured listener and raises OSError in the caller if one fails;
``stop()`` may be called from any thread and closes listeners and sessions.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
from typing import Any

from . import proxyproto
from .accept import Acceptor, RareLog, connection_ceiling, listen, open_file_limit
from .backend import Backend
from .common import PRELOGIN_READ, BoundedReads
from .imap import IMAPSession
from .metrics import CONNECTIONS_REFUSED, SESSIONS_OPEN
from .pool import UpstreamPool
from .pop3 import POP3Session
from .session import Session
from .settings import EVENT_LOOPS, LISTENER_NAMES, ProxySettings, parse_hostport
from .smtp import SMTPSession
from .tls import server_context, upstream_context

log = logging.getLogger("mailproxy")

# asyncio gives every TLS connection a 256 KiB read buffer: 0.5 MiB per relayed session, which
# 1,000 idle IMAP sessions cannot afford. An idle session's traffic (IDLE's EXISTS lines, a
# NOOP) fits in 4 KiB; a TLS record up to 16 KiB is read in several steps, and the relay grows
# the buffer of a busy connection (common.TLSBuffer).
TLS_READ_BUFFER = 4 * 1024


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new loop of ``kind`` (see settings.EVENT_LOOPS).

    :raises ValueError: for another kind, or uvloop when it is not installed.
    """
    if kind == "asyncio":
        return asyncio.new_event_loop()
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError(
                "the uvloop event loop is not installed (pip install uvloop, or use asyncio)"
            ) from None
        return uvloop.new_event_loop()
    raise ValueError(f"the event loop must be one of {', '.join(EVENT_LOOPS)}, not {kind!r}")


def _limit_tls_buffers() -> None:
    proto: Any = asyncio.sslproto.SSLProtocol
    if getattr(proto, "max_size", 0) > TLS_READ_BUFFER:
        proto.max_size = TLS_READ_BUFFER


#: listener name -> (session class, implicit TLS)
LISTENERS: dict[str, tuple[type[Session], bool]] = {
    "imap": (IMAPSession, False),
    "imaps": (IMAPSession, True),
    "pop3": (POP3Session, False),
    "pop3s": (POP3Session, True),
    "submission": (SMTPSession, False),
    "smtps": (SMTPSession, True),
}
assert set(LISTENERS) == set(LISTENER_NAMES)

BUSY = {
    "imap": b"* BYE Too many connections, try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    "smtp": b"421 4.7.0 Too many connections, try again later\r\n",
}
REFUSED_WHY = {
    "limit": "the proxy's connection limit",
    "per_ip": "the connection limit per client address",
}
#: A client's StreamReader pauses reading from the socket at twice this many buffered bytes.
#: Before login it only holds commands (lines and literals of at most 8 KiB); uvloop reads a
#: socket until that pause before the session runs again, so a higher mark let each of 200
#: flooding strangers park 128 KiB here. After login the relay does not read through it (a
#: message for Graph does, in 32 KiB steps).
STREAM_LIMIT = PRELOGIN_READ


class Hub:
    """State shared by all sessions of one Controller: settings, backend, TLS contexts, limits."""

    def __init__(self, settings: ProxySettings, backend: Backend):
        self.settings = settings
        self.backend = backend
        self.server_ssl: ssl.SSLContext | None = None
        if settings.tls_cert and settings.tls_key:
            self.server_ssl = server_context(
                settings.tls_cert, settings.tls_key, settings.tls_key_group_readable
            )
        self.upstream_ssl = upstream_context(settings.upstream_ca_file)
        self.pool: UpstreamPool | None = None
        if settings.upstream_pool_size > 0:
            self.pool = UpstreamPool(settings.upstream_pool_size, settings.upstream_pool_max_age)
        self.open_files = open_file_limit()
        self.max_connections = settings.max_connections
        ceiling = connection_ceiling(self.open_files, settings.fd_reserve)
        if ceiling is not None and ceiling < self.max_connections:
            log.warning(
                "mail connections limited to %d instead of %d: the open-file limit is %d and "
                "each connection may need 2 (raise LimitNOFILE)",
                ceiling,
                self.max_connections,
                self.open_files,
            )
            self.max_connections = ceiling
        self.trusted = proxyproto.parse_networks(settings.trusted_proxies)
        self.per_ip: dict[str, int] = {}
        self.total = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0  # unexpected exceptions: should stay 0
        self.rare = RareLog(log)
        # Every client connection's reads before login (see common.BoundedReads).
        self.read_buffer = memoryview(bytearray(PRELOGIN_READ))

    def admit(self, conn: socket.socket, address: Any, cls: type[Session], tls: bool) -> None:
        """A connection just accepted: count it, or refuse it before it costs anything more."""
        ip = address[0] if isinstance(address, tuple) else "unknown"
        refused = None
        if self.total >= self.max_connections:
            refused = "limit"
        elif self.per_ip.get(ip, 0) >= self.settings.max_connections_per_ip and not (
            self.trusted and proxyproto.is_trusted(ip, self.trusted)
        ):  # a load balancer's clients are counted once its PROXY header names them
            refused = "per_ip"
        if refused is not None:
            CONNECTIONS_REFUSED.labels(cls.protocol, refused).inc()
            self.rare.warning(
                refused, "connection from %s refused: %s reached", ip, REFUSED_WHY[refused]
            )
            if not tls:  # a TLS client would read the text as a broken handshake
                try:
                    conn.setblocking(False)
                    conn.send(BUSY[cls.protocol])
                except OSError:
                    pass
            conn.close()
            return
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        task = asyncio.get_running_loop().create_task(self.serve(conn, ip, cls, tls))
        self.tasks.add(task)

    def exhausted(self, exc: OSError) -> None:
        """accept() failed for lack of file descriptors (or memory)."""
        CONNECTIONS_REFUSED.labels("any", "files").inc()
        self.rare.warning(
            "files",
            "not accepting mail connections for a moment: %s (open-file limit %s, "
            "%d connections open)",
            exc.strerror,
            self.open_files or "unlimited",
            self.total,
        )

    async def proxied_client(
        self, conn: socket.socket, ip: str, cls: type[Session], tls: bool
    ) -> str | None:
        """Read a trusted load balancer's PROXY header (before TLS) and move this connection's
        count to the client it names; None when the header is bad or that client is over its
        limit (the connection is then closed by the caller)."""
        conn.setblocking(False)
        try:
            found = await proxyproto.read_header(
                proxyproto.socket_reader(conn),
                min(self.settings.handshake_timeout, self.settings.idle_timeout_prelogin),
            )
        except (proxyproto.ProxyHeaderError, OSError) as error:
            quiet = isinstance(error, proxyproto.ClosedEarly)  # a health check's bare connect
            log.log(logging.DEBUG if quiet else logging.WARNING, "%s refused: %s", ip, error)
            return None
        if found is None or found[0] == ip:  # PROXY UNKNOWN / LOCAL: the balancer itself
            return ip
        client = found[0]
        if self.per_ip.get(client, 0) >= self.settings.max_connections_per_ip:
            CONNECTIONS_REFUSED.labels(cls.protocol, "per_ip").inc()
            self.rare.warning(
                "per_ip", "connection from %s refused: %s reached", client, REFUSED_WHY["per_ip"]
            )
            if not tls:
                with contextlib.suppress(OSError):
                    conn.send(BUSY[cls.protocol])
            return None
        self._release(ip)
        self.per_ip[client] = self.per_ip.get(client, 0) + 1
        return client

    def _release(self, ip: str) -> None:
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    async def serve(self, conn: socket.socket, ip: str, cls: type[Session], tls: bool) -> None:
        """One counted connection, from TLS handshake to close."""
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        gauge = SESSIONS_OPEN.labels(cls.protocol)
        gauge.inc()
        writer: asyncio.StreamWriter | None = None
        try:
            if self.trusted and proxyproto.is_trusted(ip, self.trusted):
                client = await self.proxied_client(conn, ip, cls, tls)
                if client is None:
                    return
                ip = client
            reader = asyncio.StreamReader(limit=STREAM_LIMIT)
            made: list[asyncio.StreamWriter] = []
            protocol = asyncio.StreamReaderProtocol(reader, lambda r, w: made.append(w))
            bounded = BoundedReads(protocol, self.read_buffer)
            try:
                await loop.connect_accepted_socket(
                    lambda: bounded,
                    conn,
                    ssl=self.server_ssl if tls else None,
                    ssl_handshake_timeout=self.settings.handshake_timeout if tls else None,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                log.debug("connection from %s ended in the TLS handshake: %r", ip, exc)
                return
            writer = made[0]
            session = cls(self, reader, writer, tls, accepted)
            session.peer_ip = ip
            await session.run()
        except asyncio.CancelledError:
            pass  # stop(): end quietly
        except Exception:
            self.errors += 1
            log.exception("unexpected error in a %s session from %s", cls.protocol, ip)
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()
            gauge.dec()
            self.total -= 1
            self._release(ip)
            task = asyncio.current_task()
            if task is not None:
                self.tasks.discard(task)


class Controller:
    """The proxy's own event loop in a daemon thread."""

    def __init__(self, backend: Backend, settings: ProxySettings | None = None):
        self.settings = settings or ProxySettings()
        self.backend = backend
        self.hub: Hub | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptors: list[Acceptor] = []
        self._listening: dict[str, tuple[str, int]] = {}

    @property
    def listening(self) -> dict[str, tuple[str, int]]:
        """Listener name -> (host, port) actually bound (so port 0 works)."""
        return dict(self._listening)

    @property
    def max_connections(self) -> int:
        """The connection limit in force (the setting, lowered to fit the open-file limit)."""
        return self.hub.max_connections if self.hub else self.settings.max_connections

    @property
    def errors(self) -> int:
        """Unexpected exceptions caught in sessions or by the loop since start (should be 0)."""
        return self.hub.errors if self.hub else 0

    def start(self, timeout: float = 10.0) -> None:
        """Bind every configured listener; raise OSError here if one cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("already started")
        loop = new_event_loop(self.settings.event_loop)
        self.hub = Hub(self.settings, self.backend)
        _limit_tls_buffers()  # asyncio's TLS transport only (uvloop's has its own buffer)
        self.loop = loop
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.settings.backend_threads, thread_name_prefix="mailproxy-backend"
            )
        )
        loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=loop.run_forever, name="mailproxy", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._bind(), loop).result(timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        log.info("mail proxy running on the %s event loop", self.settings.event_loop)

    async def _bind(self) -> None:
        hub = self.hub
        assert hub is not None
        try:
            for name, (cls, tls) in LISTENERS.items():
                spec = self.settings.listeners.get(name, "")
                if not spec:
                    continue
                host, port = parse_hostport(spec)
                if tls and hub.server_ssl is None:
                    raise OSError(f"listener {name} needs tls_cert and tls_key")
                try:
                    socks = await listen(host, port)
                except OSError as exc:
                    # Name the listener, so the person knows which setting to change.
                    raise OSError(
                        exc.errno,
                        f"the {name} listener cannot use {host}:{port}: {exc.strerror or exc}",
                    ) from None

                def admit(conn: Any, address: Any, cls: type[Session] = cls, tls: bool = tls):
                    hub.admit(conn, address, cls, tls)

                for sock in socks:
                    acceptor = Acceptor(sock, admit, hub.exhausted)
                    acceptor.start()
                    self._acceptors.append(acceptor)
                bound = socks[0].getsockname()
                self._listening[name] = (bound[0], bound[1])
                log.info("%s listening on %s:%s", name, bound[0], bound[1])
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        hub = self.hub
        if hub is not None:
            if hub.pool is not None:
                hub.pool.close()
            tasks = list(hub.tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self._acceptors.clear()
        self._listening.clear()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            log.debug("connection error: %s", context.get("message"))
            return
        if self.hub is not None:
            self.hub.errors += 1
        log.error("unhandled error in the proxy loop: %s", context.get("message"), exc_info=exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Close listeners and sessions and end the loop thread; safe from any thread."""
        loop = self.loop
        if loop is None or self._thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("proxy did not close all sessions in time")
        self._shutdown_loop(timeout)

    def _shutdown_loop(self, timeout: float = 10.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
        self.loop = None
        self._thread = None

    def __enter__(self) -> Controller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
