"""The audit log as people read it: a sentence per event code, filters and pages.

Codes stay machine-friendly in the database (``audit.record``); this module only reads them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models import AuditEvent

# event code -> (kind, wording); the wording reads after the actor: "alice@… signed in".
WORDING: dict[str, tuple[str, str]] = {
    "login.succeeded": ("sign-in", "signed in"),
    "login.failed": ("sign-in", "failed to sign in (wrong address or password)"),
    "login.disabled": ("sign-in", "tried to sign in, but the user is disabled"),
    "logout": ("sign-in", "signed out"),
    "user.setup_admin": ("users", "created the administrator"),
    "user.created": ("users", "created a user"),
    "user.invited": ("users", "invited a user"),
    "user.invite_accepted": ("users", "accepted an invitation"),
    "user.invite_renewed": ("users", "made a new invitation link"),
    "user.invite_revoked": ("users", "revoked an invitation"),
    "user.enabled": ("users", "enabled a user"),
    "user.disabled": ("users", "disabled a user"),
    "user.password_changed": ("users", "changed their password"),
    "user.password_reset": ("users", "reset a user's password"),
    "user.custom_clients_granted": ("users", "allowed custom OAuth clients for a user"),
    "user.custom_clients_withdrawn": ("users", "withdrew custom OAuth clients from a user"),
    "client.created": ("clients", "added an OAuth client"),
    "client.updated": ("clients", "changed an OAuth client"),
    "client.deleted": ("clients", "deleted an OAuth client"),
    "client.certificate_created": ("clients", "made a new certificate for an OAuth client"),
    "import.emailproxy": ("clients", "imported clients and mailboxes from email-oauth2-proxy"),
    "client.shared": ("clients", "shared an OAuth client with the team"),
    "client.unshared": ("clients", "stopped sharing an OAuth client"),
    "settings.changed": ("settings", "changed the instance settings"),
    "settings.default_clients": ("settings", "chose the default OAuth clients"),
    "account.authorize_started": ("mailboxes", "started authorizing a mailbox"),
    "account.authorize_failed": ("mailboxes", "could not authorize a mailbox"),
    "account.linked": ("mailboxes", "linked a mailbox"),
    "account.verify_failed": ("mailboxes", "linked a mailbox, but its sign-in check failed"),
    "account.tested": ("mailboxes", "tested a mailbox's sign-in"),
    "account.unlinked": ("mailboxes", "unlinked a mailbox"),
    "account.smtp_delivery": ("mailboxes", "chose how a mailbox sends mail"),
    "account.link_refused_taken": (
        "mailboxes",
        "could not link a mailbox another user has already linked",
    ),
    "account.delegate": ("mailboxes", "named who signs in for a shared mailbox"),
    "account.password_added": ("mailboxes", "added a mail-client password"),
    "account.password_revoked": ("mailboxes", "revoked a mail-client password"),
    "mail.login": ("mail", "a mail program signed in"),
    "mail.smtp_auth_refused": (
        "mail",
        "the mail server refused SMTP AUTH by policy (sending may switch to Microsoft Graph)",
    ),
    "mail.sent_via_graph": ("mail", "a mail program sent a message through Microsoft Graph"),
    "mail.login_failed": ("mail", "a mail program failed to sign in"),
    "mail.login_needs_reauth": (
        "mail",
        "a mail program was refused: the mailbox needs re-authorization",
    ),
    "vault.key_rotated": ("settings", "rotated the encryption key"),
    "notifications.saved": ("settings", "changed their notification settings"),
    "notifications.webhook_secret_replaced": ("settings", "made a new webhook signing secret"),
    "notifications.sender_saved": ("settings", "changed how notification emails are sent"),
}

KINDS = {
    "sign-in": "Sign-ins",
    "users": "Users and invitations",
    "clients": "OAuth clients",
    "settings": "Instance settings",
    "mailboxes": "Mailboxes",
    "mail": "Mail programs",
}

PAGE_SIZE = 50


def describe(action: str) -> str:
    """A person's wording for an event code; unknown codes read as themselves."""
    return WORDING.get(action, ("", action.replace("_", " ").replace(".", ": ")))[1]


def codes_of(kind: str) -> list[str]:
    return [code for code, (k, _) in WORDING.items() if k == kind]


@dataclass
class Filters:
    user: str = ""  # part of an address: who acted, or whom it was about
    kind: str = ""  # a key of KINDS
    since: dt.date | None = None
    until: dt.date | None = None
    page: int = 1


@dataclass
class Page:
    events: list[AuditEvent]
    page: int
    has_next: bool


def parse_date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def query(filters: Filters, actor: int | None = None) -> Page:
    """One page of events, newest first; ``actor`` limits them to one user's own."""
    found = AuditEvent.select()
    if actor is not None:
        found = found.where(AuditEvent.actor == actor)
    if filters.user:
        who = filters.user.strip().lower()
        found = found.where(AuditEvent.actor_email.contains(who) | AuditEvent.target.contains(who))
    if filters.kind in KINDS:
        found = found.where(AuditEvent.action.in_(codes_of(filters.kind)))
    if filters.since:
        found = found.where(AuditEvent.at >= dt.datetime.combine(filters.since, dt.time()))
    if filters.until:
        end = dt.datetime.combine(filters.until + dt.timedelta(days=1), dt.time())
        found = found.where(AuditEvent.at < end)
    page = max(filters.page, 1)
    newest_first = (AuditEvent.at.desc(), AuditEvent.id.desc())  # type: ignore[attr-defined]
    rows = list(found.order_by(*newest_first).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE + 1))
    return Page(rows[:PAGE_SIZE], page, len(rows) > PAGE_SIZE)


def filters_from(args: Mapping[str, str]) -> Filters:
    """The filters of a query string; values that make no sense are ignored."""
    page = args.get("page", "1")
    return Filters(
        user=args.get("user", "")[:254],
        kind=args.get("kind", "") if args.get("kind", "") in KINDS else "",
        since=parse_date(args.get("since")),
        until=parse_date(args.get("until")),
        page=int(page) if page.isdigit() and len(page) < 7 else 1,
    )


def page_context(args: Mapping[str, str], actor: int | None = None) -> dict[str, Any]:
    """What the audit page shows: everyone's events, or only ``actor``'s ("Your activity")."""
    filters = filters_from(args)
    return {
        "result": query(filters, actor),
        "filters": filters,
        "kinds": KINDS,
        "describe": describe,
        "everyone": actor is None,
    }
