"""The contract between the mail proxy and the app that owns accounts, passwords and tokens.

The proxy calls the blocking methods through ``asyncio.to_thread``; the app implements them.
``session_opened`` and ``session_closed`` are called on the event loop and must not block
(queue their writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Security = Literal["tls", "starttls", "plain"]
Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]

#: The refusal kinds a Backend may raise.
KINDS = frozenset({"credentials", "throttled", "reauth", "disabled", "unavailable", "refused"})


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    security: Security


@dataclass(frozen=True)
class Grant:
    """What a successful password check gives the proxy."""

    account_id: int
    address: str  # mailbox address: goes into XOAUTH2 user= / OAUTHBEARER a=
    upstream: Endpoint  # server for the protocol that was asked for
    mechanism: Mechanism
    #: SMTP: the proxy takes the message itself and hands it to ``Backend.deliver`` (e.g.
    #: Microsoft Graph) instead of relaying to ``upstream``; messages of at most this many bytes.
    deliver: bool = False
    max_message: int = 0
    #: An access token the backend already knows to be fresh (read with the password check);
    #: empty: the proxy asks ``access_token``. Never in the repr.
    token: str = field(default="", repr=False)


class DeliveryRefused(Exception):
    """``Backend.deliver`` did not send the message: the SMTP reply (code, enhanced status,
    a reason a person can act on). 4xx: the device may try again; 5xx: it must not."""

    def __init__(self, code: int, status: str, text: str):
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text


class ProxyAuthError(Exception):
    """A refusal a person can act on.

    kind is one of: 'credentials' (wrong address or password), 'throttled' (too many failures;
    retry_after seconds), 'reauth' (account needs re-authorization; message names the page to
    visit), 'disabled' (account or user disabled), 'unavailable' (temporary: token endpoint or
    upstream down), 'refused' (the mail server refuses this protocol for a reason a new token
    cannot fix; message says what to change).
    """

    def __init__(self, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.kind = kind if kind in KINDS else "unavailable"
        self.message = message
        self.retry_after = retry_after


class Backend(Protocol):
    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        """Blocking (hashing, DB). protocol is 'imap' | 'pop3' | 'smtp'. Raises ProxyAuthError."""
        ...

    def access_token(self, account_id: int, force_refresh: bool = False) -> str:
        """Blocking (DB, HTTP). Raises ProxyAuthError('reauth' | 'unavailable')."""
        ...

    def upstream_refused(self, account_id: int, protocol: str, detail: str) -> None:
        """Upstream refused the token (``detail``: its words). Returns when one refresh and
        retry is worth it; raises ProxyAuthError when a new token cannot help."""
        ...

    def token_rejected(self, account_id: int, protocol: str, detail: str) -> str | None:
        """Upstream refused a freshly refreshed token too: record it for that protocol.
        Returns the reason for the mail client (None: the generic re-authorize message)."""
        ...

    def smtp_auth_refused(self, account_id: int, detail: str) -> Grant | None:
        """The SMTP server refused AUTH by policy (Exchange's 535 5.7.139). A Grant with
        ``deliver`` when the account should send through ``deliver`` from now on, else None."""
        ...

    def deliver(self, account_id: int, sender: str, recipients: list[str], message: bytes) -> str:
        """Blocking (HTTP). Send a message the proxy accepted (CRLF line ends, dots unstuffed);
        returns the confirmation text. Raises DeliveryRefused."""
        ...

    def session_opened(self, account_id: int, protocol: str, client_ip: str) -> None:
        """On the event loop, when the relay starts: must not block."""
        ...

    def session_closed(self, account_id: int, protocol: str, bytes_in: int, bytes_out: int) -> None:
        """On the event loop, when the relay ends: must not block."""
        ...
