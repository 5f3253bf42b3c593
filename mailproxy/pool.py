"""Upstream connections made ahead of logins: the TCP connect, the TLS handshake and the server's
greeting leave the login path.

After a login to a mail server, a few connections to it are opened and greeted in the background;
the next logins take one instead of connecting. An unused connection is closed after
``max_age`` seconds, well before a server drops a connection that does not log in (Dovecot
after 3 minutes, most providers after one). The pool refills only when a login takes from it, so
an idle instance holds none and each login costs at most ``size`` spare connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .backend import Endpoint
from .common import Upstream

log = logging.getLogger("mailproxy")

Key = tuple[str, Endpoint]
Opener = Callable[[], Awaitable[Upstream]]


class UpstreamPool:
    """Greeted upstream connections per (protocol, server), opened in the background.

    :param size: connections kept ready per (protocol, server); 0 turns the pool off.
    :param max_age: seconds an unused connection is kept before it is closed.
    :param max_total: connections held (ready or being opened) across all servers.
    """

    def __init__(self, size: int, max_age: float, max_total: int = 64):
        self.size = size
        self.max_age = max_age
        self.max_total = max_total
        self.ready: dict[Key, deque[tuple[float, Upstream]]] = {}
        self.opening: dict[Key, int] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.timers: set[asyncio.TimerHandle] = set()
        self.closed = False
        self.hits = 0
        self.misses = 0

    @property
    def held(self) -> int:
        return sum(len(q) for q in self.ready.values()) + sum(self.opening.values())

    def take(self, key: Key, opener: Opener) -> Upstream | None:
        """A ready connection for ``key`` or None; either way the pool is refilled behind it."""
        if self.size <= 0 or self.closed:
            return None
        now = asyncio.get_running_loop().time()
        q = self.ready.get(key)
        found = None
        while q:
            born, up = q.popleft()
            if now - born < self.max_age and usable(up):
                found = up
                break
            up.close()
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        self._fill(key, opener)
        return found

    def _fill(self, key: Key, opener: Opener) -> None:
        missing = self.size - len(self.ready.get(key, ())) - self.opening.get(key, 0)
        missing = min(missing, self.max_total - self.held)
        for _ in range(max(0, missing)):
            self.opening[key] = self.opening.get(key, 0) + 1
            task = asyncio.get_running_loop().create_task(self._open(key, opener))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _open(self, key: Key, opener: Opener) -> None:
        try:
            up = await opener()
        except Exception as exc:  # the login that needs one connects itself and reports it
            log.debug("pooled connection to %s:%s failed: %r", key[1].host, key[1].port, exc)
            return
        finally:
            self.opening[key] -= 1
            if not self.opening[key]:
                del self.opening[key]
        if self.closed:
            up.close()
            return
        up.pooled = True
        loop = asyncio.get_running_loop()
        self.ready.setdefault(key, deque()).append((loop.time(), up))
        timer: list[asyncio.TimerHandle] = []
        timer.append(loop.call_later(self.max_age, self._expire, key, up, timer))
        self.timers.add(timer[0])

    def _expire(self, key: Key, up: Upstream, timer: list[asyncio.TimerHandle]) -> None:
        self.timers.discard(timer[0])
        q = self.ready.get(key)
        if q is None:
            return
        for i, (_, held) in enumerate(q):
            if held is up:
                del q[i]
                up.close()
                break
        if not q:
            del self.ready[key]

    def close(self) -> None:
        """Close every held connection and stop opening new ones."""
        self.closed = True
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        for task in self.tasks:
            task.cancel()
        for q in self.ready.values():
            for _, up in q:
                up.close()
        self.ready.clear()


def usable(up: Upstream) -> bool:
    """Still open, and the server has said nothing since its greeting (a BYE, say)."""
    transport = up.writer.transport
    return (
        not transport.is_closing()
        and not up.reader.at_eof()
        and not up.lines.buf
        and not getattr(up.reader, "_buffer", b"")
    )
