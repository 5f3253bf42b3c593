"""Verifying a link upstream: log in over IMAP with the account's token and open the inbox.

IMAP ``AUTHENTICATE XOAUTH2`` (or OAUTHBEARER) and a follow-up command, because Microsoft can
accept a login and fail the next one. ``linking`` calls ``verify`` before it marks an account
active (and before it replaces the tokens of an account that already works).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import ssl
from dataclasses import dataclass, field
from typing import Any

from config import is_loopback_host
from errors import PersonError
from mailboxes import refusals as mailrefusals
from mailproxy.backend import Endpoint, Grant, Mechanism
from mailproxy.common import sasl_initial_response
from models import Account, AccountStatus, OAuthClient, User
from oauth import errors as oauth_errors
from oauth import grants, providers, tokens
from people import audit

VERIFY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str
    # protocol -> None when it worked, else why not (only the protocols that were checked)
    protocols: dict[str, str | None] = field(default_factory=dict)


# Which protocols a scope grants, by the permission names in it (Microsoft's delegated scopes);
# a scope that names none of them (Google's mail.google.com, .default, a custom server's) is
# taken to cover every protocol the client has a server for.
_SCOPE_PROTOCOLS = {"imap.accessasuser.all": "imap", "pop.accessasuser.all": "pop3",
                    "smtp.send": "smtp"}  # fmt: skip


def protocols_covered(scope: str, served: list[str]) -> list[str]:
    """The protocols of ``served`` that ``scope`` lets a token use."""
    named = {
        proto
        for word in (scope or "").lower().split()
        for suffix, proto in _SCOPE_PROTOCOLS.items()
        if word.endswith("/" + suffix) or word == suffix
    }
    return [p for p in served if p in named] if named else list(served)


def verify(
    account: Account,
    access_token: str | None = None,
    *,
    client: OAuthClient | None = None,
    delegate: str | None = None,
) -> Verification:
    """Log in upstream over each protocol the scope covers, with a follow-up command each
    (IMAP SELECT, POP3 STAT, SMTP without sending). The link works when one of them does.

    ``access_token`` and ``client``: check a new authorization before it is stored (default:
    the account's stored token and client). ``delegate``: who signed in for a shared mailbox
    (default: the account's ``signed_in_as``); SMTP logs in as them, as the proxy does.
    """
    delegate = account.signed_in_as if delegate is None else delegate
    client = client or account.client
    if client is None:
        return Verification(False, "The client this mailbox was linked with no longer exists.")
    endpoints = providers.endpoints_for(client)
    scope = (account.granted_scope if access_token is None else "") or client.scope
    covered = protocols_covered(scope, [p for p in ("imap", "pop3", "smtp") if p in endpoints])
    if not covered:
        return Verification(False, "The client names no mail server to check the link with.")
    if access_token is None:
        try:
            access_token = tokens.get_access_token(account.id)
        except oauth_errors.TokenError as exc:
            return Verification(False, exc.message)
    mechanism = providers.sasl_mechanism_for(client)
    results: dict[str, str | None] = {}
    for protocol in covered:
        try:
            login = delegate if protocol == "smtp" and delegate else account.address
            CHECKS[protocol](endpoints[protocol], login, access_token, mechanism)
            results[protocol] = None
        except VerificationFailed as exc:
            results[protocol] = exc.message
    worked = [p for p, why in results.items() if why is None]
    failed = [f"{NAMES[p]}: {why}" for p, why in results.items() if why is not None]
    if not worked:
        return Verification(False, " ".join(failed), results)
    first = endpoints[worked[0]]
    said = f"Signed in to {first.host} as {account.address}"
    if len(worked) > 1:
        said += f" ({', '.join(NAMES[p] for p in worked)})"
    message = f"{said}." + (f" Not working: {' '.join(failed)}" if failed else "")
    return Verification(True, message, results)


NAMES = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}


def record_protocols(account: Account, result: Verification, app_only: bool) -> None:
    """Show each checked protocol's outcome on the account page (mailrefusals)."""
    for protocol, why in result.protocols.items():
        if why is None:
            mailrefusals.clear(account.id, protocol)
        else:
            refusal = mailrefusals.explain(protocol, why, account.address, app_only)
            mailrefusals.record(account.id, refusal)


def recheck(user: User, account: Account, *, ip: str = "") -> Verification:
    """Test an existing link again (the "Test connection" button)."""
    result = verify(account)
    app_only = account.client is not None and account.client.grant == providers.CLIENT_CREDENTIALS
    record_protocols(account, result, app_only)
    if account.state.testable:
        tokens.set_status(
            account.id,
            AccountStatus.ACTIVE if result.ok else AccountStatus.ERROR,
            "" if result.ok else result.message,
        )
    audit.record("account.tested", actor=user, ip=ip, target=account.address,
                 detail="ok" if result.ok else "failed")  # fmt: skip
    return result


class VerificationFailed(PersonError):
    """The upstream login or the follow-up command failed (message for a person)."""


def sasl_payload(endpoint: Endpoint, mechanism: str, address: str, access_token: str) -> bytes:
    """The initial SASL response (raw; imaplib encodes it), from the mail proxy's one builder:
    the mailbox address goes into ``user=`` / ``a=``."""
    kind: Mechanism = "OAUTHBEARER" if mechanism.upper() == "OAUTHBEARER" else "XOAUTH2"
    grant = Grant(account_id=0, address=address, upstream=endpoint, mechanism=kind)
    return base64.b64decode(sasl_initial_response(grant, access_token))


def check_imap(
    endpoint: Endpoint,
    address: str,
    access_token: str,
    mechanism: str = "XOAUTH2",
    timeout: float = VERIFY_TIMEOUT,
) -> None:
    """Authenticate at ``endpoint`` and SELECT INBOX; raises ``VerificationFailed``."""
    _refuse_plain_off_loopback(endpoint)
    refusal = grants.host_policy().refusal(endpoint.host)
    if refusal:
        raise VerificationFailed(refusal)
    context = grants.ssl_context()
    calls = 0

    def respond(_challenge: bytes) -> bytes:
        nonlocal calls
        calls += 1
        # After a failure the server sends an error challenge; an empty answer ends it.
        return sasl_payload(endpoint, mechanism, address, access_token) if calls == 1 else b""

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


def _refuse_plain_off_loopback(endpoint: Endpoint) -> None:
    """Credentials never cross the network in the clear: plain text to loopback only."""
    if endpoint.security == "plain" and not is_loopback_host(endpoint.host):
        raise VerificationFailed(f"{endpoint.host} is not loopback: refusing a plain connection.")


def _connect_error(where: str, exc: BaseException) -> VerificationFailed:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return VerificationFailed(f"TLS with {where} failed: {exc}")
    return VerificationFailed(f"Could not connect to {where}: {exc}")


def check_pop3(
    endpoint: Endpoint,
    address: str,
    access_token: str,
    mechanism: str = "XOAUTH2",
    timeout: float = VERIFY_TIMEOUT,
) -> None:
    """AUTH in two steps (as Exchange wants), then STAT; raises ``VerificationFailed``."""
    _refuse_plain_off_loopback(endpoint)
    where = f"{endpoint.host}:{endpoint.port}"
    context = grants.ssl_context()
    try:
        if endpoint.security == "tls":
            conn: poplib.POP3 = poplib.POP3_SSL(
                endpoint.host, endpoint.port, context=context, timeout=timeout
            )
        else:
            conn = poplib.POP3(endpoint.host, endpoint.port, timeout=timeout)
            if endpoint.security == "starttls":
                conn.stls(context=context)
    except (OSError, poplib.error_proto, ssl.SSLError) as exc:
        raise _connect_error(where, exc) from None
    payload = base64.b64encode(sasl_payload(endpoint, mechanism, address, access_token)).decode()
    try:
        try:
            raw: Any = conn  # poplib has no AUTH: its command primitives are private
            answer = raw._shortcmd(f"AUTH {mechanism.upper()}")
            if not answer.startswith(b"+"):
                raise poplib.error_proto(answer)
            answer = raw._shortcmd(payload)
            if not answer.startswith(b"+OK"):  # a failure challenge: an empty line ends it
                raw._putcmd("")
                raw._getresp()
            conn.stat()
        except poplib.error_proto as exc:
            raise VerificationFailed(f"{where} refused the login for {address}: {exc}") from None
    except OSError as exc:
        raise VerificationFailed(f"The connection to {where} failed: {exc}") from None
    finally:
        try:
            conn.quit()
        except (OSError, poplib.error_proto):
            pass


def open_smtp(host: str, port: int, security: str, timeout: float) -> smtplib.SMTP:
    """An SMTP connection as ``security`` says (implicit "tls", "starttls" or "plain"), TLS
    checked against the upstream CAs; smtplib's and ssl's errors as they come."""
    context = grants.ssl_context()
    if security == "tls":
        return smtplib.SMTP_SSL(host, port, context=context, timeout=timeout)
    conn = smtplib.SMTP(host, port, timeout=timeout)
    if security == "starttls":
        conn.starttls(context=context)
    return conn


def check_smtp(
    endpoint: Endpoint,
    address: str,
    access_token: str,
    mechanism: str = "XOAUTH2",
    timeout: float = VERIFY_TIMEOUT,
) -> None:
    """EHLO and AUTH without sending anything; raises ``VerificationFailed``."""
    _refuse_plain_off_loopback(endpoint)
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        conn = open_smtp(endpoint.host, endpoint.port, endpoint.security, timeout)
        conn.ehlo()
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        raise _connect_error(where, exc) from None
    payload = sasl_payload(endpoint, mechanism, address, access_token).decode()
    try:
        try:
            conn.auth(
                mechanism.upper(), lambda challenge=None: payload if challenge is None else ""
            )
        except smtplib.SMTPResponseException as exc:
            said = (
                exc.smtp_error.decode(errors="replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            raise VerificationFailed(
                f"{where} refused the login for {address}: {exc.smtp_code} {said}"
            ) from None
        except smtplib.SMTPException as exc:
            raise VerificationFailed(f"{where} refused the login for {address}: {exc}") from None
    except OSError as exc:
        raise VerificationFailed(f"The connection to {where} failed: {exc}") from None
    finally:
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            pass


CHECKS = {"imap": check_imap, "pop3": check_pop3, "smtp": check_smtp}
