"""Linking mailboxes: start and finish an authorization, passwords, unlink.

Plain functions (no request needed) that the accounts screens call. An account becomes active only
after a real upstream login with its new token worked (``verification``). Re-authorizing an
account that has tokens replaces them only once the new ones passed that check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import peewee as pw

from errors import PersonError
from mailboxes.verification import Verification, record_protocols, verify
from models import (
    MAIL_LOOKUP_SECRET,
    Account,
    AccountStatus,
    InstanceSecret,
    MailPassword,
    OAuthClient,
    PendingAuthorization,
    User,
    utcnow,
)
from oauth import authorize as oauth
from oauth import clients as oauth_clients
from oauth import errors as oauth_errors
from oauth import grants, providers, tokens
from oauth.errors import AuthorizationProblem
from people import addresses, audit
from people.passwords import generate_password, hash_password, lookup_tag
from store.db import database, parse_id

# A placeholder account that never got tokens is deleted by upkeep after this long.
ABANDONED_AFTER = dt.timedelta(hours=1)


class LinkError(PersonError):
    """A request that cannot be done as asked; the message is shown next to the form."""


# ---------------------------------------------------------------------------------- lookups


def owned_account(user: User, account_id: int) -> Account | None:
    """The user's account ``account_id``; None for someone else's (the caller answers 404)."""
    return Account.owned_with_client(user, account_id)


def device_account(user: User, account_id: int, state: str) -> Account | None:
    """The account (the user's own, a placeholder at first) of their Device Code flow ``state``."""
    pending = PendingAuthorization.get_or_none(
        (PendingAuthorization.state == state)
        & (PendingAuthorization.owner == user)
        & (PendingAuthorization.account == account_id)
        & PendingAuthorization.device_code.is_null(False)
    )
    return None if pending is None else owned_account(user, account_id)


def normalize_address(address: str) -> str:
    try:
        return addresses.normalize(address)
    except addresses.AddressError as exc:
        raise LinkError(exc.message) from None


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
    client_id = parse_id(choice)
    if client_id is None:
        raise LinkError("Choose a client.")
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


TAKEN = oauth_errors.Explanation(
    "This mailbox is already linked",
    "The provider let you in, but this mailbox is already linked in this instance of Auth-Email, "
    "and a mailbox can be linked only once.",
    "Ask your administrator: the mailbox must be unlinked where it is linked before you can "
    "link it. Nothing was saved.",
    code="already_linked",
)


def prepare_account(user: User, address: str, client: OAuthClient) -> Account:
    """The user's own account for ``address``: the linked one, or a pending placeholder.

    The placeholder is made whether or not another user has linked the address (an address is
    unique per user while pending, in the instance only once linked), so the flow looks the same
    for any address; whether it is taken is told only once the provider has granted access to
    it (``finish``), and then nothing of the other user's account is touched or shown.
    """
    address = normalize_address(address)
    mine = (Account.owner == user) & (Account.address == address)
    existing = Account.get_or_none(mine)
    if existing is not None:
        return existing
    try:
        with database.atomic():
            return Account.create(
                owner=user, address=address, provider=client.provider, client=client
            )
    except pw.IntegrityError:
        found = Account.get_or_none(mine)  # made by the user's other tab meanwhile
        if found is None:
            raise LinkError("Try again: the address changed while it was being linked.") from None
        return found


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
    except oauth_errors.GrantError as exc:
        _discard_if_unlinked(account, user)
        explanation = oauth_errors.explain(exc.error, exc.description, redirect)
        if grant == providers.CLIENT_CREDENTIALS:
            explanation = oauth_errors.with_cc_help(explanation)
        elif grant == providers.PASSWORD and exc.error == "invalid_grant":
            explanation = oauth_errors.password_refused(exc.description)
        raise AuthorizationProblem(explanation) from None
    except oauth_errors.TokenUnavailable as exc:
        _discard_if_unlinked(account, user)
        raise AuthorizationProblem(oauth_errors.unreachable(exc.message), 502) from None
    return Started(account, done=finish(account, client, token, actor=user, ip=ip))


def _placeholder(account: Account) -> bool:
    """Created for an authorization that never finished: pending, no tokens, no passwords."""
    return bool(
        account.state is AccountStatus.PENDING
        and not account.has_tokens()
        and not account.passwords.exists()
    )


def _abandoned(account: Account, now: dt.datetime | None = None) -> bool:
    """A placeholder none of whose pending authorizations can still finish (all expired)."""
    waiting = PendingAuthorization.select().where(
        (PendingAuthorization.account == account)
        & (PendingAuthorization.expires_at > (now or utcnow()))
    )
    return _placeholder(account) and not waiting.exists()


def forget_abandoned(now: dt.datetime | None = None, age: dt.timedelta = ABANDONED_AFTER) -> int:
    """Delete abandoned placeholders older than ``age`` (upkeep); returns how many."""
    now = now or utcnow()
    old = Account.select().where(
        (Account.status == AccountStatus.PENDING.value)
        & Account.refresh_token.is_null()
        & Account.access_token.is_null()
        & (Account.created_at < now - age)
    )
    gone = 0
    for account in old:
        if _abandoned(account, now):
            with database.atomic():
                account.delete_instance(recursive=True)
            gone += 1
    return gone


def _discard_if_unlinked(account: Account, user: User) -> None:
    """A failed first authorization leaves nothing behind (a placeholder that never worked),
    and never touches another user's account."""
    fresh = Account.get_or_none(Account.id == account.id)
    if fresh is not None and fresh.owner_id == user.id and _placeholder(fresh):
        fresh.delete_instance(recursive=True)


def complete_callback(
    user: User, args: Mapping[str, str], redirect: str, *, ip: str = ""
) -> tuple[Account, Verification]:
    """The ``/authorize`` callback: check state, exchange the code, store, verify."""
    pending = oauth.take_pending(user, args.get("state"))
    account, client = pending.account, pending.client
    if args.get("error"):
        _discard_if_unlinked(account, user)
        audit.record(
            "account.authorize_failed", actor=user, ip=ip, target=account.address,
            detail=str(args.get("error"))[:100],
        )  # fmt: skip
        raise AuthorizationProblem(
            oauth_errors.explain(args.get("error", ""), args.get("error_description", ""), redirect)
        )
    code = args.get("code")
    if not code:
        raise AuthorizationProblem(oauth.NO_PENDING)
    try:
        token = grants.exchange_code(client, code, redirect, str(pending.code_verifier))
    except oauth_errors.GrantError as exc:
        _discard_if_unlinked(account, user)
        raise AuthorizationProblem(
            oauth_errors.explain(exc.error, exc.description, redirect)
        ) from None
    except oauth_errors.TokenUnavailable as exc:
        raise AuthorizationProblem(oauth_errors.unreachable(exc.message), 502) from None
    return account, finish(account, client, token, actor=user, ip=ip)


def poll_device(user: User, account: Account, state: str, *, ip: str = "") -> Verification | None:
    """One look at a Device Code flow: None while waiting, the result once finished."""
    pending = oauth.device_pending(user, account, state)
    if pending is None:
        raise AuthorizationProblem(oauth.NO_PENDING, 404)
    if pending.consumed_at is not None:
        fresh = Account.get_by_id(account.id)
        return Verification(fresh.state.works, fresh.status_detail)
    if pending.expires_at < utcnow():
        raise AuthorizationProblem(oauth.EXPIRED)
    try:
        token = grants.device_code_poll(pending.client, str(pending.device_code))
    except oauth_errors.GrantError as exc:
        PendingAuthorization.update(consumed_at=utcnow()).where(
            PendingAuthorization.id == pending.id
        ).execute()
        _discard_if_unlinked(account, user)
        raise AuthorizationProblem(oauth_errors.explain(exc.error, exc.description)) from None
    except oauth_errors.TokenUnavailable:
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
    """Verify a new grant's tokens upstream and store them; only a verified link is active.

    A first link stores the tokens first (status ``error`` when the check fails, so the user can
    test again). An account that already has tokens keeps them, and its status, unless the new
    ones pass the check: a failed re-authorization must not break a working mailbox.
    """
    account = Account.get_by_id(account.id)
    if account.owner_id != actor.id:
        raise AuthorizationProblem(oauth.NO_PENDING)  # never: flows only run on own accounts
    if _taken_elsewhere(account):
        # Only now, with a grant from the provider in hand, is the address told to be taken.
        _refuse_taken(account, actor, ip)
    if client.grant != providers.CLIENT_CREDENTIALS and not token.get("refresh_token"):
        _discard_if_unlinked(account, actor)
        raise AuthorizationProblem(oauth_errors.explain("no_refresh_token"))
    relink = account.has_tokens()
    if relink:
        result = _checked(account, client, token)
        if result.ok:
            _store(account, client, token)
            tokens.set_status(account.id, AccountStatus.ACTIVE)
        else:
            result = Verification(
                False,
                f"{result.message} The new authorization was not saved; the mailbox keeps "
                "its previous one.",
            )
    else:
        _store(account, client, token)
        result = _checked(Account.get_by_id(account.id), client, token)
        try:
            with database.atomic():  # leaves "pending": the address is now held instance-wide
                tokens.set_status(
                    account.id,
                    AccountStatus.ACTIVE if result.ok else AccountStatus.ERROR,
                    "" if result.ok else result.message,
                )
        except pw.IntegrityError:  # another user's link of the address finished first
            _refuse_taken(account, actor, ip)
    if result.ok or not relink:  # the checked tokens are the stored ones
        app_only = client.grant == providers.CLIENT_CREDENTIALS
        record_protocols(Account.get_by_id(account.id), result, app_only)
    audit.record(
        "account.linked" if result.ok else "account.verify_failed",
        actor=actor, ip=ip, target=account.address, detail=client.name,
    )  # fmt: skip
    return result


def _taken_elsewhere(account: Account) -> bool:
    """Whether another account holds the address (linked; placeholders hold nothing)."""
    holder = Account.linked_at(account.address)
    return holder is not None and holder.id != account.id


def _refuse_taken(account: Account, actor: User, ip: str) -> None:
    """Refuse a link of an address someone else holds; the attempt's placeholder (and the new
    grant's tokens stored on it) goes, and nothing of the holder's account is read or changed.
    The audit log keeps the attempt (no owner named: the actor reads their own trail too)."""
    attempt = Account.get_or_none(
        (Account.id == account.id)
        & (Account.owner == actor)
        & (Account.status == AccountStatus.PENDING.value)
    )
    if attempt is not None:
        attempt.delete_instance(recursive=True)
    audit.record("account.link_refused_taken", actor=actor, ip=ip, target=account.address)
    raise AuthorizationProblem(TAKEN, 409)


def _checked(account: Account, client: OAuthClient, token: Mapping[str, Any]) -> Verification:
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        return Verification(False, "The token response holds no access token.")
    result = verify(account, access_token=access, client=client, delegate=_delegate(account, token))
    if not result.ok and client.grant == providers.CLIENT_CREDENTIALS:
        result = Verification(False, f"{result.message} {oauth_errors.CLIENT_CREDENTIALS_HELP}")
    return result


def _delegate(account: Account, token: Mapping[str, Any]) -> str:
    """Who signed in for the mailbox when that is someone else (a shared mailbox's delegate):
    the token says so (id_token, or the access token's ``upn``), else the address the user
    typed on the account page stays; empty for the mailbox itself."""
    identity = grants.identity_from(token)
    if identity:
        return identity if identity != account.address else ""
    return account.signed_in_as


def _store(account: Account, client: OAuthClient, token: Mapping[str, Any]) -> None:
    delegate = _delegate(account, token)
    with database.atomic():
        Account.update(client=client, provider=client.provider, signed_in_as=delegate).where(
            Account.id == account.id
        ).execute()
        tokens.store_tokens(account, token)


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


def set_delegate(user: User, account: Account, delegate: str, *, ip: str = "") -> str:
    """Who signs in for a shared mailbox, as typed on the account page (empty: the mailbox
    itself). SMTP logs in as them and the provider's sign-in page is prefilled with them; the
    next authorization replaces it with whom the provider names in its token, if it does."""
    delegate = normalize_address(delegate) if delegate.strip() else ""
    if delegate == account.address:
        delegate = ""
    Account.update(signed_in_as=delegate).where(Account.id == account.id).execute()
    audit.record("account.delegate", actor=user, ip=ip, target=account.address,
                 detail=delegate or "none")  # fmt: skip
    return delegate


def add_password(
    user: User, account: Account, label: str, password: str | None = None, *, ip: str = ""
) -> str:
    """Add a mail-client password (hashed); returns it (generated when none is given)."""
    label = (label or "").strip()[:100] or "Mail client"
    plain = password or generate_password()
    MailPassword.create(
        account=account,
        label=label,
        password_hash=hash_password(plain),
        lookup=lookup_tag(InstanceSecret.value_of(MAIL_LOOKUP_SECRET), account.address, plain),
    )
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
