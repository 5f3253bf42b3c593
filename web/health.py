"""The admin's health overview: every mailbox of the instance, what state it is in, and why.

One row per linked mailbox: owner, provider, client, per-protocol outcome of the last login
(from the audit log), last successful login, token renewal state and the client's secret or
certificate expiry. "Needs attention" picks the rows a person must act on. Nothing here reads a
secret: client columns are selected by name, tokens only by their expiry.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import peewee as pw
from flask import Blueprint, render_template, request

from mailboxes import account_health
from models import Account, AccountStatus, AuditEvent, OAuthClient, User, utcnow
from oauth import clients as oauth_clients
from oauth import providers
from store.db import Prepared
from web.security import admin_required

bp = Blueprint("health", __name__, url_prefix="/admin")

PROTOCOLS = ("imap", "pop3", "smtp")
# Audit actions of a mail login that got past the password: the mailbox's side of it.
OUTCOMES = {"mail.login": "ok", "mail.login_needs_reauth": "needs re-authorization"}


@dataclass
class Row:
    account_id: int
    address: str
    owner: str
    provider: str
    client: str
    status: str
    status_detail: str
    last_login: dt.datetime | None
    token: str
    expiry: str = ""
    protocols: dict[str, tuple[str, dt.datetime]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    label: str = ""  # the badge, as account_health words it
    css: str = ""

    @property
    def needs_attention(self) -> bool:
        return bool(self.reasons)


def _token_state(account: Account, now: dt.datetime) -> str:
    if account.last_error:
        return f"renewal failing: {account.last_error}"
    if account.token_expires_at is None:
        return "no token yet" if account.state is AccountStatus.PENDING else "—"
    if account.token_expires_at > now:
        return f"valid until {account.token_expires_at:%Y-%m-%d %H:%M} UTC"
    return "expired; renewed at the next use"


def _last_outcomes() -> dict[tuple[str, str], tuple[str, dt.datetime]]:
    """(address, protocol) -> (outcome, when) of the latest login past the password check, for
    every mailbox of the instance."""
    found: dict[tuple[str, str], tuple[str, dt.datetime]] = {}
    for event in _latest_outcomes(*OUTCOMES):
        found[event.target, event.detail] = (OUTCOMES[event.action], event.at)
    return found


# Built once (store.db.Prepared); the outcome actions are its parameters.
_latest_outcomes = Prepared(
    lambda *actions: AuditEvent.select().where(
        AuditEvent.id.in_(
            AuditEvent.select(pw.fn.MAX(AuditEvent.id))
            .where(
                AuditEvent.action.in_(list(actions)),
                AuditEvent.target.in_(Account.select(Account.address)),
            )
            .group_by(AuditEvent.target, AuditEvent.detail)
        )
    )
)
_every_account = Prepared(
    lambda: (
        Account.select(
            Account,
            User.id,
            User.email,
            OAuthClient.id,
            OAuthClient.name,
            OAuthClient.secret_expires_on,
            OAuthClient.credential,
        )
        .join(User, on=(Account.owner == User.id))
        .switch(Account)
        .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=(Account.client == OAuthClient.id))
        .order_by(User.email, Account.address)
    )
)


def overview(today: dt.date | None = None) -> list[Row]:
    """Every mailbox of the instance, by owner and address."""
    today = today or dt.date.today()
    now = utcnow()
    accounts = _every_account()
    outcomes = _last_outcomes() if accounts else {}
    rows = []
    for account in accounts:
        client = account.client if account.client_id else None
        try:
            provider = providers.get(account.provider).name
        except KeyError:
            provider = account.provider
        row = Row(
            account_id=account.id,
            address=account.address,
            owner=account.owner.email,
            provider=provider,
            client=client.name if client else "—",
            status=account.status,
            status_detail=account.status_detail,
            last_login=account.last_used_at,
            token=_token_state(account, now),
        )
        for protocol in PROTOCOLS:
            if (account.address, protocol) in outcomes:
                row.protocols[protocol] = outcomes[account.address, protocol]
        state = account_health.health(account)  # the same words as the owner's pages
        row.label, row.css = state.label, state.css
        if account.state.needs_attention:
            row.reasons.append(account.status_detail or "the provider refused its authorization")
        elif not state.ok and state.problem and account.state is not AccountStatus.PENDING:
            failing = "token renewal failing: " if account.refresh_failures else ""
            row.reasons.append(failing + state.problem)
        if client is not None and client.secret_expires_on:
            what = "certificate" if client.credential == "certificate" else "secret"
            row.expiry = f"{what} until {client.secret_expires_on.isoformat()}"
            level = oauth_clients.expiry_level(client.secret_expires_on, today)
            if level:
                when = "expired" if level[0] == "expired" else f"expires in {level[1]} days"
                row.reasons.append(f"client {what} {when}")
        rows.append(row)
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    return {
        "mailboxes": len(rows),
        "active": sum(r.css == "active" and not r.needs_attention for r in rows),
        "attention": sum(r.needs_attention for r in rows),
        "reauth": sum(r.status == AccountStatus.NEEDS_REAUTH for r in rows),
    }


@bp.get("/health")
@admin_required
def index() -> str:
    rows = overview()
    attention_only = request.args.get("show") == "attention"
    shown = [r for r in rows if r.needs_attention] if attention_only else rows
    return render_template(
        "admin/health.html", rows=shown, counts=counts(rows), attention_only=attention_only
    )
