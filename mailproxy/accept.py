"""Accepting connections. The limits apply at accept(), before a TLS handshake or a buffer is
spent on a connection; a process out of file descriptors pauses accepting and logs one line."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mailproxy")

#: Connections taken per wake-up of a listener: a flood of connects cannot starve the sessions.
ACCEPT_BATCH = 64
#: Seconds a listener stops accepting after the process ran out of file descriptors.
ACCEPT_BACKOFF = 1.0
#: Kernel queue of connections not yet accepted (they cost the process nothing).
LISTEN_BACKLOG = 1024
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def open_file_limit() -> int | None:
    """The process's soft open-file limit (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_ceiling(open_files: int | None, reserve: int) -> int | None:
    """How many connections fit in ``open_files`` descriptors: two each (client and upstream),
    beside ``reserve`` for everything else in the process (at most a third of the limit)."""
    if open_files is None:
        return None
    reserve = min(reserve, open_files // 3)
    return max(1, (open_files - reserve) // 2)


class RareLog:
    """A warning that may repeat thousands of times a second, written at most once per
    ``interval`` seconds and key, with the count of those left out since."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0):
        self.logger = logger
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log unless this key was logged less than ``interval`` ago; True if logged."""
        now = time.monotonic()
        last, left_out = self._seen.get(key, (now - self.interval, 0))
        if now - last < self.interval:
            self._seen[key] = (last, left_out + 1)
            return False
        self._seen[key] = (now, 0)
        if left_out:
            msg += " (and %d more since the last such message)"
            args = (*args, left_out)
        self.logger.warning(msg, *args)
        return True


async def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Acceptor:
    """Accepts on one listening socket and hands each connection to ``admit`` at once.

    ``admit`` decides (limits) and owns the socket from then on. When accept() fails for lack
    of descriptors or memory, ``exhausted`` is told and the listener pauses ACCEPT_BACKOFF
    seconds: the kernel keeps queueing connections meanwhile, and no traceback is written.
    """

    def __init__(
        self,
        sock: socket.socket,
        admit: Callable[[socket.socket, Any], None],
        exhausted: Callable[[OSError], None],
    ):
        self.sock = sock
        self.admit = admit
        self.exhausted = exhausted
        self.loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FILES:
                    self.exhausted(exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self._resume = self.loop.call_later(ACCEPT_BACKOFF, self._restart)
                    return
                continue  # that one connection failed (reset before accept, firewall)
            self.admit(conn, address)

    def _restart(self) -> None:
        self._resume = None
        if self.sock.fileno() >= 0:
            self.start()
