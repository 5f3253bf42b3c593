"""The mail proxy's listeners as the app configures them: addresses, TLS certificate and key."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from config import listeners, mail_host
from mailproxy import ensure_self_signed
from store import appstate

# Listener name -> the (host, port) the app's running proxy bound (one set to port 0 gets a free
# port); kept on the app, so the configuration stays as it was given.
_BOUND: appstate.Slot[dict[str, tuple[str, int]]] = appstate.Slot("mail_bound", fallback=False)


def record_bound(app: Flask, bound: dict[str, tuple[str, int]]) -> None:
    """The proxy of ``app`` listens at ``bound`` (called once it started)."""
    _BOUND.set(app, dict(bound))


def addresses(app: Flask) -> dict[str, str]:
    """Listener name -> host:port of every enabled mail listener, as mail clients reach it: one
    configured on port 0 is named by the port it got once the app's proxy listens."""
    bound = _BOUND.of(app) or {}
    found = {}
    for name, value in listeners(app.config).items():
        if name in bound and value.rstrip().endswith(":0"):
            host, port = bound[name]
            value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        found[name] = value
    return found


def tls_files(app: Flask) -> tuple[str, str, bool]:
    """Certificate and key of the mail listeners, and whether they are self-signed (generated)."""
    cert, key = app.config["TLS_CERT"], app.config["TLS_KEY"]
    if cert and key:
        return cert, key, False
    tls_dir = Path(app.instance_path) / "tls"
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    cert, key = str(tls_dir / "cert.pem"), str(tls_dir / "key.pem")
    ensure_self_signed(cert, key, [mail_host(app.config), "localhost", "127.0.0.1"])
    return cert, key, True
