"""Password hashing (argon2id) for web logins and mail-client passwords alike."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask

from store import appstate


class Hasher:
    """One app's argon2id cost (ARGON2_*), and the hash verified for an unknown user."""

    def __init__(self, argon: PasswordHasher | None = None) -> None:
        self.argon = argon or PasswordHasher()
        self._dummy: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Hasher:
        return cls(
            PasswordHasher(
                time_cost=int(config["ARGON2_TIME_COST"]),
                memory_cost=int(config["ARGON2_MEMORY_KIB"]),
                parallelism=int(config["ARGON2_PARALLELISM"]),
            )
        )

    @property
    def dummy(self) -> str:
        """A hash of a random password, verified when the user does not exist, so that a wrong
        address takes as long as a wrong password."""
        if self._dummy is None:
            self._dummy = self.argon.hash(secrets.token_urlsafe(16))
        return self._dummy


_HASHER: appstate.Slot[Hasher] = appstate.Slot("passwords", default=Hasher)


def init_app(app: Flask) -> None:
    _HASHER.set(app, Hasher.from_config(app.config))


def hasher() -> Hasher:
    """The current app's hasher."""
    return _HASHER.get()


def hash_password(password: str) -> str:
    return hasher().argon.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    current = hasher()
    if stored_hash is None:
        stored_hash, password = current.dummy, password + "\x00never"
    try:
        return current.argon.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def lookup_tag(key: str, address: str, password: str) -> str:
    """A keyed digest that finds a mail password's row without hashing against each one.

    Keyed with an instance secret kept under the vault key: without that key the column tells
    nothing, and with it a guess still has to match one address's row.
    """
    message = f"{address.strip().lower()}\x00{password}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def generate_password() -> str:
    """A password for a mail client: long, and easy to type from a phone screen."""
    alphabet = "abcdefghijkmnopqrstuvwxyz23456789"
    groups = ["".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5)]
    return "-".join(groups)
