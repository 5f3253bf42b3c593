"""Verifying a link upstream: log in over IMAP with the account's token and open the inbox.

IMAP ``AUTHENTICATE XOAUTH2`` (or OAUTHBEARER) and a follow-up command, because Microsoft can
accept a login and fail the next one. ``linking`` calls ``verify`` before it marks an account
active (and before it replaces the tokens of an account that already works).
"""

from __future__ import annotations

import imaplib
import ssl
from dataclasses import dataclass

import audit
import grants
import providers
import tokens
from config import is_loopback_host
from mailproxy.backend import Endpoint
from models import Account, OAuthClient, User

VERIFY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str


def verify(
    account: Account, access_token: str | None = None, *, client: OAuthClient | None = None
) -> Verification:
    """Log in upstream over IMAP with the account's token and run a follow-up command.

    ``access_token`` and ``client``: check a new authorization before it is stored (default:
    the account's stored token and client).
    """
    client = client or account.client
    if client is None:
        return Verification(False, "The client this mailbox was linked with no longer exists.")
    endpoint = providers.endpoints_for(client).get("imap")
    if endpoint is None:
        return Verification(False, "The client names no IMAP server to check the link with.")
    if access_token is None:
        try:
            access_token = tokens.get_access_token(account.id)
        except tokens.TokenError as exc:
            return Verification(False, exc.message)
    mechanism = providers.sasl_mechanism_for(client)
    try:
        check_imap(endpoint, account.address, access_token, mechanism)
    except VerificationFailed as exc:
        return Verification(False, str(exc))
    return Verification(True, f"Signed in to {endpoint.host} as {account.address}.")


def recheck(user: User, account: Account, *, ip: str = "") -> Verification:
    """Test an existing link again (the "Test connection" button)."""
    result = verify(account)
    if account.status in ("active", "error"):
        tokens.set_status(
            account.id, "active" if result.ok else "error", "" if result.ok else result.message
        )
    audit.record("account.tested", actor=user, ip=ip, target=account.address,
                 detail="ok" if result.ok else "failed")  # fmt: skip
    return result


class VerificationFailed(Exception):
    """The upstream login or the follow-up command failed (message for a person)."""


def sasl_payload(mechanism: str, address: str, access_token: str) -> bytes:
    """The initial SASL response: the mailbox address goes into ``user=`` / ``a=``."""
    if mechanism.upper() == "OAUTHBEARER":
        return f"n,a={address},\x01auth=Bearer {access_token}\x01\x01".encode()
    return f"user={address}\x01auth=Bearer {access_token}\x01\x01".encode()


def check_imap(
    endpoint: Endpoint,
    address: str,
    access_token: str,
    mechanism: str = "XOAUTH2",
    timeout: float = VERIFY_TIMEOUT,
) -> None:
    """Authenticate at ``endpoint`` and SELECT INBOX; raises ``VerificationFailed``."""
    if endpoint.security == "plain" and not is_loopback_host(endpoint.host):
        raise VerificationFailed(f"{endpoint.host} is not loopback: refusing a plain connection.")
    refusal = grants.host_policy().refusal(endpoint.host)
    if refusal:
        raise VerificationFailed(refusal)
    context = grants.ssl_context()
    calls = 0

    def respond(_challenge: bytes) -> bytes:
        nonlocal calls
        calls += 1
        # After a failure the server sends an error challenge; an empty answer ends it.
        return sasl_payload(mechanism, address, access_token) if calls == 1 else b""

    where = f"{endpoint.host}:{endpoint.port}"
    try:
        if endpoint.security == "tls":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                endpoint.host, endpoint.port, ssl_context=context, timeout=timeout
            )
        else:
            conn = imaplib.IMAP4(endpoint.host, endpoint.port, timeout=timeout)
            if endpoint.security == "starttls":
                conn.starttls(ssl_context=context)
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise VerificationFailed(f"TLS with {where} failed: {exc}") from None
    except (OSError, imaplib.IMAP4.error) as exc:
        raise VerificationFailed(f"Could not connect to {where}: {exc}") from None
    try:
        try:
            conn.authenticate(mechanism, respond)
        except imaplib.IMAP4.error as exc:
            raise VerificationFailed(f"{where} refused the login for {address}: {exc}") from None
        try:
            status, data = conn.select("INBOX", readonly=True)
        except imaplib.IMAP4.error as exc:
            status, data = "NO", [str(exc).encode()]
        if status != "OK":
            said = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
            raise VerificationFailed(
                f"{where} accepted the login but refused to open the inbox: {said}"
            )
    except OSError as exc:
        raise VerificationFailed(f"The connection to {where} failed: {exc}") from None
    finally:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass
