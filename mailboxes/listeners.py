"""The mail proxy's listeners as the app configures them: their TLS certificate and key."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from config import mail_host
from mailproxy import ensure_self_signed


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
