"""Runs the listeners on an asyncio loop in a daemon thread of the serving process.

``start()`` binds every configured listener and raises OSError in the caller if one fails;
``stop()`` may be called from any thread and closes listeners and sessions.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import concurrent.futures
import logging
import ssl
import threading
from typing import Any

from . import proxyproto
from .backend import Backend
from .imap import IMAPSession
from .metrics import SESSIONS_OPEN
from .pop3 import POP3Session
from .session import Session
from .settings import LISTENER_NAMES, ProxySettings, parse_hostport
from .smtp import SMTPSession
from .tls import server_context, upstream_context

log = logging.getLogger("mailproxy")

# asyncio gives every TLS connection a 256 KiB read buffer: 0.5 MiB per relayed session, which
# 1,000 idle IMAP sessions cannot afford. One TLS record is at most 16 KiB, so that is enough.
TLS_READ_BUFFER = 16 * 1024


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
    "imap": "* BYE Too many connections, try again later",
    "pop3": "-ERR [SYS/TEMP] Too many connections, try again later",
    "smtp": "421 4.7.0 Too many connections, try again later",
}


class Hub:
    """State shared by all sessions of one Controller: settings, backend, TLS contexts, limits."""

    def __init__(self, settings: ProxySettings, backend: Backend):
        self.settings = settings
        self.backend = backend
        self.server_ssl: ssl.SSLContext | None = None
        if settings.tls_cert and settings.tls_key:
            self.server_ssl = server_context(settings.tls_cert, settings.tls_key)
        self.upstream_ssl = upstream_context(settings.upstream_ca_file)
        self.trusted = proxyproto.parse_networks(settings.trusted_proxies)
        self.per_ip: dict[str, int] = {}
        self.total = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0  # unexpected exceptions: should stay 0

    async def serve(
        self, cls: type[Session], tls: bool, reader: Any, writer: Any, client: str | None = None
    ) -> None:
        """One accepted connection, from limits check to close.

        ``client``: the address a trusted load balancer's PROXY header named (see proxyproto).
        """
        peer = writer.get_extra_info("peername")
        ip = client or (peer[0] if isinstance(peer, tuple) else "unknown")
        s = self.settings
        if self.total >= s.max_connections or self.per_ip.get(ip, 0) >= s.max_connections_per_ip:
            log.warning("connection from %s refused: too many connections", ip)
            try:
                writer.write(BUSY[cls.protocol].encode() + b"\r\n")
                await asyncio.wait_for(writer.drain(), 2)
            except (OSError, TimeoutError):
                pass
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        gauge = SESSIONS_OPEN.labels(cls.protocol)
        gauge.inc()
        try:
            session = cls(self, reader, writer, tls)
            session.peer_ip = ip
            await session.run()
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio reports a cancelled connection task as an error)
            writer.close()
        except Exception:
            self.errors += 1
            log.exception("unexpected error in a %s session from %s", cls.protocol, ip)
            writer.close()
        finally:
            gauge.dec()
            self.total -= 1
            left = self.per_ip[ip] - 1
            if left:
                self.per_ip[ip] = left
            else:
                del self.per_ip[ip]
            self.tasks.discard(task)


class Controller:
    """The proxy's own event loop in a daemon thread."""

    def __init__(self, backend: Backend, settings: ProxySettings | None = None):
        self.settings = settings or ProxySettings()
        self.backend = backend
        self.hub: Hub | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: dict[str, Any] = {}  # asyncio servers, or proxyproto's
        self._listening: dict[str, tuple[str, int]] = {}

    @property
    def listening(self) -> dict[str, tuple[str, int]]:
        """Listener name -> (host, port) actually bound (so port 0 works)."""
        return dict(self._listening)

    @property
    def errors(self) -> int:
        """Unexpected exceptions caught in sessions or by the loop since start (should be 0)."""
        return self.hub.errors if self.hub else 0

    def start(self, timeout: float = 10.0) -> None:
        """Bind every configured listener; raise OSError here if one cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self.hub = Hub(self.settings, self.backend)
        _limit_tls_buffers()
        loop = self.loop = asyncio.new_event_loop()
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

                def serve(r: Any, w: Any, cls: type[Session] = cls, tls: bool = tls) -> Any:
                    return hub.serve(cls, tls, r, w)

                def proxied(
                    r: Any, w: Any, ip: str | None, cls: type[Session] = cls, tls: bool = tls
                ) -> Any:
                    return hub.serve(cls, tls, r, w, ip)

                try:
                    server: Any
                    if hub.trusted:  # behind a load balancer: PROXY headers first
                        server = await proxyproto.start_server(
                            proxied,
                            host,
                            port,
                            trusted=hub.trusted,
                            tls=hub.server_ssl if tls else None,
                            timeout=self.settings.idle_timeout_prelogin,
                        )
                    else:
                        server = await asyncio.start_server(
                            serve,
                            host,
                            port,
                            ssl=hub.server_ssl if tls else None,
                            ssl_handshake_timeout=self.settings.idle_timeout_prelogin
                            if tls
                            else None,
                            limit=65536,
                            backlog=1024,
                        )
                except OSError as exc:
                    # Name the listener, so the person knows which setting to change.
                    raise OSError(
                        exc.errno, f"the {name} listener cannot use {host}:{port}: {exc.strerror}"
                    ) from None
                self._servers[name] = server
                sock = server.sockets[0].getsockname()
                self._listening[name] = (sock[0], sock[1])
                log.info("%s listening on %s:%s", name, sock[0], sock[1])
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        for server in self._servers.values():
            server.close()
        hub = self.hub
        if hub is not None:
            tasks = list(hub.tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self._servers.clear()
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
