"""Configuration layers: defaults, then instance/config.py, then AUTH_EMAIL_* variables, then tests.

Only plain values live here; secrets are generated into the instance folder (see vault.py and
app.py), never given a default.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mailproxy.common import is_loopback
from mailproxy.settings import DEFAULT_LISTENERS, LISTENER_NAMES, ProxySettings

ENV_PREFIX = "AUTH_EMAIL_"

#: The mail proxy's listeners (mailproxy's table): the setting that holds each one's host:port.
LISTEN_SETTINGS = {name: f"{name.upper()}_LISTEN" for name in LISTENER_NAMES}
_PROXY = ProxySettings()

DEFAULTS: dict[str, Any] = {
    # The address people reach the web UI at; OAuth redirect URIs are built from it.
    "PUBLIC_URL": "http://127.0.0.1:8080",
    # Where the web UI listens (the serve entry point; `flask run` has its own flag).
    "BIND": "127.0.0.1:8080",
    # The reverse proxy in front of the web UI (e.g. 127.0.0.1): its X-Forwarded-For/-Proto
    # headers then give each request's client address (audit log, throttling, /metrics).
    "TRUSTED_PROXY": "",
    # Empty: SQLite file auth-email.db in the instance folder.
    "DATABASE_URL": "",
    # Host name users put into their mail clients; empty means the public URL's host.
    "MAIL_HOST": "",
    # Request size limits of the web UI: the whole body, and one form field (every form here is a
    # few KiB; a larger request is refused with 413 before it is read).
    "MAX_REQUEST_BYTES": 1048576,
    "MAX_FORM_FIELD_BYTES": 65536,
    # Mail proxy listeners (IMAP_LISTEN ... SMTPS_LISTEN), host:port each; empty disables one.
    **{LISTEN_SETTINGS[name]: address for name, address in DEFAULT_LISTENERS.items()},
    # Mail proxy limits: connections in all and per client IP, idle seconds before and after login.
    "MAIL_MAX_CONNECTIONS": _PROXY.max_connections,
    "MAIL_MAX_CONNECTIONS_PER_IP": _PROXY.max_connections_per_ip,
    "MAIL_IDLE_TIMEOUT_PRELOGIN": _PROXY.idle_timeout_prelogin,
    "MAIL_IDLE_TIMEOUT": _PROXY.idle_timeout,
    # Before login: seconds for the TLS handshake, seconds and commands until login.
    "MAIL_HANDSHAKE_TIMEOUT": _PROXY.handshake_timeout,
    "MAIL_PRELOGIN_SECONDS": _PROXY.prelogin_lifetime,
    "MAIL_PRELOGIN_COMMANDS": _PROXY.max_prelogin_commands,
    # TCP load balancers in front of the mail listeners (addresses or CIDR ranges, comma
    # separated): their PROXY protocol header (v1 or v2) names each client's real address.
    "MAIL_TRUSTED_PROXIES": "",
    "MAIL_UPSTREAM_POOL": _PROXY.upstream_pool_size,
    # The mail proxy's event loop: "uvloop" (less CPU per TLS handshake and relayed record) or
    # "asyncio" (the standard library's).
    "MAIL_EVENT_LOOP": _PROXY.event_loop,
    # Certificate for the mail listeners; empty: a self-signed pair in the instance folder.
    "TLS_CERT": "",
    "TLS_KEY": "",
    # Extra CA certificates trusted for upstream mail servers and token endpoints.
    "UPSTREAM_CA_FILE": "",
    # Token endpoint requests: timeout in seconds, attempts on timeouts and 5xx, first backoff.
    "TOKEN_HTTP_TIMEOUT": 15.0,
    "TOKEN_ATTEMPTS": 3,
    "TOKEN_BACKOFF": 0.5,
    # Microsoft Graph (SMTP through sendMail when a tenant turns SMTP AUTH off): base URL,
    # seconds per request, tries while Graph answers 5xx.
    "GRAPH_URL": "https://graph.microsoft.com",
    "GRAPH_TIMEOUT": 30.0,
    "GRAPH_ATTEMPTS": 3,
    # The built-in providers' hosts moved elsewhere (a test tenant, a national cloud's front
    # door, the test bed's simulators): a dict {"host[:port]": "host[:port]"} or, in the
    # environment, "host[:port]=host[:port]" pairs (see oauth/providers.py, parse_provider_hosts).
    "PROVIDER_HOSTS": "",
    # Notifications (email, webhook): how often the outbox is looked at, tries per message
    # (then it is marked failed), the first pause between tries (it doubles, at most an hour),
    # and seconds per SMTP or webhook request.
    "NOTIFY_POLL_SECONDS": 5.0,
    "NOTIFY_ATTEMPTS": 5,
    "NOTIFY_RETRY_SECONDS": 60,
    "NOTIFY_TIMEOUT": 15,
    # How often the serving process refreshes idle accounts (refresh tokens age out unused).
    "UPKEEP_INTERVAL_SECONDS": 3600,
    # Hosts that OAuth clients' URLs (permission, token, device, revocation) and custom mail
    # servers may name: "*" (any public host name or public IP), "*.example.org", "example.org",
    # separated by commas or spaces. The built-in providers' hosts are always allowed.
    "CUSTOM_CLIENT_HOSTS": "*",
    # Whether those may be loopback hosts (127.0.0.1, ::1, localhost), the only ones plain http
    # and plain mail connections may use: for tests and local development only.
    "CUSTOM_CLIENT_LOOPBACK": False,
    # Mail clients on loopback may log in without TLS. Turn off when a local TCP proxy or port
    # forward relays outside clients (they would all look like loopback).
    "MAIL_PLAINTEXT_FROM_LOOPBACK": True,
    # New users may add custom OAuth clients (the admin always may).
    "NEW_USERS_CUSTOM_CLIENTS": False,
    # Legacy Resource Owner Password grant (Microsoft); off unless the admin turns it on.
    "ALLOW_ROPC": False,
    # Failed logins (web and mail) before a pause, and the first pause in seconds (it doubles):
    # per address from one IP, per IP, and per address from all IPs together (high, so that a
    # stranger cannot lock a user out of their own mailbox; see throttle.py).
    "LOGIN_FAILURE_LIMIT": 5,
    "LOGIN_FAILURE_LIMIT_PER_IP": 20,
    "LOGIN_FAILURE_LIMIT_PER_ADDRESS": 100,
    "LOGIN_BLOCK_SECONDS": 60,
    # Lifetime of admin invite links.
    "INVITE_HOURS": 72,
    # Access to /metrics: "loopback" (default), "open", or a bearer token string.
    "METRICS_ACCESS": "loopback",
    # Log level of the serving process.
    "LOG_LEVEL": "INFO",
    # Log every SQL query with its parameters at DEBUG (they include password hashes): off unless
    # asked, whatever LOG_LEVEL says.
    "LOG_SQL": False,
    # argon2id cost; the defaults follow RFC 9106's low-memory profile.
    "ARGON2_TIME_COST": 3,
    "ARGON2_MEMORY_KIB": 65536,
    "ARGON2_PARALLELISM": 4,
}


def _coerce(label: str, raw: Any, default: Any) -> Any:
    """A setting given the type of its default: booleans, whole numbers, numbers (seconds and
    other durations may be fractional) and lists (comma-separated in a string). Environment
    values are strings; instance/config.py and tests may give either."""
    if isinstance(default, bool):
        if isinstance(raw, bool) or raw in (0, 1):
            return bool(raw)
        lowered = str(raw).strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{label} must be true or false, not {raw!r}")
    if isinstance(default, int | float) and not isinstance(raw, bool):
        kind = int if isinstance(default, int) else float
        try:
            if isinstance(raw, str) or (kind is float and isinstance(raw, int)):
                return kind(raw)
            if isinstance(raw, kind):
                return raw
        except ValueError:
            pass
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{label} must be {what}, not {raw!r}")
    if isinstance(default, list):
        if isinstance(raw, str):
            return [item.strip() for item in raw.split(",") if item.strip()]
        if isinstance(raw, list | tuple):
            return list(raw)
        raise ValueError(f"{label} must be a list, not {raw!r}")
    return raw


def typed(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every known setting in ``config`` with the type of its default (the one place settings
    get their types, whichever layer set them)."""
    return {
        name: _coerce(name, config[name], default)
        for name, default in DEFAULTS.items()
        if name in config
    }


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The AUTH_EMAIL_* settings present in ``environ``, typed like their defaults."""
    found: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        key = ENV_PREFIX + name
        if key in environ:
            found[name] = _coerce(key, environ[key], default)
    return found


def instance_path_from_environ(environ: Mapping[str, str] = os.environ) -> str | None:
    """AUTH_EMAIL_INSTANCE picks another instance folder (several instances on one machine)."""
    value = environ.get(ENV_PREFIX + "INSTANCE")
    return os.path.abspath(value) if value else None


# Request headers are a few cookies and the usual browser headers; waitress refuses more.
MAX_REQUEST_HEADER_BYTES = 65536


def web_server_limits(config: Mapping[str, Any]) -> dict[str, int]:
    """waitress options that bound what one request may make the web UI read and hold."""
    return {
        "max_request_body_size": int(config["MAX_REQUEST_BYTES"]),
        "max_request_header_size": MAX_REQUEST_HEADER_BYTES,
    }


def mail_host(config: Mapping[str, Any]) -> str:
    """The host name mail clients should use."""
    return config.get("MAIL_HOST") or urlsplit(config["PUBLIC_URL"]).hostname or "localhost"


# The one loopback check (issue 12): the mail proxy's, which the app uses everywhere too.
is_loopback_host = is_loopback


def _plain_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts OAuth clients and their mail servers may name (CUSTOM_CLIENT_HOSTS).

    A user allowed custom clients makes this server connect where the client says; the policy
    keeps that to what the instance allows: no loopback (so no plain http or plain mail) unless
    CUSTOM_CLIENT_LOOPBACK, no private or reserved IP literal unless listed exactly, and only
    host names matching a pattern. ``fixed`` hosts (the built-in providers') are always allowed.
    """

    patterns: tuple[str, ...] = ("*",)
    allow_loopback: bool = False
    fixed: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], fixed: Iterable[str] = ()) -> HostPolicy:
        raw = str(config.get("CUSTOM_CLIENT_HOSTS", "*"))
        patterns = tuple(_plain_host(p) for p in raw.replace(",", " ").split() if p.strip())
        return cls(
            patterns=patterns,
            allow_loopback=bool(config.get("CUSTOM_CLIENT_LOOPBACK", False)),
            fixed=frozenset(_plain_host(h) for h in fixed),
        )

    def refusal(self, host: str | None) -> str | None:
        """Why this server will not connect to ``host`` for a client, or None when it may."""
        if not host:
            return "Enter a host name."
        host = _plain_host(host)
        if host in self.fixed:  # the presets' hosts, or where the operator moved them
            return None
        if is_loopback_host(host):
            if self.allow_loopback:
                return None
            return f"{host} is a loopback host, which this server does not allow for clients."
        if host in self.patterns:
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            if address.is_global and "*" in self.patterns:
                return None
            return f"{host} is not an address this server allows for clients."
        if host == "localhost" or host.endswith(".localhost"):
            return f"{host} is not a host this server allows for clients."
        for pattern in self.patterns:
            if pattern == "*" or (
                pattern.startswith("*.") and (host.endswith(pattern[1:]) or host == pattern[2:])
            ):
                return None
        return (
            f"{host} is not among the hosts this server allows for clients "
            "(ask your administrator)."
        )


def listeners(config: Mapping[str, Any]) -> dict[str, str]:
    """Listener name -> host:port of every mail listener the configuration enables."""
    return {name: config[key] for name, key in LISTEN_SETTINGS.items() if config.get(key)}
