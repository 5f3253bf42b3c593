"""The browser side of OAuth: authorize URLs, pending authorizations, and errors in plain words.

An Authlib session is built per authorization from the chosen ``OAuthClient`` (never kept in a
global registry). The ``state`` and the PKCE verifier live server-side in
``PendingAuthorization`` rows: one-time, expiring, owned by the user who started them.
"""

from __future__ import annotations

import datetime as dt
import secrets

from authlib.common.security import generate_token

from models import Account, OAuthClient, PendingAuthorization, User, utcnow
from oauth import grants, providers
from oauth.errors import AuthorizationProblem, Explanation

PENDING_LIFETIME = dt.timedelta(minutes=15)
CALLBACK_PATH = "/authorize"


def redirect_uri(public_url: str) -> str:
    """The one redirect URI: exactly ``<public URL>/authorize``."""
    return public_url.rstrip("/") + CALLBACK_PATH


def begin(user: User, account: Account, client: OAuthClient, redirect: str) -> str:
    """Record a pending authorization and return the provider's authorize URL (PKCE S256)."""
    if not client.authorize_url:
        raise AuthorizationProblem(
            Explanation(
                "This client cannot sign you in with a browser",
                "The client has no authorization (permission) URL.",
                "Edit the client and fill in its authorization URL, or choose another client.",
            )
        )
    grants.check_endpoint(client.authorize_url)
    verifier = generate_token(64)
    state = secrets.token_urlsafe(32)
    PendingAuthorization.create(
        state=state,
        owner=user,
        account=account,
        client=client,
        code_verifier=verifier,
        expires_at=utcnow() + PENDING_LIFETIME,
    )
    session = grants.session_for(client, redirect_uri=redirect)
    # A shared mailbox is authorized by its delegate: hint the delegate, never the mailbox.
    hint = account.signed_in_as or account.address
    params = {"login_hint": hint, **providers.extra_authorize_params(client)}
    url, _ = session.create_authorization_url(
        client.authorize_url, state=state, code_verifier=verifier, **params
    )
    return str(url)


def begin_device(
    user: User, account: Account, client: OAuthClient, start: grants.DeviceStart
) -> PendingAuthorization:
    """Record a Device Code flow in progress (the device code is stored encrypted)."""
    pending = PendingAuthorization(
        state=secrets.token_urlsafe(32),
        owner=user,
        account=account,
        client=client,
        device_code=start.device_code,
        user_code=start.user_code,
        verification_uri=start.verification_uri_complete or start.verification_uri,
        interval=max(start.interval, 1),
        expires_at=utcnow() + dt.timedelta(seconds=start.expires_in),
    )
    pending.save(force_insert=True)
    return pending


NO_PENDING = Explanation(
    "No authorization is waiting for this answer",
    "The provider sent you back here, but this browser session started no authorization that "
    "matches it: the link was altered, belongs to someone else, or was already used.",
    "Go to Accounts and start the authorization again.",
    code="no_pending_authorization",
)
REPLAYED = Explanation(
    "This authorization was already used",
    "The answer from the provider has been used once already; each one works only once.",
    "Go to Accounts and start the authorization again.",
    code="replayed",
)
EXPIRED = Explanation(
    "This authorization took too long",
    "The authorization was started too long ago and has expired.",
    "Go to Accounts and start the authorization again.",
    code="expired",
)


def take_pending(user: User, state: str | None) -> PendingAuthorization:
    """The user's pending authorization for ``state``, marked used (once only)."""
    pending = None
    if state and len(state) <= 64:
        pending = PendingAuthorization.get_or_none(
            (PendingAuthorization.state == state)
            & (PendingAuthorization.owner == user)
            & PendingAuthorization.device_code.is_null()
        )
    if pending is None:
        raise AuthorizationProblem(NO_PENDING)
    if pending.consumed_at is not None:
        raise AuthorizationProblem(REPLAYED)
    if pending.expires_at < utcnow():
        raise AuthorizationProblem(EXPIRED)
    used = (
        PendingAuthorization.update(consumed_at=utcnow())
        .where((PendingAuthorization.id == pending.id) & PendingAuthorization.consumed_at.is_null())
        .execute()
    )
    if not used:
        raise AuthorizationProblem(REPLAYED)
    return pending


def device_pending(user: User, account: Account, state: str) -> PendingAuthorization | None:
    return PendingAuthorization.get_or_none(
        (PendingAuthorization.state == state)
        & (PendingAuthorization.owner == user)
        & (PendingAuthorization.account == account)
        & PendingAuthorization.device_code.is_null(False)
    )


def forget_expired(now: dt.datetime | None = None) -> int:
    """Delete pending authorizations that expired a day ago (housekeeping)."""
    cutoff = (now or utcnow()) - dt.timedelta(days=1)
    return int(
        PendingAuthorization.delete().where(PendingAuthorization.expires_at < cutoff).execute()
    )
