"""The audit log: one function that records an event, callable with or without a request."""

from __future__ import annotations

from models import AuditEvent, User


def record(
    action: str, *, actor: User | None = None, ip: str = "", target: str = "", detail: str = ""
) -> None:
    """Record ``action`` (e.g. ``login.failed``); there is no field for a secret."""
    AuditEvent.create(
        actor=actor if actor is not None and actor.id else None,
        actor_email=actor.email if actor is not None else "",
        ip=ip or "",
        action=action,
        target=target[:255],
        detail=detail,
    )


def record_request(action: str, *, target: str = "", detail: str = "") -> None:
    """Record an event done through the web UI, by the signed-in user from the request's IP."""
    from flask import request
    from flask_login import current_user

    actor = current_user._get_current_object() if current_user.is_authenticated else None
    record(action, actor=actor, ip=request.remote_addr or "", target=target, detail=detail)
