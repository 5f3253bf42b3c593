"""Throttling of password guesses, for web and mail logins alike.

Each login attempt is counted *before* its password is verified (a reservation), so that parallel
guesses cannot all be checked before the first failure is written: at most ``limit`` attempts per
key are ever verified, whatever the concurrency. A correct password gives its reservation back.

Keys follow Dovecot's auth penalty: a guesser is paused per (IP, address) and per IP, so someone
elsewhere cannot lock a user out of their own mailbox by failing on purpose; a much higher ceiling
per address, from all IPs together, still stops a guesser who spreads over many addresses of
their own. Counts live in the database so that several processes share them; after ``limit``
failures within the window a key is blocked, and each further failure doubles the pause.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import peewee as pw

from models import Throttle, utcnow
from store.db import Prepared

WINDOW = dt.timedelta(minutes=15)
MAX_BLOCK = dt.timedelta(hours=1)
# Doublings past the limit before the pause stops growing (it is capped at MAX_BLOCK anyway).
MAX_DOUBLINGS = 16


@dataclass(frozen=True)
class Policy:
    limit: int
    block_seconds: int


@dataclass(frozen=True)
class Key:
    """One counter an attempt is charged to; ``forget_on_success`` resets it on a right password."""

    name: str
    policy: Policy
    forget_on_success: bool = False


def login_keys(kind: str, address: str, ip: str, config: Mapping[str, Any]) -> list[Key]:
    """The counters of one login attempt (``kind`` is "web" or "mail")."""
    block = int(config["LOGIN_BLOCK_SECONDS"])
    address = address.strip().lower()
    who = address if len(address) <= 254 else hashlib.sha256(address.encode()).hexdigest()
    return [
        Key(f"{kind}:ip-addr:{ip[:64]}|{who}", Policy(config["LOGIN_FAILURE_LIMIT"], block), True),
        Key(f"{kind}:ip:{ip[:64]}", Policy(config["LOGIN_FAILURE_LIMIT_PER_IP"], block)),
        Key(f"{kind}:addr:{who}", Policy(config["LOGIN_FAILURE_LIMIT_PER_ADDRESS"], block)),
    ]


def retry_after(keys: list[Key]) -> int:
    """Seconds until every key may try again; 0 when none is blocked (a read, nothing counted)."""
    now = utcnow()
    names = [k.name for k in keys]
    if len(names) == 3:  # a login's keys (login_keys): the query every login runs, built once
        rows = _three_keys(*names)
    else:
        rows = list(Throttle.select().where(Throttle.key.in_(names)))
    waits = [
        int((row.blocked_until - now).total_seconds()) + 1
        for row in rows
        if row.blocked_until and row.blocked_until > now
    ]
    return max(waits, default=0)


_three_keys = Prepared(lambda a, b, c: Throttle.select().where(Throttle.key.in_([a, b, c])))


def reserve(keys: list[Key]) -> int:
    """Count an attempt on every key before its password is verified.

    Returns 0 when the attempt may go on (verify, then ``succeeded`` or nothing), or the seconds to
    wait when a key is blocked; then nothing stays counted. Each key's reservation is one UPDATE
    whose condition and new block are computed by the database on the row itself, so concurrent
    attempts serialize there: the one that reaches the limit blocks all that come after it.
    """
    taken: list[Key] = []
    for key in keys:
        if not _reserve_one(key):
            release(taken)
            return max(retry_after(keys), 1)
        taken.append(key)
    return 0


def _reserve_one(key: Key) -> bool:
    now = utcnow()
    Throttle.insert(key=key.name, failures=0, last_failure_at=now).on_conflict_ignore().execute()
    # A count starts over only after a quiet window that follows the end of the last block, so
    # the doubling pauses keep growing up to MAX_BLOCK instead of resetting after each one.
    stale = (Throttle.last_failure_at < now - WINDOW) & (
        Throttle.blocked_until.is_null() | (Throttle.blocked_until < now - WINDOW)
    )
    count = pw.Case(None, [(stale, 1)], Throttle.failures + 1)
    limit = key.policy.limit
    pauses = [
        (limit + n, now + min(dt.timedelta(seconds=key.policy.block_seconds * 2**n), MAX_BLOCK))
        for n in range(MAX_DOUBLINGS + 1)
    ]
    longest = now + min(
        dt.timedelta(seconds=key.policy.block_seconds * 2**MAX_DOUBLINGS), MAX_BLOCK
    )
    blocked_until = pw.Case(
        None,
        [(count < limit, Throttle.blocked_until)] + [(count == n, at) for n, at in pauses],
        longest,
    )
    reserved = (
        Throttle.update(
            {
                Throttle.failures: count,
                Throttle.last_failure_at: now,
                Throttle.blocked_until: blocked_until,
            }
        )
        .where(
            (Throttle.key == key.name)
            & (Throttle.blocked_until.is_null() | (Throttle.blocked_until <= now))
        )
        .execute()
    )
    return bool(reserved)


def release(keys: list[Key]) -> None:
    """Give reservations back (the attempt was not a failure); a block they made goes too."""
    for key in keys:
        Throttle.update(
            {
                Throttle.failures: pw.Case(
                    None, [(Throttle.failures > 0, Throttle.failures - 1)], 0
                ),
                Throttle.blocked_until: pw.Case(
                    None,
                    [(Throttle.failures - 1 < key.policy.limit, None)],
                    Throttle.blocked_until,
                ),
            }
        ).where(Throttle.key == key.name).execute()


def succeeded(keys: list[Key]) -> None:
    """The password was right: forget the (IP, address) count, give the others back."""
    forget = [k.name for k in keys if k.forget_on_success]
    if forget:
        Throttle.delete().where(Throttle.key.in_(forget)).execute()
    release([k for k in keys if not k.forget_on_success])


def describe_wait(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} seconds"
    return f"{(seconds + 59) // 60} minutes"
