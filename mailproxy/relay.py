"""The relay after login, at the protocol level: what one transport delivers is written to the
other in the same callback.

Compared with two tasks copying between StreamReaders, a relayed byte skips the reader's buffer
and a task wake-up on each side (one less loop pass per SMTP command and reply), and an idle
session holds no tasks and no reader buffers, only the two transports and this object.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .common import PeerGone, TLSBuffer, _quickack
from .metrics import BYTES_RELAYED


class _Side(asyncio.Protocol):
    """The protocol of one transport: data from it goes to ``peer``'s transport."""

    __slots__ = ("relay", "transport", "peer", "count", "metric", "tls", "ack", "client")

    def __init__(self, relay: Relay, transport: Any, index: int, metric: Any, client: bool):
        self.relay = relay
        self.transport = transport
        self.peer: _Side | None = None
        self.count = index
        self.metric = metric
        self.tls = TLSBuffer(transport)
        self.ack = _quickack(transport)
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.ack()
        relay = self.relay
        if self.client:
            relay.last_heard = relay.loop.time()
        assert self.peer is not None
        self.peer.transport.write(data)
        n = len(data)
        relay.bytes[self.count] += n
        self.metric.inc(n)
        self.tls.seen(n)

    def eof_received(self) -> bool:
        self.relay.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.finish()

    # Our transport cannot take more: stop reading from the other one until it can.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Relay:
    """Both directions of one session; ``done`` resolves when either side ends or the client
    stays silent for ``idle`` seconds. ``bytes`` is [client to upstream, upstream to client]."""

    def __init__(self, client: Any, upstream: Any, protocol: str, idle: float | None):
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.bytes = [0, 0]
        self.idle = idle
        self.last_heard = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.client = _Side(self, client, 0, BYTES_RELAYED.labels(protocol, "in"), True)
        self.upstream = _Side(self, upstream, 1, BYTES_RELAYED.labels(protocol, "out"), False)
        self.client.peer, self.upstream.peer = self.upstream, self.client

    def start(self, from_client: bytes, from_upstream: bytes, client_eof: bool, up_eof: bool):
        """Take over both transports; bytes the login read past its end go first."""
        if from_client:
            self.client.data_received(from_client)
        if from_upstream:
            self.upstream.data_received(from_upstream)
        for side in (self.client, self.upstream):
            side.transport.set_protocol(side)
            if side.transport.is_closing():
                self.finish()
        if client_eof or up_eof:
            self.finish()
        for side in (self.client, self.upstream):
            if not side.transport.is_closing():
                side.transport.resume_reading()
        if self.idle is not None:
            self._timer = self.loop.call_at(self.last_heard + self.idle, self._check_idle)

    def _check_idle(self) -> None:
        assert self.idle is not None
        due = self.last_heard + self.idle
        if self.loop.time() >= due:
            self.finish()
        else:
            self._timer = self.loop.call_at(due, self._check_idle)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        """Close both transports (each sends what it still buffers first)."""
        if self._timer is not None:
            self._timer.cancel()
        self.client.transport.close()
        self.upstream.transport.close()


def pending(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What a StreamReader buffered and nobody read yet, and whether it saw EOF."""
    buf = getattr(reader, "_buffer", None)
    data = bytes(buf) if buf else b""
    if buf:
        buf.clear()
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False))


__all__ = ["PeerGone", "Relay", "pending"]
