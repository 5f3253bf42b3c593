"""What the accounts pages say about a mailbox: its state in plain words, from the stored facts.

``Account.status`` alone says "active" for a mailbox whose token cannot be renewed, or whose
SMTP side the mail server refuses; ``health`` puts the renewal failure (what failed, since when,
the next try) and each protocol's refusal beside it, so the pages never claim more than is true.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from mailboxes import refusals as mailrefusals
from models import Account, AccountStatus


@dataclass(frozen=True)
class Health:
    label: str  # the badge
    css: str  # the badge's class: status-<css>
    problem: str = ""  # what fails, in plain words ("" when nothing does)
    since: dt.datetime | None = None
    next_try: dt.datetime | None = None
    refusals: list[mailrefusals.Refusal] = field(default_factory=list)
    # Whether a new authorization can fix it: not for a server's policy refusal (fixed at the
    # server) nor for a token endpoint that is down or throttling (retried by itself).
    reauthorize_helps: bool = False

    @property
    def ok(self) -> bool:
        return self.css == "active"


def health(account: Account) -> Health:
    """The account's state as the pages show it."""
    refusals = sorted(mailrefusals.states(account).values(), key=lambda r: r.protocol)
    if account.state.works and account.refresh_failures:
        return Health(
            "Cannot renew token",
            "error",
            account.last_error or "Renewing the access token failed.",
            account.refresh_failing_since,
            account.next_refresh_at,
            refusals,
        )
    if account.state.works and refusals:
        names = ", ".join(r.name for r in refusals)
        problem = " ".join(f"{r.name}: {r.title}." for r in refusals)
        return Health(f"Active, {names} refused", "partial", problem, refusals=refusals)
    since = account.refresh_failing_since if account.state is AccountStatus.NEEDS_REAUTH else None
    return Health(
        account.state.label,
        account.status,
        account.status_detail if not account.state.works else "",
        since,
        refusals=refusals,
        reauthorize_helps=account.state.needs_attention or account.state.needs_authorization,
    )
