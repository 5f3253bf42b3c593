"""Throttling of failed logins per address and per IP, for web and mail logins alike.

Failures are counted in the database so that several processes share them. After ``limit``
failures within the window, the key is blocked; each further failure doubles the pause.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import peewee as pw

from models import Throttle, utcnow

WINDOW = dt.timedelta(minutes=15)
MAX_BLOCK = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Policy:
    limit: int
    block_seconds: int


def retry_after(keys: list[str]) -> int:
    """Seconds until every key may try again; 0 when none is blocked."""
    return check(keys)[0]


def check(keys: list[str]) -> tuple[int, set[str]]:
    """Seconds until every key may try again (0: none blocked), and the keys with failures."""
    now = utcnow()
    rows = list(Throttle.select().where(Throttle.key.in_(keys)))
    waits = [
        int((row.blocked_until - now).total_seconds()) + 1
        for row in rows
        if row.blocked_until and row.blocked_until > now
    ]
    return max(waits, default=0), {row.key for row in rows}


def failure(key: str, policy: Policy) -> None:
    """Count a failure for ``key`` (one atomic upsert) and block it once it passes the limit."""
    now = utcnow()
    # A count starts over only after a quiet window that follows the end of the last block, so
    # the doubling pauses keep growing up to MAX_BLOCK instead of resetting after each one.
    stale = (Throttle.last_failure_at < now - WINDOW) & (
        Throttle.blocked_until.is_null() | (Throttle.blocked_until < now - WINDOW)
    )
    Throttle.insert(key=key, failures=1, last_failure_at=now).on_conflict(
        conflict_target=[Throttle.key],
        update={
            Throttle.failures: pw.Case(None, [(stale, 1)], Throttle.failures + 1),
            Throttle.last_failure_at: now,
        },
    ).execute()
    failures = Throttle.select(Throttle.failures).where(Throttle.key == key).scalar() or 0
    if failures >= policy.limit:
        pause = dt.timedelta(seconds=policy.block_seconds * 2 ** min(failures - policy.limit, 16))
        Throttle.update(blocked_until=now + min(pause, MAX_BLOCK)).where(
            Throttle.key == key
        ).execute()


def success(key: str) -> None:
    Throttle.delete().where(Throttle.key == key).execute()


def describe_wait(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} seconds"
    return f"{(seconds + 59) // 60} minutes"
