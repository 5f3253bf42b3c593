"""Custom OAuth clients as data: queries, changes, sharing, instance defaults and secret expiry.

Plain functions that take no request; the editor's views are in ``clients.py``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from errors import PersonError
from models import Account, AccountStatus, Notification, OAuthClient, Setting, User, utcnow
from oauth import providers
from store.db import Prepared, database, parse_id

WARN_DAYS = (30, 7)
DEFAULT_KEY = "default_client.{}"
# Columns the editor writes; the secret goes separately, as it is write-only.
EDITABLE = (
    "name",
    "provider",
    "grant",
    "tenant",
    *providers.DEFAULT_FIELDS,
    "revocation_url",
    "client_id",
    "secret_expires_on",
    *(f"{p}_{a}" for p in ("imap", "pop3", "smtp") for a in ("host", "port", "security")),
    "sasl_mechanism",
    "smtp_delivery",
)


class ClientError(PersonError):
    """A change that cannot be made; the message says why."""


class ClientInUse(ClientError):
    """Accounts use the client: deleting it needs the choice to mark them for re-authorization."""

    def __init__(self, accounts: list[Account]) -> None:
        super().__init__(f"{len(accounts)} account(s) use this client.")
        self.accounts = accounts


# --- Queries ------------------------------------------------------------------------------


def can_edit(user: User, client: OAuthClient) -> bool:
    """Owners edit their own clients; a shared client only the admin edits."""
    if user.is_admin:
        return client.owner_id == user.id or bool(client.shared)
    return client.owner_id == user.id and not client.shared and user.may_use_custom_clients


def visible_clients(user: User) -> list[OAuthClient]:
    """The user's own clients; the admin also sees every shared one."""
    if user.is_admin:
        return OAuthClient.list_own_or_shared(user)
    return _own(user.id)


def accounts_using(client: OAuthClient, viewer: User | None = None) -> list[Account]:
    """Accounts that depend on ``client``; a viewer who is not the admin sees only their own."""
    if viewer is not None and not viewer.is_admin:
        return _accounts_of_owner_using(client.id, viewer.id)
    return _accounts_using(client.id)


def editable_client(user: User, client_id: int) -> OAuthClient | None:
    """``OAuthClient.editable_by(user)`` with that id, if any."""
    if user.is_admin:
        found = _own_or_shared_by_id(user.id, True, client_id)
    else:
        found = _own_by_id(user.id, client_id)
    return found[0] if found else None


def _accounts_using_visible(user: User) -> dict[int, list[Account]]:
    """``accounts_using(c, user)`` for every client of ``visible_clients(user)``, in one query."""
    if user.is_admin:
        rows = _accounts_using_own_or_shared(user.id, True)
    else:
        rows = _own_accounts_using_own(user.id, user.id)
    found: dict[int, list[Account]] = {}
    for account in rows:
        found.setdefault(account.client_id, []).append(account)
    return found


# Built once (store.db.Prepared): the settings page and the client editor run them per client.
_own = Prepared(
    lambda owner: OAuthClient.select().where(OAuthClient.owner == owner).order_by(OAuthClient.name)
)
_own_by_id = Prepared(
    lambda owner, client_id: OAuthClient.select().where(
        OAuthClient.owner == owner, OAuthClient.id == client_id
    )
)
_own_or_shared_by_id = Prepared(
    lambda owner, shared, client_id: OAuthClient.select().where(
        (OAuthClient.owner == owner) | (OAuthClient.shared == shared), OAuthClient.id == client_id
    )
)
_accounts_using_own_or_shared = Prepared(
    lambda owner, shared: (
        Account.select()
        .join(OAuthClient, on=Account.client == OAuthClient.id)
        .where((OAuthClient.owner == owner) | (OAuthClient.shared == shared))
        .order_by(Account.address)
    )
)
_own_accounts_using_own = Prepared(
    lambda client_owner, owner: (
        Account.select()
        .join(OAuthClient, on=Account.client == OAuthClient.id)
        .where(OAuthClient.owner == client_owner, Account.owner == owner)
        .order_by(Account.address)
    )
)
_accounts_using = Prepared(
    lambda client: Account.select().where(Account.client == client).order_by(Account.address)
)
_accounts_of_owner_using = Prepared(
    lambda client, owner: (
        Account.select()
        .where(Account.client == client)
        .where(Account.owner == owner)
        .order_by(Account.address)
    )
)


# --- Changes --------------------------------------------------------------------------------


def save_client(
    owner: User,
    values: dict[str, Any],
    secret: str | None = None,
    client: OAuthClient | None = None,
    clear_secret: bool = False,
) -> OAuthClient:
    """Create (``client`` None) or update a client from validated ``values``.

    A blank ``secret`` keeps the stored one. Fields the preset supplies are cleared so that the
    preset stays the single source; fields the grant does not use are cleared too.
    """
    values = normalized(values)
    cc = values.get("grant") == providers.CLIENT_CREDENTIALS
    if cc and not secret and (client is None or clear_secret or not client.client_secret):
        raise ClientError("A Client Credentials client needs its secret.")
    if client is None:
        client = OAuthClient(owner=owner)
    for name, value in values.items():
        setattr(client, name, value)
    if secret:
        client.client_secret = secret
        client.secret_set_at = utcnow()
    elif clear_secret:  # a public client (Entra refuses a secret from one: AADSTS700025)
        client.client_secret = None
        client.secret_set_at = None
        client.secret_expires_on = None
    client.updated_at = utcnow()
    try:
        with database.atomic():
            client.save()
    except pw.IntegrityError:
        raise ClientError(f"There is already a client named “{values['name']}”.") from None
    return client


def normalized(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` restricted to editable columns and made consistent with preset and grant."""
    values = {k: v for k, v in values.items() if k in EDITABLE}
    preset = providers.get(values["provider"])
    grant = values["grant"]
    if not preset.has_tenant:
        values["tenant"] = ""
    if grant != providers.AUTHORIZATION_CODE:
        values["authorize_url"] = ""
    if grant != providers.DEVICE_CODE:
        values["device_url"] = ""
    if not preset.is_custom:
        for proto in ("imap", "pop3", "smtp"):
            values[f"{proto}_host"], values[f"{proto}_port"] = "", None
            values[f"{proto}_security"] = getattr(OAuthClient, f"{proto}_security").default
        values["sasl_mechanism"] = preset.sasl_mechanism
        values["revocation_url"] = ""
    if not (preset.is_custom or preset.is_microsoft):
        values["smtp_delivery"] = "smtp"  # Microsoft Graph is for Microsoft mailboxes
    return {k: ("" if v is None and k not in _NULLABLE else v) for k, v in values.items()}


_NULLABLE = {"imap_port", "pop3_port", "smtp_port", "secret_expires_on"}


def delete_client(client: OAuthClient, *, reauth_accounts: bool = False) -> list[Account]:
    """Delete ``client``; returns the accounts that used it, now marked for re-authorization.

    Raises ``ClientInUse`` when accounts use it and ``reauth_accounts`` is not set.
    """
    with database.atomic():
        accounts = accounts_using(client)
        if accounts and not reauth_accounts:
            raise ClientInUse(accounts)
        detail = f"The OAuth client “{client.name}” was deleted; authorize this account again."
        Account.set_status(
            Account.client == client, AccountStatus.NEEDS_REAUTH, detail, client=None
        )
        for account in accounts:
            if account.owner_id != client.owner_id:  # the one deleting it knows already
                Notification.raise_event(
                    account.owner_id,
                    "reauth",
                    account.address,
                    f"{account.address} needs re-authorization",
                    detail,
                    account_id=account.id,
                )
        Setting.delete().where(
            (Setting.key == DEFAULT_KEY.format(client.provider)) & (Setting.value == str(client.id))
        ).execute()
        client.delete_instance()
    return accounts


def set_shared(client: OAuthClient, shared: bool) -> None:
    """Shared clients appear on everyone's authorization page; only the admin edits them."""
    OAuthClient.update(shared=shared, updated_at=utcnow()).where(
        OAuthClient.id == client.id
    ).execute()
    client.shared = shared


# --- Instance defaults ----------------------------------------------------------------------


def default_candidates(provider: str) -> list[OAuthClient]:
    """Clients that may serve as the instance default for ``provider``: shared or an admin's."""
    return [c for c in _candidates(True, True) if c.provider == provider]


def all_default_candidates() -> dict[str, list[OAuthClient]]:
    """``default_candidates`` of every preset provider, from one query (the admin settings)."""
    found: dict[str, list[OAuthClient]] = {key: [] for key in providers.PRESETS}
    for client in _candidates(True, True):
        if client.provider in found:
            found[client.provider].append(client)
    return found


def default_client(provider: str) -> OAuthClient | None:
    """The client behind the authorization page's main button for ``provider``, if any."""
    value = Setting.read(DEFAULT_KEY.format(provider))
    client_id = parse_id(value)
    if client_id is None:
        return None
    found = _client_with_owner(client_id)
    client = found[0] if found else None
    if client is None or client.provider != provider:
        return None
    if not (client.shared or client.owner.is_admin):
        return None
    return client


def default_clients() -> dict[str, OAuthClient | None]:
    """``default_client`` of every preset provider, for a page that asks about several."""
    return {key: default_client(key) for key in providers.PRESETS}


_candidates = Prepared(
    lambda shared, admin: (
        OAuthClient.select()
        .join(User)
        .where((OAuthClient.shared == shared) | (User.is_admin == admin))
        .order_by(OAuthClient.name)
    )
)
_client_with_owner = Prepared(
    lambda client_id: (
        OAuthClient.select(OAuthClient, User).join(User).where(OAuthClient.id == client_id)
    )
)


def set_default_client(provider: str, client: OAuthClient | None) -> None:
    """Pick (or clear, with None) the default client of ``provider``."""
    providers.get(provider)
    if client is not None and client.id not in {c.id for c in default_candidates(provider)}:
        raise ClientError("This client cannot be the default for that provider.")
    Setting.write(DEFAULT_KEY.format(provider), str(client.id) if client else None)


# --- Secret expiry --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiryWarning:
    """A client whose secret expires within 30 or 7 days, or has expired."""

    client: OAuthClient
    level: str  # "expired", "7" or "30"
    days_left: int
    accounts: list[Account] = field(default_factory=list)

    @property
    def message(self) -> str:
        date = self.client.secret_expires_on.isoformat() if self.client.secret_expires_on else ""
        name = self.client.name
        what = "certificate" if self.client.credential == "certificate" else "secret"
        if self.level == "expired":
            return f"The {what} of “{name}” expired on {date}; set a new one."
        if self.days_left == 0:
            return f"The {what} of “{name}” expires today ({date})."
        days = "1 day" if self.days_left == 1 else f"{self.days_left} days"
        return f"The {what} of “{name}” expires in {days}, on {date}."


def expiry_level(expires_on: dt.date | None, today: dt.date) -> tuple[str, int] | None:
    """("expired" | "7" | "30", days left) or None when no warning is due."""
    if expires_on is None:
        return None
    days = (expires_on - today).days
    if days < 0:
        return "expired", days
    for limit in sorted(WARN_DAYS):
        if days <= limit:
            return str(limit), days
    return None


def _depended_on(owner_id: int) -> Any:
    return OAuthClient.id.in_(
        Account.select(Account.client).where(
            Account.owner == owner_id, Account.client.is_null(False)
        )
    )


def _expiring_by(until: dt.date, mine: Any) -> Any:
    return OAuthClient.select().where(
        OAuthClient.secret_expires_on.is_null(False), OAuthClient.secret_expires_on <= until, mine
    )


#: Clients whose secret expires by ``until`` that the user manages or depends on (the admin
#: manages the shared ones too); arguments in the order of the SQL's parameters.
_expiring = {
    False: Prepared(
        lambda until, owner, user: _expiring_by(
            until, (OAuthClient.owner == owner) | _depended_on(user)
        )
    ),
    True: Prepared(
        lambda until, owner, shared, user: _expiring_by(
            until,
            (OAuthClient.owner == owner) | (OAuthClient.shared == shared) | _depended_on(user),
        )
    ),
}


def secret_expiry_warnings(user: User, today: dt.date | None = None) -> list[ExpiryWarning]:
    """Warnings for the clients the user manages or whose accounts depend on, soonest first."""
    today = today or dt.date.today()
    # One query, and only for secrets that expire within the warning window (or have expired).
    # An admin also sees the shared clients (shared = True; otherwise shared = NULL: none).
    until = today + dt.timedelta(days=max(WARN_DAYS))
    if user.is_admin:
        soon = _expiring[True](until, user.id, True, user.id)
    else:
        soon = _expiring[False](until, user.id, user.id)
    warnings = []
    for client in soon:
        level = expiry_level(client.secret_expires_on, today)
        if level:
            accounts = accounts_using(client, user)
            warnings.append(ExpiryWarning(client, level[0], level[1], accounts))
    return sorted(warnings, key=lambda w: (w.days_left, w.client.name))


def notify_expiring(today: dt.date | None = None) -> int:
    """Tell each client's owner, and the people whose mailboxes use it, once when its secret or
    certificate enters the 30-day and once when it enters the 7-day window; returns how many
    messages were queued."""
    today = today or dt.date.today()
    queued = 0
    soon = OAuthClient.select().where(
        OAuthClient.secret_expires_on.is_null(False),
        OAuthClient.secret_expires_on >= today,
        OAuthClient.secret_expires_on <= today + dt.timedelta(days=max(WARN_DAYS)),
    )
    for client in soon:
        expires_on = client.secret_expires_on
        if expires_on is None:  # never: the query asks for a date
            continue
        level = expiry_level(expires_on, today)
        if level is None or level[0] == "expired":
            continue
        warning = ExpiryWarning(client, level[0], level[1])
        using = accounts_using(client)
        for user_id in sorted({client.owner_id} | {a.owner_id for a in using}):
            mailboxes = [a.address for a in using if a.owner_id == user_id]
            queued += Notification.raise_event(
                user_id,
                "credential_expiring",
                client.name,
                warning.message,
                "Mailboxes using it: " + (", ".join(mailboxes) or "none of yours") + ". Set a "
                "new secret (or certificate) in Account settings → Custom OAuth clients before "
                "then, or their token renewals stop.",
                period=f"{client.id} {level[0]} {expires_on.isoformat()}",
            )
    return queued


def overview(user: User) -> dict[str, Any]:
    """The custom clients section of the Account settings page: what ``user`` sees, and may do."""
    using = _accounts_using_visible(user)
    rows = [
        {
            "client": c,
            "preset": providers.PRESETS.get(c.provider),
            "grant": providers.GRANT_LABELS.get(c.grant, c.grant),
            "accounts": using.get(c.id, []),
            "editable": can_edit(user, c),
            "expiry": expiry_level(c.secret_expires_on, dt.date.today()),
        }
        for c in visible_clients(user)
    ]
    return {
        "allowed": user.may_use_custom_clients,
        "is_admin": user.is_admin,
        "items": rows,
        "warnings": secret_expiry_warnings(user),
    }
