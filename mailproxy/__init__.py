"""The mail proxy: IMAP, POP3 and SMTP with a per-device password in front, XOAUTH2 behind."""

from .backend import Backend, DeliveryRefused, Endpoint, Grant, ProxyAuthError, Security
from .controller import Controller
from .settings import DEFAULT_LISTENERS, EVENT_LOOPS, ProxySettings
from .tls import ensure_self_signed, fingerprint_sha256

__all__ = [
    "DEFAULT_LISTENERS",
    "EVENT_LOOPS",
    "Backend",
    "Controller",
    "DeliveryRefused",
    "Endpoint",
    "Grant",
    "ProxyAuthError",
    "ProxySettings",
    "Security",
    "ensure_self_signed",
    "fingerprint_sha256",
]
