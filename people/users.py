"""User management as plain functions: the views and the CLI both call these."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

import peewee as pw

from errors import PersonError
from models import Invite, User, utcnow
from people.passwords import hash_password
from store.db import database


class UserError(PersonError, ValueError):
    """A user change that cannot be made; the message is for a person."""


def create_admin(email: str, password: str) -> User:
    """Create the first administrator; refuses once any user exists (setup closes)."""
    with database.atomic():
        if User.select().exists():
            raise UserError("Setup is already done: an administrator exists.")
        return User.create(
            email=email.strip().lower(),
            password_hash=hash_password(password),
            is_admin=True,
            can_custom_clients=True,
        )


def create_user(email: str, password: str, can_custom_clients: bool) -> User:
    try:
        with database.atomic():
            return User.create(
                email=email.strip().lower(),
                password_hash=hash_password(password),
                can_custom_clients=can_custom_clients,
            )
    except pw.IntegrityError:
        raise UserError("A user with this email already exists.") from None


def create_invite(email: str, by: User, can_custom_clients: bool, hours: int) -> str:
    """An invite link token (returned once; only its hash is stored)."""
    if User.by_email(email):
        raise UserError("A user with this email already exists.")
    token = secrets.token_urlsafe(32)
    Invite.create(
        token_hash=_digest(token),
        email=email.strip().lower(),
        created_by=by,
        can_custom_clients=can_custom_clients,
        expires_at=utcnow() + dt.timedelta(hours=hours),
    )
    return token


def find_invite(token: str) -> Invite | None:
    """The invite for ``token`` if it is unused and not expired."""
    invite = Invite.get_or_none(Invite.token_hash == _digest(token))
    if invite is None or invite.used_at is not None or invite.expires_at < utcnow():
        return None
    return invite


def accept_invite(invite: Invite, password: str) -> User:
    with database.atomic():
        claimed = (
            Invite.update(used_at=utcnow())
            .where(Invite.id == invite.id, Invite.used_at.is_null())
            .execute()
        )
        if not claimed:
            raise UserError("This invite link has already been used.")
        return create_user(invite.email, password, invite.can_custom_clients)


def set_password(user: User, password: str) -> None:
    """New password; every other session of this user ends."""
    user.password_hash = hash_password(password)
    user.session_version += 1
    user.save()


def end_sessions(user: User) -> None:
    """Sign-out: every session of this user ends, remember-me cookies included (the session
    version they carry no longer matches). Atomic, so two sign-outs at once both count."""
    User.update(session_version=User.session_version + 1).where(User.id == user.id).execute()


def set_enabled(user: User, enabled: bool) -> None:
    if user.is_admin and not enabled:
        raise UserError("The administrator cannot be disabled.")
    user.is_enabled = enabled
    user.session_version += 1
    user.save()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
