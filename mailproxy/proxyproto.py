"""The PROXY protocol (HAProxy's, versions 1 and 2): the real client behind a TCP load balancer.

A load balancer that passes mail connections on (HAProxy ``send-proxy``/``send-proxy-v2``, nginx
``proxy_protocol on``) sends one header before anything else, naming the client's address. It is
honoured only from the configured trusted proxies, and from them it is required; a missing,
malformed or truncated header closes the connection. A header from anyone else is never read:
to a plain listener it is an unknown command, to a TLS listener a failed handshake.

``read_header`` returns the client's ``(ip, port)``, or None for a LOCAL connection (the
balancer's own health check), which keeps the balancer's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the whole line, CRLF included (the specification's limit)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 4096  # addresses plus TLVs; HAProxy sends far less

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """The header is missing, malformed or truncated; the message says how (no client data)."""


class ClosedEarly(ProxyHeaderError):
    """The connection closed before sending a byte (a TCP health check, say)."""


def parse_networks(value: str | Iterable[str]) -> tuple[Network, ...]:
    """``MAIL_TRUSTED_PROXIES``: addresses or CIDR ranges, separated by commas or spaces."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {item!r}") from None
    return tuple(networks)


def is_trusted(ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether the connection's own peer address is one of the trusted proxies."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


Exactly = Callable[[int], Awaitable[bytes]]


async def read_header(exactly: Exactly, timeout: float) -> tuple[str, int] | None:
    """Read and check one PROXY header (v1 or v2) within ``timeout`` seconds.

    ``exactly(n)`` returns the next ``n`` bytes: nothing past the header is read, so that a TLS
    handshake can follow on the same socket.
    """
    try:
        return await asyncio.wait_for(_read(exactly), timeout)
    except TimeoutError:
        raise ProxyHeaderError("no PROXY header in time") from None


async def _read(exactly: Exactly) -> tuple[str, int] | None:
    start = await exactly(6)
    if start == V1_PREFIX:
        line = start
        while not line.endswith(b"\n"):
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 header too long")
            line += await exactly(1)
        return parse_v1(line)
    if start == V2_SIGNATURE[:6]:
        head = start + await exactly(10)
        if head[:12] != V2_SIGNATURE:
            raise ProxyHeaderError("not a PROXY header")
        (length,) = struct.unpack("!H", head[14:16])
        if length > V2_MAX_PAYLOAD:
            raise ProxyHeaderError("PROXY v2 header too long")
        return parse_v2(head + (await exactly(length) if length else b""))
    raise ProxyHeaderError("not a PROXY header")


def socket_reader(sock: socket.socket) -> Exactly:
    """``exactly(n)`` over a non-blocking socket: reads never go past what is asked for."""
    loop = asyncio.get_running_loop()

    received = 0

    async def exactly(count: int) -> bytes:
        nonlocal received
        data = b""
        while len(data) < count:
            chunk = await loop.sock_recv(sock, count - len(data))
            if not chunk:
                raise (ClosedEarly if not received else ProxyHeaderError)("truncated PROXY header")
            data += chunk
            received += len(chunk)
        return data

    return exactly


def parse_v1(line: bytes) -> tuple[str, int] | None:
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``."""
    if len(line) > V1_MAX:
        raise ProxyHeaderError("PROXY v1 header too long")
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("PROXY v1 header does not end in CRLF")
    try:
        words = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    _, family, source, destination, source_port, destination_port = words
    version = 4 if family == "TCP4" else 6
    for text in (source, destination):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ProxyHeaderError("PROXY v1 header with a bad address") from None
        if address.version != version:
            raise ProxyHeaderError("PROXY v1 address does not match its family")
    for text in (source_port, destination_port):
        if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
            raise ProxyHeaderError("PROXY v1 header with a bad port")
    return source, int(source_port)


def parse_v2(header: bytes) -> tuple[str, int] | None:
    """The binary header: signature, version/command, family/transport, length, addresses."""
    version_command, family = header[12], header[13]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer itself (health checks)
        return None
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    payload = header[16:]
    if family == 0x11:  # TCP over IPv4
        if len(payload) < 12:
            raise ProxyHeaderError("truncated PROXY v2 addresses")
        source = ipaddress.IPv4Address(payload[0:4])
        (port,) = struct.unpack("!H", payload[8:10])
        return str(source), port
    if family == 0x21:  # TCP over IPv6
        if len(payload) < 36:
            raise ProxyHeaderError("truncated PROXY v2 addresses")
        source6 = ipaddress.IPv6Address(payload[0:16])
        (port,) = struct.unpack("!H", payload[32:34])
        mapped = source6.ipv4_mapped
        return str(mapped if mapped is not None else source6), port
    if family == 0x00:  # UNSPEC: keep the connection's address
        return None
    raise ProxyHeaderError("PROXY v2 header for an unsupported transport")


# --- Listening behind a load balancer ---------------------------------------------------------
