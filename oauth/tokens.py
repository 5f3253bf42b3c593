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
raises ``ClientRefused``; temporary failures are recorded.

A failed refresh is remembered on the row (``refresh_failures``, ``next_refresh_at``), so every
process sharing the database agrees: until the next try, callers get the recorded reason at once
and the token endpoint is not asked (30 s, doubling to an hour, or longer when the provider's
``Retry-After`` says so). Only a request that never reached the server is repeated at once.

A refresh asks for the scope the provider granted, or none (RFC 6749 section 6: "as originally
granted"), never the configured one, which a provider may have narrowed; a refresh refused with
``invalid_scope`` is tried once more without a scope.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter

from models import Account, AccountStatus, Notification, OAuthClient, utcnow
from oauth import errors as oauth_errors
from oauth import grants
from oauth.errors import (
    AccountUnusable,
    ClientRefused,
    GrantError,
    NeedsReauthorization,
    TokenError,
    TokenUnavailable,
)
from oauth.grants import client_credentials, refresh_grant, settings
from oauth.providers import CLIENT_CREDENTIALS
from store.db import Ciphertext, database, vault

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


BACKOFF_FIRST = 30.0  # seconds before the first retry of a failed refresh
BACKOFF_MAX = 3600.0
UNKNOWN_LIFETIME = 300  # an ``expires_in`` that is not a number: assume little, renew early


def expiry_of(token: Mapping[str, Any], now: dt.datetime | None = None) -> dt.datetime:
    """When the access token runs out: ``expires_in`` (a number, or digits in a string)."""
    now = now or utcnow()
    raw = token.get("expires_in")
    if raw is None or raw == "":
        seconds = 3600  # RFC 6749 makes it optional; providers that omit it mean an hour
    else:
        try:
            seconds = int(float(raw))
        except (TypeError, ValueError, OverflowError):
            seconds = UNKNOWN_LIFETIME
    return now + dt.timedelta(seconds=min(max(seconds, 0), 366 * 86400))


def scope_of(token: Mapping[str, Any]) -> str | None:
    """The granted ``scope`` of a token response (a string, or a list some servers send)."""
    raw = token.get("scope")
    if isinstance(raw, list):
        raw = " ".join(str(s) for s in raw)
    if not isinstance(raw, str):
        return None
    return " ".join(raw.split())[:4000]


def backoff_seconds(failures: int, retry_after: float | None = None) -> float:
    """Wait before the next refresh after ``failures`` failed ones in a row (at least 1)."""
    wait = min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)
    if retry_after:
        wait = max(wait, min(retry_after, grants.RETRY_AFTER_MAX))
    return wait


def _renewed(now: dt.datetime) -> dict[Any, Any]:
    """The columns a successful renewal resets: no failure remembered."""
    return {
        Account.last_refresh_at: now,
        Account.last_error: "",
        Account.refresh_failures: 0,
        Account.refresh_failing_since: None,
        Account.next_refresh_at: None,
        Account.refresh_error_kind: "",
    }


def store_tokens(account: Account, token: Mapping[str, Any]) -> None:
    """Store a fresh grant's tokens (after an authorization); moves the version on.

    Ends any refresh claim: the tokens of a new authorization replace what a refresh would get.
    """
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise GrantError("invalid_response", "the token response holds no access token")
    refresh = token.get("refresh_token")
    now = utcnow()
    values: dict[Any, Any] = {
        Account.access_token: _seal(account, Account.access_token, access),
        Account.token_expires_at: expiry_of(token, now),
        Account.token_version: Account.token_version + 1,
        Account.refresh_claimed_until: None,
        Account.granted_scope: scope_of(token) or "",
        **_renewed(now),
    }
    if isinstance(refresh, str) and refresh:
        values[Account.refresh_token] = _seal(account, Account.refresh_token, refresh)
    Account.update(values).where(_ID == account.get_id()).execute()


def set_status(account_id: int, status: AccountStatus | str, detail: str = "") -> None:
    Account.set_status(_ID == account_id, status, detail)


# ---------------------------------------------------------------------------------- lifecycle


def _load(account_id: int) -> Account:
    account = Account.get_or_none(_ID == account_id)
    if account is None:
        raise AccountUnusable("This mailbox is not linked any more.")
    return account


def _usable(account: Account) -> None:
    if account.state is AccountStatus.NEEDS_REAUTH:
        raise NeedsReauthorization(
            account.status_detail or "The provider no longer accepts this mailbox's authorization."
        )
    if account.state is AccountStatus.DISABLED:
        raise AccountUnusable("This mailbox is disabled.")
    if account.state is AccountStatus.PENDING:
        raise AccountUnusable("This mailbox is not authorized yet.")


def _margin(account: Account) -> dt.timedelta:
    """How long before its expiry a token is renewed: the setting, or half the token's life
    when that is shorter (a 30-second token would otherwise be renewed at every use)."""
    margin = dt.timedelta(seconds=settings().margin)
    if account.last_refresh_at is not None and account.token_expires_at is not None:
        margin = min(margin, (account.token_expires_at - account.last_refresh_at) / 2)
    return max(margin, dt.timedelta(0))


def _fresh(account: Account, now: dt.datetime) -> bool:
    return bool(
        account.has_secret("access_token")
        and account.token_expires_at is not None
        and account.token_expires_at > now + _margin(account)
    )


def _valid(account: Account, now: dt.datetime) -> bool:
    """Not expired yet (though maybe inside the renewal margin)."""
    return bool(
        account.has_secret("access_token")
        and account.token_expires_at is not None
        and account.token_expires_at > now + dt.timedelta(seconds=5)
    )


def backing_off(account: Account, now: dt.datetime | None = None) -> bool:
    """A refresh failed and the next try is not due yet."""
    return account.next_refresh_at is not None and account.next_refresh_at > (now or utcnow())


def _recorded(account: Account, now: dt.datetime) -> TokenError:
    """The remembered failure, as the error a caller gets without asking the provider again."""
    said = account.last_error or "Renewing the token failed."
    wait = None
    if account.next_refresh_at is not None and account.next_refresh_at > now:
        wait = max(1.0, (account.next_refresh_at - now).total_seconds())
        said = f"{said} Next try in {_duration(wait)}."
    if account.refresh_error_kind == "client":
        return ClientRefused(said, retry_after=wait)
    return TokenUnavailable(said, wait)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def get_access_token(account_id: int, force_refresh: bool = False) -> str:
    """A valid access token for the account, refreshing it if needed (one refresh at a time).

    ``force_refresh``: the upstream refused the cached token; get a newer one (a refresh that
    another caller finished meanwhile counts). Raises ``NeedsReauthorization``,
    ``TokenUnavailable`` or ``AccountUnusable``.
    """
    with connected():
        return _get_access_token(account_id, force_refresh)


def ready_token(account: Account) -> str | None:
    """The access token of a row just read, when ``get_access_token`` would return it as it is:
    the account usable, no refresh in flight, the token outside its renewal margin. Else None
    (the caller asks ``get_access_token``)."""
    now = utcnow()
    if account.status != "active":
        return None
    if account.refresh_claimed_until is not None and account.refresh_claimed_until > now:
        return None
    return str(account.access_token) if _fresh(account, now) else None


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
            if backing_off(account, now):
                # A refresh failed lately (maybe the one we waited for): no new request before
                # the recorded time. A token that has not run out yet still serves (unless the
                # server just refused it).
                if newer and not force_refresh and _valid(account, now):
                    return str(account.access_token)
                raise _recorded(account, now)
            if waited_for_other:
                # The refresh we waited for failed without a record (its caller died). Do not
                # pile on.
                raise _recorded(account, now)
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
                cached = account.access_token if _valid(account, now) else None
                account.token_version = version + 1
                try:
                    return _refresh(account)
                except TokenUnavailable:
                    if cached is None or force_refresh:
                        raise
                    return str(cached)  # renewal failed early: the old token still serves
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
    """Record why a refresh failed, and when to try again, and release the claim.

    A refused grant (NeedsReauthorization) marks the account but keeps its tokens; anything
    else leaves it active with ``last_error`` and a back-off (``next_refresh_at``).
    """
    now = utcnow()
    since = account.refresh_failing_since or now
    if isinstance(exc, NeedsReauthorization):
        log.warning("account %s needs re-authorization: %s", account.get_id(), exc.message)
        Account.set_status(
            mine,
            AccountStatus.NEEDS_REAUTH,
            exc.message,
            last_error=exc.message,
            refresh_failures=account.refresh_failures + 1,
            refresh_failing_since=since,
            next_refresh_at=None,
            refresh_error_kind="reauth",
            token_version=claim + 1,
            refresh_claimed_until=None,
        )
        Notification.raise_event(
            account.owner_id,
            "reauth",
            account.address,
            f"{account.address} needs re-authorization",
            exc.message,
            account_id=account.get_id(),
        )
    elif isinstance(exc, TokenUnavailable):
        failures = account.refresh_failures + 1
        wait = backoff_seconds(failures, exc.retry_after)
        Account.update(
            last_error=exc.message[:1000],
            refresh_failures=failures,
            refresh_failing_since=since,
            next_refresh_at=now + dt.timedelta(seconds=wait),
            refresh_error_kind="client" if isinstance(exc, ClientRefused) else "unavailable",
            token_version=claim + 1,
            refresh_claimed_until=None,
        ).where(mine).execute()
        log.warning(
            "token refresh for account %s failed (%d in a row, next try in %d s): %s",
            account.get_id(), failures, wait, exc.message,
        )  # fmt: skip
        minutes = Notification.failing_minutes()
        if now - since >= dt.timedelta(minutes=minutes):
            Notification.raise_event(
                account.owner_id,
                "renewal_failing",
                account.address,
                f"Renewing the token of {account.address} has failed for over {minutes} min",
                f"Failing since {since:%Y-%m-%d %H:%M} UTC ({failures} tries in a row). "
                f"{exc.message[:1000]}",
                account_id=account.get_id(),
            )
    else:
        Account.update(token_version=claim + 1, refresh_claimed_until=None).where(mine).execute()


def _reauth_message(exc: GrantError) -> str:
    said = exc.description or exc.error
    known = oauth_errors.known_explanation(exc.error, exc.description)
    if known is None:
        return f"The provider refused to renew the authorization ({exc.error}): {said}"[:1000]
    return (f"{known.title}: {known.cause} {known.fix} (The provider said: {exc.error}: {said})")[
        :1000
    ]


def _client_message(client: OAuthClient, exc: GrantError) -> str:
    """Why the provider refuses the client, and that its settings (not the user) must change."""
    known = oauth_errors.known_explanation(exc.error, exc.description)
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
    if exc.grant_gone and not oauth_errors.is_throttling(exc.error, exc.description):
        return NeedsReauthorization(_reauth_message(exc))
    if exc.client_refused:
        return ClientRefused(
            _client_message(client, exc), exc.error, exc.description, exc.retry_after
        )
    said = exc.description or exc.error
    return TokenUnavailable(
        f"The provider refused to renew the token ({exc.error}): {said}"[:1000], exc.retry_after
    )


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
        except TokenUnavailable as exc:
            # Only a request that never reached the server is sent again now: an answer (a
            # 503, a timeout that may have been processed) waits for the back-off.
            if not exc.unreached or attempt == settings().attempts:
                raise
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


class _ClaimLost(TokenUnavailable):
    """The refresh claim lapsed and another caller took over before our tokens were stored."""


def _renew(account: Account, client: OAuthClient) -> dict[str, Any]:
    """One token request (two when a scope was refused); the new tokens are stored (under the
    claim) before returning."""
    if client.grant == CLIENT_CREDENTIALS:
        token = client_credentials(client)
        _save(account, token, None)
        return token
    refresh = account.refresh_token
    if not refresh:
        raise NeedsReauthorization(
            "No refresh token is stored for this mailbox; authorize it again."
        )
    scope = account.granted_scope or ""
    try:
        token = refresh_grant(client, str(refresh), scope)
    except GrantError as exc:
        if exc.error != "invalid_scope" or not scope:
            raise
        log.info("account %s: refresh refused for its scope; again without", account.get_id())
        token = refresh_grant(client, str(refresh), "")
        scope = ""
    _save(account, token, scope)
    return token


def _save(account: Account, token: Mapping[str, Any], asked: str | None) -> None:
    """Store a renewal's tokens under our claim. A rotated refresh token is kept even when the
    rest of the answer is unusable: the old one may be spent."""
    claim = account.token_version
    now = utcnow()
    rotated = token.get("refresh_token")
    access = token.get("access_token")
    values: dict[Any, Any] = {}
    if isinstance(rotated, str) and rotated:
        values[Account.refresh_token] = _seal(account, Account.refresh_token, rotated)
    if not isinstance(access, str) or not access:
        if values:
            Account.update(values).where(
                _ID == account.get_id(), Account.token_version == claim
            ).execute()
        raise TokenUnavailable("the token endpoint answered without an access token")
    granted = scope_of(token)
    values.update(
        {
            Account.access_token: _seal(account, Account.access_token, access),
            Account.token_expires_at: expiry_of(token, now),
            Account.token_version: claim + 1,
            Account.refresh_claimed_until: None,
            **_renewed(now),
        }
    )
    if granted is not None or asked is not None:
        # what the provider says it granted; else what we asked for (none after a refusal)
        values[Account.granted_scope] = granted if granted is not None else asked
    stored = (
        Account.update(values).where(_ID == account.get_id(), Account.token_version == claim)
    ).execute()
    if not stored:
        # Our claim lapsed and someone else took over: their tokens win.
        raise _ClaimLost("the refresh took too long and was taken over")
