"""Pending invitations as the admin manages them: list, a new link for one, revoke.

Only a hash of each link's token is stored, so a lost link cannot be shown again: "new link"
replaces the token (the old link stops working) and starts the expiry afresh.
"""

from __future__ import annotations

import datetime as dt
import secrets

from models import Invite, utcnow
from people.users import _digest


def pending() -> list[Invite]:
    """Invitations not yet used, soonest expiry first (expired ones included, marked by date)."""
    return list(Invite.select().where(Invite.used_at.is_null()).order_by(Invite.expires_at))


def get_pending(invite_id: int) -> Invite | None:
    return Invite.get_or_none((Invite.id == invite_id) & Invite.used_at.is_null())


def renew(invite: Invite, hours: int) -> str:
    """A new token for ``invite`` (returned once), valid ``hours`` from now."""
    token = secrets.token_urlsafe(32)
    invite.token_hash = _digest(token)
    invite.expires_at = utcnow() + dt.timedelta(hours=hours)
    invite.save()
    return token


def revoke(invite: Invite) -> None:
    invite.delete_instance()
