"""Configuration layers: defaults, then instance/config.py, then AUTH_EMAIL_* variables, then tests.

Only plain values live here; secrets are generated into the instance folder (see vault.py and
app.py), never given a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "AUTH_EMAIL_"

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
    # Mail proxy listeners, host:port each; empty disables one.
    "IMAP_LISTEN": "127.0.0.1:1143",
    "IMAPS_LISTEN": "127.0.0.1:1993",
    "POP3_LISTEN": "127.0.0.1:1110",
    "POP3S_LISTEN": "127.0.0.1:1995",
    "SUBMISSION_LISTEN": "127.0.0.1:1587",
    "SMTPS_LISTEN": "127.0.0.1:1465",
    # Mail proxy limits: connections in all and per client IP, idle seconds before and after login.
    "MAIL_MAX_CONNECTIONS": 4096,
    "MAIL_MAX_CONNECTIONS_PER_IP": 256,
    "MAIL_IDLE_TIMEOUT_PRELOGIN": 60,
    "MAIL_IDLE_TIMEOUT": 1800,
    # Before login: seconds for the TLS handshake, seconds and commands until login.
    "MAIL_HANDSHAKE_TIMEOUT": 10,
    "MAIL_PRELOGIN_SECONDS": 300,
    "MAIL_PRELOGIN_COMMANDS": 50,
    "MAIL_UPSTREAM_POOL": 2,
    # Certificate for the mail listeners; empty: a self-signed pair in the instance folder.
    "TLS_CERT": "",
    "TLS_KEY": "",
    # Extra CA certificates trusted for upstream mail servers and token endpoints.
    "UPSTREAM_CA_FILE": "",
    # Token endpoint requests: timeout in seconds, attempts on timeouts and 5xx, first backoff.
    "TOKEN_HTTP_TIMEOUT": 15,
    "TOKEN_ATTEMPTS": 3,
    "TOKEN_BACKOFF": 0.5,
    # How often the serving process refreshes idle accounts (refresh tokens age out unused).
    "UPKEEP_INTERVAL_SECONDS": 3600,
    # New users may add custom OAuth clients (the admin always may).
    "NEW_USERS_CUSTOM_CLIENTS": False,
    # Legacy Resource Owner Password grant (Microsoft); off unless the admin turns it on.
    "ALLOW_ROPC": False,
    # Failed logins (web and mail) before a pause, and the first pause in seconds (it doubles).
    "LOGIN_FAILURE_LIMIT": 5,
    "LOGIN_FAILURE_LIMIT_PER_IP": 20,
    "LOGIN_BLOCK_SECONDS": 60,
    # Lifetime of admin invite links.
    "INVITE_HOURS": 72,
    # Access to /metrics: "loopback" (default), "open", or a bearer token string.
    "METRICS_ACCESS": "loopback",
    # Log level of the serving process.
    "LOG_LEVEL": "INFO",
    # argon2id cost; the defaults follow RFC 9106's low-memory profile.
    "ARGON2_TIME_COST": 3,
    "ARGON2_MEMORY_KIB": 65536,
    "ARGON2_PARALLELISM": 4,
}


def _coerce(name: str, raw: str, default: Any) -> Any:
    """Environment values are strings; give them the type of their default."""
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{ENV_PREFIX}{name} must be true or false, not {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{name} must be a whole number, not {raw!r}") from None
    return raw


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The AUTH_EMAIL_* settings present in ``environ``, typed like their defaults."""
    found: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        key = ENV_PREFIX + name
        if key in environ:
            found[name] = _coerce(name, environ[key], default)
    return found


def instance_path_from_environ(environ: Mapping[str, str] = os.environ) -> str | None:
    """AUTH_EMAIL_INSTANCE picks another instance folder (several instances on one machine)."""
    value = environ.get(ENV_PREFIX + "INSTANCE")
    return os.path.abspath(value) if value else None


def mail_host(config: Mapping[str, Any]) -> str:
    """The host name mail clients should use."""
    return config.get("MAIL_HOST") or urlsplit(config["PUBLIC_URL"]).hostname or "localhost"


def is_loopback_host(host: str | None) -> bool:
    """Loopback hosts may use plain http / plain mail connections; nothing else may."""
    if not host:
        return False
    host = host.strip("[]").lower()
    return host in {"localhost", "::1"} or host.startswith("127.") or host.endswith(".localhost")
