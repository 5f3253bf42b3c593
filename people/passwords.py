"""Password hashing (argon2id) for web logins and mail-client passwords alike."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

# A hash of a random password, verified when the user does not exist, so that a wrong address
# takes as long as a wrong password.
_DUMMY: str | None = None


def configure(config: Mapping[str, Any]) -> None:
    global _hasher, _DUMMY
    _hasher = PasswordHasher(
        time_cost=int(config["ARGON2_TIME_COST"]),
        memory_cost=int(config["ARGON2_MEMORY_KIB"]),
        parallelism=int(config["ARGON2_PARALLELISM"]),
    )
    _DUMMY = None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    global _DUMMY
    if stored_hash is None:
        if _DUMMY is None:
            _DUMMY = _hasher.hash(secrets.token_urlsafe(16))
        stored_hash, password = _DUMMY, password + "\x00never"
    try:
        return _hasher.verify(stored_hash, password)
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
