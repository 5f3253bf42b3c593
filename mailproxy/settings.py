"""Proxy settings: plain values the app fills from its own configuration layers."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Listener name -> "host:port" defaults (the AUTH_EMAIL_*_LISTEN settings of the app).
DEFAULT_LISTENERS: dict[str, str] = {
    "imap": "127.0.0.1:1143",
    "imaps": "127.0.0.1:1993",
    "pop3": "127.0.0.1:1110",
    "pop3s": "127.0.0.1:1995",
    "submission": "127.0.0.1:1587",
    "smtps": "127.0.0.1:1465",
}

LISTENER_NAMES = tuple(DEFAULT_LISTENERS)

#: The event loops the proxy's thread can run on: uvloop (libuv, its TLS transport in Cython:
#: less CPU per handshake and per relayed record) or the standard library's.
EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass
class ProxySettings:
    """Everything the proxy needs to know; no field is read from the environment here."""

    listeners: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LISTENERS))
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream_ca_file: str | None = None
    hostname: str = "localhost"
    tls_key_group_readable: bool = False  # a configured key shared with the ACME client's group
    # Before login a connection is a stranger's: everything it may cost is bounded.
    handshake_timeout: float = 10.0  # TLS handshake (implicit TLS and STARTTLS)
    idle_timeout_prelogin: float = 60.0  # between two commands, and for the client to read
    goodbye_timeout: float = 5.0  # closing: then the connection is cut (the client does not read)
    prelogin_lifetime: float = 300.0  # from accept to login, however busy the client keeps it
    max_prelogin_commands: int = 50
    max_line: int = 8192  # one line (IMAP: each line of a command)
    max_literal: int = 8192  # one IMAP literal
    max_literals_per_command: int = 8
    max_literal_bytes_per_command: int = 16384
    unknown_command_budget: int = 10
    idle_timeout: float = 1800.0  # after login (long enough for IMAP IDLE)
    upstream_timeout: float = 30.0
    # Greeted upstream connections opened ahead of IMAP and POP3 logins, per server (0: none),
    # and the seconds one is kept unused (below every server's pre-login timeout).
    upstream_pool_size: int = 2
    upstream_pool_max_age: float = 20.0
    # Connections, counted from accept (the TLS handshake included). Each one needs up to two
    # file descriptors (client and upstream): Controller.start lowers max_connections so that
    # 2 * max_connections + fd_reserve stays within the process's open-file limit.
    max_connections: int = 4096
    max_connections_per_ip: int = 256
    fd_reserve: int = 320  # web server, database, token requests, logs
    max_auth_failures: int = 3
    allow_plaintext_from_loopback: bool = True
    # Load balancers whose PROXY protocol header (v1/v2) gives the client's address: addresses
    # or CIDR ranges. Connections from them must start with one; from others it is never read.
    trusted_proxies: tuple[str, ...] = ()
    backend_threads: int = 32
    event_loop: str = "uvloop"  # one of EVENT_LOOPS
    reauth_message: str = (
        "The mail provider refused this account's token: re-authorize the account on the "
        "Auth-Email accounts page"
    )


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces of loopback default) -> (host, port)."""
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listener address must be host:port, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)
