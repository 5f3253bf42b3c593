"""What a person can do next: the authorization page's choices and the admin's first-run checklist.

Plain functions over the models, so the accounts screen stays thin and tests need no request.
The rule for the authorization page: exactly one primary action when there is one obvious client
(the provider's default, or the only usable client), no client listed twice, and when nothing is
usable, the names of the people who can fix that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from models import Account, AccountStatus, MailPassword, OAuthClient, User
from oauth import clients as oauth_clients
from oauth import providers
from store.db import Prepared


@dataclass
class AuthorizationOptions:
    """The authorization page's buttons: one ``primary`` (or none) and the ``others`` below it."""

    primary: OAuthClient | None = None
    primary_is_default: bool = False
    others: list[OAuthClient] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)

    @property
    def nothing_usable(self) -> bool:
        return self.primary is None and not self.others


def admin_emails() -> list[str]:
    """Who to ask for a client: the enabled administrators."""
    return [u.email for u in _admins(True, True)]


_admins = Prepared(
    lambda admin, enabled: (
        User.select(User.email)
        .where(User.is_admin == admin, User.is_enabled == enabled)
        .order_by(User.email)
    )
)


Defaults = Mapping[str, OAuthClient | None]


def _default(provider: str, defaults: Defaults | None) -> OAuthClient | None:
    """The provider's default client, from ``defaults`` (``oauth_clients.default_clients()``,
    read once for a page that asks several times) when given."""
    if defaults is not None and provider in defaults:
        return defaults[provider]
    return oauth_clients.default_client(provider)


def authorization_options(
    user: User, provider: str, defaults: Defaults | None = None
) -> AuthorizationOptions:
    """The clients ``user`` may authorize an address of ``provider`` with ("" = not guessed).

    With a known provider its default client is the primary action. Without one, the defaults
    of every provider are offered too, so a guess that failed is no dead end; a single usable
    client then becomes the primary action.
    """
    usable = OAuthClient.list_usable_by(user)
    default = _default(provider, defaults) if provider else None
    options = AuthorizationOptions(admins=admin_emails())
    if default is not None:
        options.primary, options.primary_is_default = default, True
        options.others = [c for c in usable if c.id != default.id]
        return options
    candidates = list(usable)
    if not provider:
        seen = {c.id for c in candidates}
        for key in providers.PRESETS:
            found = _default(key, defaults)
            if found is not None and found.id not in seen:
                candidates.append(found)
                seen.add(found.id)
    if len(candidates) == 1:
        options.primary = candidates[0]
    else:
        options.others = candidates
    return options


@dataclass(frozen=True)
class DefaultsWarning:
    """No provider has a default client (``none_at_all``), or these ones in use lack one."""

    none_at_all: bool
    providers: list[str]

    def __bool__(self) -> bool:
        return self.none_at_all or bool(self.providers)


def missing_defaults(defaults: Defaults | None = None) -> DefaultsWarning:
    """Where the authorization page has no main button although people need one: every
    provider when none has a default yet, else the providers of linked mailboxes without one."""
    missing = {key for key in providers.PRESETS if _default(key, defaults) is None}
    if len(missing) == len(providers.PRESETS):
        return DefaultsWarning(True, [])
    in_use = {a.provider for a in Account.select(Account.provider).distinct()}
    return DefaultsWarning(
        False, [p.name for key, p in providers.PRESETS.items() if key in missing & in_use]
    )


def _progress(owner_id: int) -> tuple[bool, bool, bool, bool]:
    """The checklist's facts in one query: whether a shared client, a linked mailbox of the
    admin's, a mail password of theirs, and one that a mail program used exist."""
    row = _progress_query(True, owner_id, AccountStatus.ACTIVE.value, owner_id, owner_id)[0]
    return bool(row["shared"]), bool(row["linked"]), bool(row["password"]), bool(row["used"])


def _exists(query: Any) -> Any:
    return pw.fn.EXISTS(query.select(pw.SQL("1")))


_progress_query = Prepared(
    lambda shared, owner_a, active, owner_b, owner_c: pw.Select(
        columns=[
            _exists(OAuthClient.select().where(OAuthClient.shared == shared)).alias("shared"),
            _exists(
                Account.select().where(Account.owner == owner_a, Account.status == active)
            ).alias("linked"),
            _exists(MailPassword.select().join(Account).where(Account.owner == owner_b)).alias(
                "password"
            ),
            _exists(
                MailPassword.select()
                .join(Account)
                .where(Account.owner == owner_c, MailPassword.last_used_at.is_null(False))
            ).alias("used"),
        ]
    ).dicts()
)


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    done: bool
    hint: str


def first_run_steps(user: User, defaults: Defaults | None = None) -> list[Step]:
    """The admin's first-run checklist, each step ticked from the data (not from clicks)."""
    shared, linked, has_password, used = _progress(user.id)
    has_default = any(_default(key, defaults) for key in providers.PRESETS)
    return [
        Step(
            "share",
            "Share an OAuth client with the team",
            shared,
            "Add your app registration under Account settings, then “Share with the team”.",
        ),
        Step(
            "default",
            "Make it a provider's default client",
            has_default,
            "Admin → Instance settings → Default authorization method.",
        ),
        Step("link", "Link a mailbox", linked, "Add account, then authorize once."),
        Step("password", "Set a mail-client password", has_password, "On the mailbox's page."),
        Step(
            "mailclient",
            "Configure a mail program",
            used,
            "Mail client settings, on each account; ticked once a mail program signed in.",
        ),
    ]
