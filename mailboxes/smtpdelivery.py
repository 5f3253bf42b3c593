"""How a Microsoft 365 mailbox's outgoing mail leaves: SMTP AUTH, Microsoft Graph, or automatic.

- ``smtp``: the proxy relays to the provider's SMTP server with XOAUTH2 (what it always did).
- ``graph``: the proxy accepts the message and submits it with Graph's ``sendMail``
  (``graphsend``), for tenants where SMTP AUTH is off.
- ``auto``: SMTP AUTH until Exchange refuses it by policy (``535 5.7.139``); from then on Graph,
  remembered on the account (``smtp_auth_refused_at``) and shown on its page.

An account's own choice wins; empty means its client's default.
"""

from __future__ import annotations

from types import MappingProxyType

from models import Account, OAuthClient, utcnow
from oauth import providers

SMTP, GRAPH, AUTO = "smtp", "graph", "auto"
MODES = MappingProxyType(
    {
        SMTP: "SMTP AUTH (the provider's SMTP server)",
        GRAPH: "Microsoft Graph (sendMail)",
        AUTO: "Automatic: Graph once the tenant refuses SMTP AUTH",
    }
)


def supported(client: OAuthClient | None) -> bool:
    """Graph delivery exists for Microsoft clients (and custom ones, e.g. other clouds)."""
    if client is None:
        return False
    preset = providers.PRESETS.get(client.provider)
    return client.provider == providers.OTHER or bool(preset and preset.is_microsoft)


def mode_of(account: Account) -> str:
    client = account.client
    if not supported(client):
        return SMTP
    mode = account.smtp_delivery or (client.smtp_delivery if client else "") or SMTP
    return mode if mode in MODES else SMTP


def through_graph(account: Account) -> bool:
    """Does this account's mail go through Graph now?"""
    mode = mode_of(account)
    return mode == GRAPH or (mode == AUTO and account.smtp_auth_refused_at is not None)


def record_refusal(account_id: int, detail: str) -> bool:
    """Exchange refused SMTP AUTH by policy; remember it. True when Graph takes over now."""
    Account.update(smtp_auth_refused_at=utcnow(), smtp_auth_refused_detail=detail[:1000]).where(
        Account.id == account_id
    ).execute()
    account = Account.get_or_none(Account.id == account_id)
    return account is not None and mode_of(account) == AUTO


def describe(account: Account) -> str:
    """One sentence for the account page: how this mailbox's mail goes out, and why."""
    mode = mode_of(account)
    if not supported(account.client):
        return ""
    if mode == GRAPH:
        return "Mail from devices goes out through Microsoft Graph (sendMail)."
    if mode == AUTO and account.smtp_auth_refused_at is not None:
        return (
            f"The tenant refused SMTP AUTH on {account.smtp_auth_refused_at:%Y-%m-%d %H:%M} UTC "
            "(5.7.139), so mail from devices goes out through Microsoft Graph."
        )
    if mode == AUTO:
        return (
            "Mail from devices goes out over SMTP AUTH; Microsoft Graph takes over if the "
            "tenant refuses SMTP AUTH."
        )
    if account.smtp_auth_refused_at is not None:
        return (
            f"The tenant refused SMTP AUTH on {account.smtp_auth_refused_at:%Y-%m-%d %H:%M} UTC "
            "(5.7.139): choose Microsoft Graph or Automatic below so that devices can send."
        )
    return "Mail from devices goes out over SMTP AUTH."
