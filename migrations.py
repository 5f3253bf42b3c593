"""Ordered schema migrations, applied at start; the version lives in the ``meta`` table.

Each step is idempotent (create what is missing, add a column only if absent), so a step that
creates a table with today's model and a later step that adds a column to it cannot collide.
Append new steps; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw

import models as m
from db import database


def _create(*tables: type[pw.Model]) -> None:
    database.create_tables(list(tables), safe=True)


def _v1_foundation() -> None:
    _create(m.Meta, m.Setting, m.User, m.Invite, m.AuditEvent, m.Throttle)


def _v2_oauth_clients() -> None:
    _create(m.OAuthClient)


def _v3_accounts() -> None:
    _create(m.Account, m.MailPassword, m.PendingAuthorization)


MIGRATIONS: list[Callable[[], None]] = [_v1_foundation, _v2_oauth_clients, _v3_accounts]
LATEST = len(MIGRATIONS)
MIGRATION_LOCK = 0x417574684D61696C  # any constant shared by every instance ("AuthMail")


def current_version() -> int:
    if not m.Meta.table_exists():
        return 0
    row = m.Meta.get_or_none(m.Meta.key == "schema_version")
    return int(row.value) if row else 0


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer Auth-Email; this code must not touch it."""


def migrate(target: int = LATEST) -> list[int]:
    """Bring the schema up to ``target``; returns the versions applied.

    One transaction; on PostgreSQL under an advisory lock, so instances that start at once on
    an empty database do not create the same tables concurrently (one waits, then sees them).
    """
    applied = []
    with database.atomic():
        if isinstance(database.obj, pw.PostgresqlDatabase):
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        version = current_version()
        if version > LATEST:
            raise SchemaTooNew(
                f"The database's schema is version {version}, newer than this Auth-Email knows "
                f"(version {LATEST}): run the newer Auth-Email that upgraded it, or restore a "
                "backup made with this one."
            )
        for number in range(version + 1, target + 1):
            MIGRATIONS[number - 1]()
            m.Meta.insert(key="schema_version", value=str(number)).on_conflict(
                conflict_target=[m.Meta.key], update={m.Meta.value: str(number)}
            ).execute()
            applied.append(number)
    return applied
