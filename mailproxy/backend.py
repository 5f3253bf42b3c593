"""The contract between the mail proxy and the app that owns accounts, passwords and tokens.

The proxy calls these blocking methods through ``asyncio.to_thread``; the app implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def session_opened(self, account_id: int, protocol: str, client_ip: str) -> None: ...

    def session_closed(
        self, account_id: int, protocol: str, bytes_in: int, bytes_out: int
    ) -> None: ...
