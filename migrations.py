"""Ordered schema migrations, applied at start; the version lives in the ``meta`` table.

Each step is idempotent (create what is missing, add a column only if absent), so a step that
creates a table with today's model and a later step that adds a column to it cannot collide.
Append new steps; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_schema

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


def _add_columns(model: type[pw.Model], *names: str) -> None:
    """Add the model's columns ``names`` where the table lacks them."""
    table = model._meta.table_name
    present = {column.name for column in database.get_columns(table)}
    migrator = SchemaMigrator.from_database(database)
    operations = [
        migrator.add_column(table, model._meta.fields[name].column_name, model._meta.fields[name])
        for name in names
        if model._meta.fields[name].column_name not in present
    ]
    if operations:
        migrate_schema(*operations)


def _v4_client_certificates() -> None:
    _add_columns(m.OAuthClient, "credential", "private_key", "certificate")


MIGRATIONS: list[Callable[[], None]] = [
    _v1_foundation,
    _v2_oauth_clients,
    _v3_accounts,
    _v4_client_certificates,
]
LATEST = len(MIGRATIONS)


def current_version() -> int:
    if not m.Meta.table_exists():
        return 0
    row = m.Meta.get_or_none(m.Meta.key == "schema_version")
    return int(row.value) if row else 0


def migrate(target: int = LATEST) -> list[int]:
    """Bring the schema up to ``target``; returns the versions applied."""
    applied = []
    version = current_version()
    for number in range(version + 1, target + 1):
        with database.atomic():
            MIGRATIONS[number - 1]()
            m.Meta.insert(key="schema_version", value=str(number)).on_conflict(
                conflict_target=[m.Meta.key], update={m.Meta.value: str(number)}
            ).execute()
        applied.append(number)
    return applied
