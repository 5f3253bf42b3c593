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


@dataclass
class ProxySettings:
    """Everything the proxy needs to know; no field is read from the environment here."""

    listeners: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LISTENERS))
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream_ca_file: str | None = None
    hostname: str = "localhost"
    idle_timeout_prelogin: float = 60.0
    idle_timeout: float = 1800.0
    upstream_timeout: float = 30.0
    max_line: int = 8192
    max_literal: int = 8192
    max_connections: int = 4096
    max_connections_per_ip: int = 1024
    unknown_command_budget: int = 10
    max_auth_failures: int = 3
    allow_plaintext_from_loopback: bool = True
    # Load balancers whose PROXY protocol header (v1/v2) gives the client's address: addresses
    # or CIDR ranges. Connections from them must start with one; from others it is never read.
    trusted_proxies: tuple[str, ...] = ()
    backend_threads: int = 32
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
