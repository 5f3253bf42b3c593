"""The token lifecycle: cached access tokens, refreshed one at a time per account.

A plain module (no Flask request needed) that the web app, the upkeep thread and the mail proxy
share. The access token is cached encrypted with its expiry; when it is about to run out, one
caller claims the refresh with a compare-and-swap on ``Account.token_version`` (so one refresh
runs at a time across threads and processes sharing the database) and the others wait for the
version to move. A rotated refresh token is stored in the same UPDATE as the new access token,
before anyone uses it. The requests themselves are in ``grants``.

What a refused refresh does depends on the provider's error: a grant that is gone
(``invalid_grant`` and kin) marks the account ``needs_reauth``; a refused client
(``invalid_client`` and kin: an expired secret, say) leaves it active, records what to fix and
raises ``ClientRefused``; temporary failures are retried with backoff and recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter

import oauth
from db import Ciphertext, database, vault
from grants import (
    CLIENT_CREDENTIALS,
    AccountUnusable,
    ClientRefused,
    GrantError,
    NeedsReauthorization,
    TokenError,
    TokenUnavailable,
    call_endpoint,
    check_endpoint,
    client_credentials,
    session_for,
    settings,
)
from models import Account, OAuthClient, utcnow

__all__ = [
    "AccountUnusable",
    "ClientRefused",
    "GrantError",
    "NeedsReauthorization",
    "TokenError",
    "TokenUnavailable",
    "get_access_token",
    "store_tokens",
]

log = logging.getLogger("auth_email.tokens")
# The primary key column (peewee declares ``id`` implicitly, which type checkers cannot see).
_ID: Any = Account._meta.primary_key

REFRESHES = Counter(
    "auth_email_token_refreshes_total",
    "Access token renewals by outcome (ok, needs_reauth, client_refused, unavailable, error)",
    ["result"],
)


# ---------------------------------------------------------------------------------- storage


@contextmanager
def connected() -> Iterator[None]:
    """A database connection for this thread: reuse an open one, close only what we opened."""
    opened = database.is_closed()
    if opened:
        database.connect()
    try:
        yield
    finally:
        if opened and not database.is_closed():
            database.close()


def _seal(account: Account, field: Any, value: str | None) -> Ciphertext | None:
    if value is None:
        return None
    return Ciphertext(vault.get().seal(value, field.aad(account)))


def expiry_of(token: Mapping[str, Any], now: dt.datetime | None = None) -> dt.datetime:
    now = now or utcnow()
    try:
        raw = token.get("expires_in")
        seconds = 3600 if raw is None or raw == "" else int(raw)
    except (TypeError, ValueError):
        seconds = 3600
    return now + dt.timedelta(seconds=max(seconds, 0))


def store_tokens(account: Account, token: Mapping[str, Any]) -> None:
    """Store a fresh grant's tokens (after an authorization); moves the version on.

    Ends any refresh claim: the tokens of a new authorization replace what a refresh would get.
    """
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise GrantError("invalid_response", "the token response holds no access token")
    refresh = token.get("refresh_token")
    values: dict[Any, Any] = {
        Account.access_token: _seal(account, Account.access_token, access),
        Account.token_expires_at: expiry_of(token),
        Account.token_version: Account.token_version + 1,
        Account.refresh_claimed_until: None,
        Account.last_refresh_at: utcnow(),
        Account.last_error: "",
    }
    if isinstance(refresh, str) and refresh:
        values[Account.refresh_token] = _seal(account, Account.refresh_token, refresh)
    Account.update(values).where(_ID == account.get_id()).execute()


def set_status(account_id: int, status: str, detail: str = "") -> None:
    Account.update(status=status, status_detail=detail).where(_ID == account_id).execute()


# ---------------------------------------------------------------------------------- lifecycle


def _load(account_id: int) -> Account:
    account = Account.get_or_none(_ID == account_id)
    if account is None:
        raise AccountUnusable("This mailbox is not linked any more.")
    return account


def _usable(account: Account) -> None:
    if account.status == "needs_reauth":
        raise NeedsReauthorization(
            account.status_detail or "The provider no longer accepts this mailbox's authorization."
        )
    if account.status == "disabled":
        raise AccountUnusable("This mailbox is disabled.")
    if account.status == "pending":
        raise AccountUnusable("This mailbox is not authorized yet.")


def _fresh(account: Account, now: dt.datetime) -> bool:
    return bool(
        account.__data__.get("access_token") is not None
        and account.token_expires_at is not None
        and account.token_expires_at > now + dt.timedelta(seconds=settings().margin)
    )


def get_access_token(account_id: int, force_refresh: bool = False) -> str:
    """A valid access token for the account, refreshing it if needed (one refresh at a time).

    ``force_refresh``: the upstream refused the cached token; get a newer one (a refresh that
    another caller finished meanwhile counts). Raises ``NeedsReauthorization``,
    ``TokenUnavailable`` or ``AccountUnusable``.
    """
    with connected():
        return _get_access_token(account_id, force_refresh)


def _get_access_token(account_id: int, force_refresh: bool) -> str:
    stale_version: int | None = None
    waited_for_other = False
    deadline = time.monotonic() + settings().claim_seconds + 5
    while True:
        account = _load(account_id)
        _usable(account)
        if force_refresh and stale_version is None:
            stale_version = account.token_version
        now = utcnow()
        claimed = account.refresh_claimed_until is not None and account.refresh_claimed_until > now
        newer = stale_version is None or account.token_version != stale_version
        if not claimed and newer and _fresh(account, now):
            return str(account.access_token)
        if not claimed:
            if waited_for_other:
                # The refresh we waited for failed; its error is recorded. Do not pile on.
                raise TokenUnavailable(
                    account.last_error or "The token could not be refreshed; try again shortly."
                )
            version = account.token_version
            won = (
                Account.update(
                    token_version=version + 1,
                    refresh_claimed_until=now + dt.timedelta(seconds=settings().claim_seconds),
                )
                .where(_ID == account_id, Account.token_version == version)
                .execute()
            )
            if won:
                account.token_version = version + 1
                return _refresh(account)
            continue  # someone else moved the version first: look again
        waited_for_other = True
        if time.monotonic() > deadline:
            raise TokenUnavailable("Another refresh of this mailbox's token is taking too long.")
        time.sleep(settings().poll)


def _refresh(account: Account) -> str:
    """Run the claimed refresh; always ends the claim (by moving the version on)."""
    claim = account.token_version
    mine = (_ID == account.get_id()) & (Account.token_version == claim)
    try:
        token = _request_with_retries(account)
    except _ClaimLost:
        # Our claim lapsed and another caller refreshed meanwhile (its version won). Never try
        # again with our refresh token: it may be rotated now, and reuse revokes the grant.
        REFRESHES.labels("unavailable").inc()
        return _stored_by_other(account.get_id())
    except BaseException as exc:
        REFRESHES.labels(_outcome(exc)).inc()
        _end_failed_claim(account, claim, mine, exc)
        raise
    REFRESHES.labels("ok").inc()
    return str(token["access_token"])


def _stored_by_other(account_id: int) -> str:
    """The token that the caller who took over our lapsed claim stored, if it is fresh."""
    account = _load(account_id)
    _usable(account)
    now = utcnow()
    claimed = account.refresh_claimed_until is not None and account.refresh_claimed_until > now
    if not claimed and _fresh(account, now):
        return str(account.access_token)
    raise TokenUnavailable(
        "The token refresh took too long and another one took over; try again shortly."
    )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, NeedsReauthorization):
        return "needs_reauth"
    if isinstance(exc, ClientRefused):
        return "client_refused"
    if isinstance(exc, TokenUnavailable):
        return "unavailable"
    return "error"


def _end_failed_claim(account: Account, claim: int, mine: Any, exc: BaseException) -> None:
    """Record why a refresh failed and release the claim. A refused grant (NeedsReauthorization)
    marks the account but keeps its tokens; anything else leaves it active with ``last_error``."""
    if isinstance(exc, NeedsReauthorization):
        log.warning("account %s needs re-authorization: %s", account.get_id(), exc.message)
        Account.update(
            status="needs_reauth",
            status_detail=exc.message,
            last_error=exc.message,
            token_version=claim + 1,
            refresh_claimed_until=None,
        ).where(mine).execute()
    elif isinstance(exc, TokenUnavailable):
        Account.update(
            last_error=f"{utcnow():%Y-%m-%d %H:%M} UTC: {exc.message}",
            token_version=claim + 1,
            refresh_claimed_until=None,
        ).where(mine).execute()
        log.warning("token refresh for account %s failed: %s", account.get_id(), exc.message)
    else:
        Account.update(token_version=claim + 1, refresh_claimed_until=None).where(mine).execute()


def _reauth_message(exc: GrantError) -> str:
    said = exc.description or exc.error
    return f"The provider refused to renew the authorization ({exc.error}): {said}"[:1000]


def _client_message(client: OAuthClient, exc: GrantError) -> str:
    """Why the provider refuses the client, and that its settings (not the user) must change."""
    known = oauth.known_explanation(exc.error, exc.description)
    if known is not None:
        said = f"{known.title} ({known.code}). {known.cause} {known.fix}"
    else:
        said = f"({exc.error}) {exc.description}".strip()
    return (
        f'The provider refuses the OAuth client "{client.name}": {said} Re-authorizing the '
        "mailbox cannot help: the client's secret or settings must be fixed in Account settings."
    )[:1000]


def _classified(client: OAuthClient, exc: GrantError) -> TokenError:
    """The provider's refusal as the error that says what helps."""
    if exc.grant_gone:
        return NeedsReauthorization(_reauth_message(exc))
    if exc.client_refused:
        return ClientRefused(_client_message(client, exc), exc.error, exc.description)
    said = exc.description or exc.error
    return TokenUnavailable(f"The provider refused to renew the token ({exc.error}): {said}"[:1000])


def _request_with_retries(account: Account) -> dict[str, Any]:
    client = account.client
    if client is None:
        raise NeedsReauthorization(
            "The OAuth client this mailbox was linked with no longer exists; authorize again."
        )
    pause = settings().backoff
    for attempt in range(1, settings().attempts + 1):
        try:
            return _renew(account, client)
        except GrantError as exc:
            raise _classified(client, exc) from None
        except (_ClaimLost, ClientRefused):
            raise  # retrying cannot help (and must not reuse a spent refresh token)
        except TokenUnavailable:
            if attempt == settings().attempts:
                raise
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


class _ClaimLost(TokenUnavailable):
    """The refresh claim lapsed and another caller took over before our tokens were stored."""


def _renew(account: Account, client: OAuthClient) -> dict[str, Any]:
    """One token request; the new tokens are stored (under the claim) before returning."""
    claim = account.token_version

    def save(token: Mapping[str, Any], refresh_token: str | None = None, **_: Any) -> None:
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenUnavailable("the token endpoint answered without an access token")
        rotated = token.get("refresh_token") or refresh_token
        values: dict[Any, Any] = {
            Account.access_token: _seal(account, Account.access_token, access),
            Account.token_expires_at: expiry_of(token),
            Account.token_version: claim + 1,
            Account.refresh_claimed_until: None,
            Account.last_refresh_at: utcnow(),
            Account.last_error: "",
        }
        if isinstance(rotated, str) and rotated:
            values[Account.refresh_token] = _seal(account, Account.refresh_token, rotated)
        stored = (
            Account.update(values)
            .where(_ID == account.get_id(), Account.token_version == claim)
            .execute()
        )
        if not stored:
            # Our claim lapsed and someone else took over: their tokens win.
            raise _ClaimLost("the refresh took too long and was taken over")

    if client.grant == CLIENT_CREDENTIALS:
        token = client_credentials(client)
        save(token)
        return token
    refresh = account.refresh_token
    if not refresh:
        raise NeedsReauthorization(
            "No refresh token is stored for this mailbox; authorize it again."
        )
    check_endpoint(client.token_url)
    session = session_for(client, update_token=save)
    return call_endpoint(
        lambda: session.refresh_token(
            client.token_url, refresh_token=str(refresh), timeout=settings().timeout
        )
    )
