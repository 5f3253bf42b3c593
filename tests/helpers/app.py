"""The app under test on a fresh instance folder, the accounts the tests sign in with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask

from app import create_app
from models import User

ADMIN_EMAIL = "admin@example.org"
ADMIN_PASSWORD = "admin-password-1"
USER_PASSWORD = "user-password-1"

# Cheap argon2 parameters: the tests hash hundreds of passwords; production keeps the defaults.
FAST_HASHING = {"ARGON2_TIME_COST": 1, "ARGON2_MEMORY_KIB": 1024, "ARGON2_PARALLELISM": 1}


def make_app(instance: Path, **overrides: Any) -> Flask:
    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(instance),
        "PUBLIC_URL": "http://127.0.0.1:8080",
        # The peers (OAuth server, Dovecot) listen on loopback; production keeps this off.
        "CUSTOM_CLIENT_LOOPBACK": True,
        **FAST_HASHING,
        **overrides,
    }
    return create_app(config)


def stored_client(owner: User, name: str, secret: str) -> Any:
    """A minimal saved OAuth client holding ``secret`` (for tests of the encrypted storage)."""
    from models import OAuthClient

    client = OAuthClient(
        owner=owner,
        name=name,
        provider="other",
        token_url="https://t.example/token",
        scope="mail",
        client_id="cid",
        client_secret=secret,
    )
    client.save()
    return client
