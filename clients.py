"""Custom OAuth clients on Account settings (the editor arrives with its own issue)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from models import OAuthClient, User

bp = Blueprint("clients", __name__, url_prefix="/settings/clients")


def settings_context(user: User) -> dict[str, Any]:
    """What the Account settings page shows in its custom clients section."""
    return {
        "allowed": user.may_use_custom_clients,
        "items": list(OAuthClient.editable_by(user)),
    }
