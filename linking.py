"""Linking mailboxes: start and finish an authorization, verify it upstream, passwords, unlink.

Plain functions (no request needed) that the accounts screens call. An account becomes active only
after a real upstream login with its new token worked: IMAP ``AUTHENTICATE XOAUTH2`` (or
OAUTHBEARER) and a follow-up command, because Microsoft can accept a login and fail the next one.
"""

from __future__ import annotations

import imaplib
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import peewee as pw

import audit
import grants
import oauth
import oauth_clients
import providers
import tokens
from config import is_loopback_host
from db import database
from mailproxy.backend import Endpoint
from models import Account, MailPassword, OAuthClient, PendingAuthorization, User, utcnow
from oauth import AuthorizationProblem, Explanation
from passwords import generate_password, hash_password

VERIFY_TIMEOUT = 20.0
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class LinkError(Exception):
    """A request that cannot be done as asked; the message is shown next to the form."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------- lookups


def owned_account(user: User, account_id: int) -> Account | None:
    """The user's account ``account_id``; None for someone else's (the caller answers 404)."""
    return Account.owned_by(user).where(Account.id == account_id).first()


def normalize_address(address: str) -> str:
    address = (address or "").strip().lower()
    if len(address) > 254 or not _ADDRESS.match(address):
        raise LinkError("Enter a mailbox address such as name@example.com.")
    return address


def usable_client(user: User, client_id: int) -> OAuthClient | None:
    """A client the user may authorize with: their own or shared ones, or a provider default."""
    found = OAuthClient.usable_by(user).where(OAuthClient.id == client_id).first()
    if found is not None:
        return found
    client = OAuthClient.get_or_none(OAuthClient.id == client_id)
    if client is not None and _is_default(client):
        return client
    return None


def _is_default(client: OAuthClient) -> bool:
    default = oauth_clients.default_client(client.provider)
    return default is not None and default.id == client.id


def default_client(provider: str) -> OAuthClient | None:
    return oauth_clients.default_client(provider) if provider else None


def choose_client(user: User, provider: str, choice: str) -> OAuthClient:
    """``choice`` is "default" (the instance default for ``provider``) or a client id."""
    if choice == "default":
        client = default_client(provider)
        if client is None:
            name = providers.PRESETS[provider].name if provider in providers.PRESETS else provider
            raise LinkError(
                f"This server has no default client for {name or 'this provider'}; "
                "choose one of the clients below."
            )
        return client
    try:
        client_id = int(choice)
    except (TypeError, ValueError):
        raise LinkError("Choose a client.") from None
    client = usable_client(user, client_id)
    if client is None:
        raise LinkError("That client is not available to you.")
    return client


# ---------------------------------------------------------------------------------- linking


@dataclass
class Started:
    """What happens next: go to ``url`` (browser), watch ``pending`` (device), or ``done``."""

    account: Account
    url: str = ""
    pending: PendingAuthorization | None = None
    done: Verification | None = None


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str


def prepare_account(user: User, address: str, client: OAuthClient) -> Account:
    """The user's account for ``address``, created pending if new; someone else's is an error."""
    address = normalize_address(address)
    taken = (
        "This address is already linked by another user of this server. They (or an "
        "administrator) must unlink it before you can link it."
    )
    existing = Account.get_or_none(Account.address == address)
    if existing is not None:
        if existing.owner_id != user.id:
            raise LinkError(taken)
        return existing
    try:
        with database.atomic():
            return Account.create(
                owner=user, address=address, provider=client.provider, client=client
            )
    except pw.IntegrityError:
        raise LinkError(taken) from None


def start(
    user: User,
    address: str,
    client: OAuthClient,
    redirect: str,
    *,
    ip: str = "",
    username: str = "",
    password: str = "",
) -> Started:
    """Start linking ``address`` (new, or an own account again) with ``client``."""
    if client.grant == providers.PASSWORD and not password:
        raise LinkError("Enter the mailbox's password for the legacy password grant.")
    account = prepare_account(user, address, client)
    audit.record("account.authorize_started", actor=user, ip=ip, target=account.address)
    grant = client.grant or providers.AUTHORIZATION_CODE
    try:
        if grant == providers.AUTHORIZATION_CODE:
            return Started(account, url=oauth.begin(user, account, client, redirect))
        if grant == providers.DEVICE_CODE:
            begun = grants.device_code_start(client)
            return Started(account, pending=oauth.begin_device(user, account, client, begun))
        if grant == providers.CLIENT_CREDENTIALS:
            token = grants.client_credentials(client)
        elif grant == providers.PASSWORD:
            token = grants.password_grant(client, username or account.address, password)
        else:
            raise LinkError("This client's grant is not supported.")
    except tokens.GrantError as exc:
        _discard_if_unlinked(account)
        explanation = oauth.explain(exc.error, exc.description, redirect)
        if grant == providers.CLIENT_CREDENTIALS:
            explanation = _with_cc_help(explanation)
        elif grant == providers.PASSWORD and exc.error == "invalid_grant":
            explanation = _password_refused(exc.description)
        raise AuthorizationProblem(explanation) from None
    except tokens.TokenUnavailable as exc:
        _discard_if_unlinked(account)
        raise AuthorizationProblem(_unreachable(exc), 502) from None
    return Started(account, done=finish(account, client, token, actor=user, ip=ip))


def _unreachable(exc: tokens.TokenError) -> Explanation:
    return Explanation(
        "The provider could not be reached",
        exc.message,
        "Try again in a moment; if it persists, check the client's URLs.",
        code="unavailable",
    )


def _password_refused(description: str) -> Explanation:
    return Explanation(
        "The user name or password was refused",
        "The provider did not accept this user name and password for the legacy password "
        "grant. It also refuses every account that needs multi-factor authentication, which "
        "this grant cannot do.",
        "Check the password and try again, or link the mailbox with a client that uses "
        "Authorization Code or Device Code.",
        code="invalid_grant",
        detail=description,
    )


def _with_cc_help(explanation: Explanation) -> Explanation:
    return Explanation(
        explanation.title,
        explanation.cause,
        f"{explanation.fix} {oauth.CLIENT_CREDENTIALS_HELP}",
        explanation.code,
        explanation.detail,
    )


def _discard_if_unlinked(account: Account) -> None:
    """A failed first authorization leaves nothing behind (a placeholder that never worked)."""
    fresh = Account.get_or_none(Account.id == account.id)
    if (
        fresh is not None
        and fresh.status == "pending"
        and fresh.__data__.get("refresh_token") is None
        and fresh.__data__.get("access_token") is None
        and not fresh.passwords.exists()
    ):
        fresh.delete_instance(recursive=True)


def complete_callback(
    user: User, args: Mapping[str, str], redirect: str, *, ip: str = ""
) -> tuple[Account, Verification]:
    """The ``/authorize`` callback: check state, exchange the code, store, verify."""
    pending = oauth.take_pending(user, args.get("state"))
    account, client = pending.account, pending.client
    if args.get("error"):
        _discard_if_unlinked(account)
        audit.record(
            "account.authorize_failed", actor=user, ip=ip, target=account.address,
            detail=str(args.get("error"))[:100],
        )  # fmt: skip
        raise AuthorizationProblem(
            oauth.explain(args.get("error", ""), args.get("error_description", ""), redirect)
        )
    code = args.get("code")
    if not code:
        raise AuthorizationProblem(oauth.NO_PENDING)
    try:
        token = grants.exchange_code(client, code, redirect, str(pending.code_verifier))
    except tokens.GrantError as exc:
        _discard_if_unlinked(account)
        raise AuthorizationProblem(oauth.explain(exc.error, exc.description, redirect)) from None
    except tokens.TokenUnavailable as exc:
        raise AuthorizationProblem(_unreachable(exc), 502) from None
    return account, finish(account, client, token, actor=user, ip=ip)


def poll_device(user: User, account: Account, state: str, *, ip: str = "") -> Verification | None:
    """One look at a Device Code flow: None while waiting, the result once finished."""
    pending = oauth.device_pending(user, account, state)
    if pending is None:
        raise AuthorizationProblem(oauth.NO_PENDING, 404)
    if pending.consumed_at is not None:
        fresh = Account.get_by_id(account.id)
        return Verification(fresh.status == "active", fresh.status_detail)
    if pending.expires_at < utcnow():
        raise AuthorizationProblem(oauth.EXPIRED)
    try:
        token = grants.device_code_poll(pending.client, str(pending.device_code))
    except tokens.GrantError as exc:
        PendingAuthorization.update(consumed_at=utcnow()).where(
            PendingAuthorization.id == pending.id
        ).execute()
        _discard_if_unlinked(account)
        raise AuthorizationProblem(oauth.explain(exc.error, exc.description)) from None
    except tokens.TokenUnavailable:
        return None  # the page polls again
    if token is None:
        return None
    won = (
        PendingAuthorization.update(consumed_at=utcnow())
        .where((PendingAuthorization.id == pending.id) & PendingAuthorization.consumed_at.is_null())
        .execute()
    )
    if not won:
        return None
    return finish(account, pending.client, token, actor=user, ip=ip)


def finish(
    account: Account, client: OAuthClient, token: Mapping[str, Any], *, actor: User, ip: str = ""
) -> Verification:
    """Store a new grant's tokens, then verify the link upstream; only then is it active."""
    if client.grant != providers.CLIENT_CREDENTIALS and not token.get("refresh_token"):
        _discard_if_unlinked(account)
        raise AuthorizationProblem(oauth.explain("no_refresh_token"))
    identity = grants.identity_from(token)
    with database.atomic():
        Account.update(
            client=client,
            provider=client.provider,
            signed_in_as=identity if identity and identity != account.address else "",
        ).where(Account.id == account.id).execute()
        tokens.store_tokens(account, token)
    account = Account.get_by_id(account.id)
    result = verify(account, str(token["access_token"]))
    if not result.ok and client.grant == providers.CLIENT_CREDENTIALS:
        result = Verification(False, f"{result.message} {oauth.CLIENT_CREDENTIALS_HELP}")
    tokens.set_status(
        account.id, "active" if result.ok else "error", "" if result.ok else result.message
    )
    audit.record(
        "account.linked" if result.ok else "account.verify_failed",
        actor=actor, ip=ip, target=account.address, detail=client.name,
    )  # fmt: skip
    return result


def verify(account: Account, access_token: str | None = None) -> Verification:
    """Log in upstream over IMAP with the account's token and run a follow-up command."""
    client = account.client
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


# ---------------------------------------------------------------------------------- upkeep


def reauthorize(user: User, account: Account, redirect: str, *, ip: str = "") -> Started:
    """Authorize an existing account again with its client (mail-client passwords stay)."""
    client = account.client
    if client is None or usable_client(user, client.id) is None:
        client = default_client(account.provider)
    if client is None:
        raise LinkError("The client this mailbox used is gone; choose another client below.")
    return start(user, account.address, client, redirect, ip=ip)


def unlink(user: User, account: Account, *, ip: str = "") -> bool:
    """Revoke at the provider where it can, then delete the tokens and passwords (the account).

    Returns whether the provider confirmed the revocation.
    """
    revoked = False
    client = account.client
    url = providers.revocation_url_for(client) if client is not None else ""
    if client is not None and url:
        refresh = account.refresh_token
        access = account.access_token
        if refresh:
            revoked = grants.revoke(client, url, str(refresh), "refresh_token")
        if access:
            revoked = grants.revoke(client, url, str(access), "access_token") or revoked
    address = account.address
    with database.atomic():
        account.delete_instance(recursive=True)
    audit.record(
        "account.unlinked", actor=user, ip=ip, target=address,
        detail="revoked at the provider" if revoked else "",
    )  # fmt: skip
    return revoked


# ---------------------------------------------------------------------------------- passwords


def add_password(
    user: User, account: Account, label: str, password: str | None = None, *, ip: str = ""
) -> str:
    """Add a mail-client password (hashed); returns it (generated when none is given)."""
    label = (label or "").strip()[:100] or "Mail client"
    plain = password or generate_password()
    MailPassword.create(account=account, label=label, password_hash=hash_password(plain))
    audit.record("account.password_added", actor=user, ip=ip, target=account.address, detail=label)
    return plain


def revoke_password(user: User, account: Account, password_id: int, *, ip: str = "") -> bool:
    """Delete one of the account's passwords; False when it is not one of them."""
    row = MailPassword.get_or_none(
        (MailPassword.id == password_id) & (MailPassword.account == account)
    )
    if row is None:
        return False
    row.delete_instance()
    audit.record(
        "account.password_revoked", actor=user, ip=ip, target=account.address, detail=row.label
    )
    return True
