"""The mail server's refusal of a token, per protocol: what it means and what fixes it.

After the token endpoint gave a token, the mail server may still refuse it, for reasons that
are the mailbox's or the tenant's (SMTP AUTH disabled, no permission on a shared mailbox) and
that no new authorization fixes. Such a refusal is recorded for that protocol only (the others
keep working) in ``Account.protocol_state``, with the server's words, a cause and a fix; the
next successful login over that protocol clears it. The patterns follow what Exchange Online and
Gmail send (see the provider notes in the README).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from models import Account, Notification, utcnow
from store.db import database

PROTOCOL_NAMES = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}


@dataclass(frozen=True)
class Refusal:
    """One protocol's recorded refusal."""

    protocol: str
    said: str  # the server's words
    title: str
    cause: str
    fix: str
    # A newer token could help (the server's generic "bad token" answer), so one refresh is
    # worth trying; a policy refusal (SMTP AUTH disabled) is never retried with a new token.
    token_may_help: bool
    since: str = ""  # ISO time of the first refusal in a row
    at: str = ""  # ISO time of the latest
    version: int = 0  # the token version the server refused
    unreachable: bool = False  # no server answered: not a refusal by policy

    @property
    def by_policy(self) -> bool:
        """The server answered and refuses this mailbox over this protocol."""
        return not self.unreachable

    @property
    def name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, self.protocol.upper())

    def for_mail_client(self) -> str:
        """The protocol line's reason: what failed and what fixes it."""
        return f"{self.name} refused by the mail server: {self.title}. {self.fix}"


_CC_SETUP = (
    "In Exchange Online PowerShell: New-ServicePrincipal -AppId <client ID> -ObjectId "
    "<enterprise application object ID>, then Add-MailboxPermission -Identity {address} -User "
    "<service principal ID> -AccessRights FullAccess; and give the app the application "
    "permission {permission} with admin consent."
)


def explain(protocol: str, said: str, address: str, app_only: bool = False) -> Refusal:
    """The refusal ``said`` by the ``protocol`` server for ``address``, in plain words.

    :param app_only: the token is the app's own (Client Credentials), not a user's.
    """
    text = said.lower()
    name = PROTOCOL_NAMES.get(protocol, protocol)

    def make(
        title: str, cause: str, fix: str, token_may_help: bool, unreachable: bool = False
    ) -> Refusal:
        return Refusal(protocol, said[:500], title, cause, fix.format(address=address),
                       token_may_help, unreachable=unreachable)  # fmt: skip

    if re.search(r"could not connect|tls with .* failed|the connection to .* failed", text):
        return make(
            f"The {name} server could not be reached",
            f"Auth-Email could not open a connection to the {name} server when it checked the "
            "link.",
            "Check the server name, port and security in the client's settings (or whether "
            "the provider offers this protocol), then use Test sign-in.",
            False,
            unreachable=True,
        )
    if protocol == "smtp" and "5.7.139" in text:
        if "disabled for the tenant" in text or "disabled for the mailbox" in text:
            scope = "mailbox" if "for the mailbox" in text else "organization (tenant)"
            return make(
                f"SMTP AUTH is disabled for this {scope.split()[0]}",
                f"Exchange Online has authenticated SMTP (SMTP AUTH) turned off for the {scope}. "
                "A new authorization cannot change that.",
                "An Exchange administrator turns it on for this mailbox: Set-CASMailbox "
                "-Identity {address} -SmtpClientAuthenticationDisabled $false"
                + (
                    " (or for everyone: Set-TransportConfig -SmtpClientAuthenticationDisabled "
                    "$false)"
                    if scope != "mailbox"
                    else ""
                )
                + "; it takes effect within an hour.",
                False,
            )
        if "security defaults" in text:
            return make(
                "Security defaults block SMTP AUTH",
                "The organization's security defaults policy refuses authenticated SMTP.",
                "An administrator turns security defaults off (Entra admin center → Overview → "
                "Properties → Manage security defaults) and uses Conditional Access instead, "
                "or sends this mailbox's mail another way.",
                False,
            )
        if "criteria" in text or "conditional access" in text:
            return make(
                "A Conditional Access policy blocks SMTP",
                "A Conditional Access or MFA policy of the organization refuses this sign-in "
                "for SMTP.",
                "Ask your administrator to exclude this app or mailbox from the policy.",
                False,
            )
        return make(
            "The organization's policy refuses SMTP AUTH",
            "Exchange Online refused authenticated SMTP for this mailbox by policy (5.7.139).",
            "Ask your Exchange administrator; see https://aka.ms/smtp_auth_disabled.",
            False,
        )
    if protocol == "smtp" and "5.7.3" in text:
        if app_only:
            return make(
                "The app may not send as this mailbox",
                "Exchange refused the app's token for SMTP: the app lacks the SMTP.SendAsApp "
                "permission, or its service principal has no right on this mailbox.",
                _CC_SETUP.replace("{permission}", "SMTP.SendAsApp"),
                True,
            )
        return make(
            "The token does not allow sending, or the mailbox refuses this user",
            "Exchange refused the token for SMTP: it lacks the SMTP.Send permission "
            "(https://outlook.office.com/SMTP.Send), or the signed-in user has no permission "
            "on this mailbox.",
            "Add https://outlook.office.com/SMTP.Send to the client's scope and authorize the "
            "mailbox again; for a shared mailbox an administrator runs Add-MailboxPermission "
            "-Identity {address} -User <user> -AccessRights FullAccess and "
            "Add-RecipientPermission -Identity {address} -Trustee <user> -AccessRights SendAs.",
            True,
        )
    if protocol == "smtp" and ("5.7.8" in text or "badcredentials" in text):
        return make(
            "The mail server did not accept the token",
            "The SMTP server refused the token: it lacks the mail scope (for Google "
            "https://mail.google.com/), or it belongs to another account than this mailbox.",
            "Check the client's scope and sign in as {address} when you authorize again.",
            True,
        )
    if app_only and protocol in ("imap", "pop3"):
        permission = "IMAP.AccessAsApp" if protocol == "imap" else "POP.AccessAsApp"
        return make(
            f"The app may not open this mailbox over {name}",
            f"The {name} server refused the app's token: the service principal is not "
            "registered in Exchange Online, or has no permission on this mailbox, or the app "
            f"lacks {permission}.",
            _CC_SETUP.replace("{permission}", permission),
            True,
        )
    if protocol in ("imap", "pop3") and re.search(r"not enabled for (imap|pop)", text):
        return make(
            f"{name} is turned off in this Gmail account",
            f"Gmail refuses {name} for this account until it is turned on in its settings. "
            "A new token cannot change that.",
            f"Turn it on in Gmail: Settings → See all settings → Forwarding and POP/IMAP → "
            f"{'Enable IMAP' if protocol == 'imap' else 'Enable POP'} (in Google Workspace the "
            "administrator must allow it too).",
            False,
        )
    if protocol == "imap" and "authenticated but not connected" in text:
        return make(
            "Exchange accepted the sign-in but cannot open this mailbox",
            "IMAP is turned off for this mailbox, or the signed-in user has no access to it "
            "(a shared mailbox without FullAccess). A new token cannot change that.",
            "An Exchange administrator turns IMAP on with Set-CASMailbox -Identity {address} "
            "-ImapEnabled $true; for a shared mailbox, Add-MailboxPermission -Identity "
            "{address} -User <the person who authorizes> -AccessRights FullAccess.",
            False,
        )
    if protocol in ("imap", "pop3") and re.search(
        r"authenticate failed|authentication failure", text
    ):
        scope = "IMAP.AccessAsUser.All" if protocol == "imap" else "POP.AccessAsUser.All"
        switch = "-ImapEnabled" if protocol == "imap" else "-PopEnabled"
        return make(
            f"The {name} server did not accept the token",
            f"The token lacks the {scope} permission, {name} is turned off for this mailbox, "
            "or the signed-in user has no access to it.",
            f"Add https://outlook.office.com/{scope} to the client's scope and authorize "
            f"again; an Exchange administrator turns {name} on with Set-CASMailbox -Identity "
            "{address} " + switch + " $true.",
            True,
        )
    return make(
        f"The {name} server did not accept the token",
        f"The {name} server refused a freshly renewed token: it lacks the mail scope, it is "
        "for another account than this mailbox, or access to the mailbox is turned off.",
        "Check the client's scope, that the mailbox allows this protocol, and sign in as "
        "{address} when you authorize again.",
        True,
    )


# ---------------------------------------------------------------------------------- storage


def states(account: Account) -> dict[str, Refusal]:
    """The account's recorded refusals by protocol (none while everything works)."""
    raw = account.protocol_state or ""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    found = {}
    for protocol, values in data.items() if isinstance(data, dict) else ():
        try:
            found[protocol] = Refusal(**values)
        except TypeError:
            continue
    return found


def record(account_id: int, refusal: Refusal) -> Refusal:
    """Store a protocol's refusal at the account's current token version; returns it."""
    with database.atomic():
        account = Account.get_or_none(Account.id == account_id)
        if account is None:
            return refusal
        known = states(account)
        now = utcnow().isoformat(timespec="seconds")
        before = known.get(refusal.protocol)
        stored = Refusal(
            **{
                **asdict(refusal),
                "since": before.since if before is not None else now,
                "at": now,
                "version": account.token_version,
            }
        )
        known[refusal.protocol] = stored
        _write(account_id, known)
        if stored.by_policy:
            Notification.raise_event(
                account.owner_id,
                "policy_refusal",
                account.address,
                f"{stored.name} refused for {account.address}: {stored.title}",
                f"{stored.cause} {stored.fix} (The server said: {stored.said})",
                account_id=account_id,
            )
    return stored


def clear(account_id: int, protocol: str) -> None:
    """The protocol worked again: forget its refusal."""
    with database.atomic():
        account = Account.get_or_none(Account.id == account_id)
        if account is None:
            return
        known = states(account)
        if known.pop(protocol, None) is not None:
            _write(account_id, known)


def _write(account_id: int, known: dict[str, Refusal]) -> None:
    value = json.dumps({p: asdict(r) for p, r in known.items()}) if known else ""
    Account.update(protocol_state=value).where(Account.id == account_id).execute()


def as_dict(refusal: Refusal) -> dict[str, Any]:
    return asdict(refusal)
