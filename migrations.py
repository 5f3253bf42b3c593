"""Ordered schema migrations, applied at start; the version lives in the ``meta`` table.

Each step is idempotent (create what is missing, add a column only if absent), so a step that
creates a table with today's model and a later step that adds a column to it cannot collide.
Append new steps; never edit one that has shipped.
"""

from __future__ import annotations

import copy
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
    """Add the model's fields ``names`` to its table where they are missing.

    Added as nullable columns, then filled with the default: making a column NOT NULL makes
    peewee rebuild a SQLite table, and dropping the old table would fire the foreign keys'
    ON DELETE actions (accounts would lose their client).
    """
    table = model._meta.table_name
    present = {c.name for c in database.get_columns(table)}
    migrator = SchemaMigrator.from_database(database.obj)
    for name in names:
        field = model._meta.fields[name]
        if field.column_name in present:
            continue
        nullable = copy.copy(field)
        nullable.null = True
        migrate_schema(migrator.add_column(table, field.column_name, nullable))
        if field.default is not None:
            model.update({field: field.default}).execute()


def _v4_graph_delivery() -> None:
    """SMTP through Microsoft Graph: delivery modes, the Graph token, the remembered refusal."""
    _add_columns(m.OAuthClient, "smtp_delivery")
    _add_columns(
        m.Account,
        "smtp_delivery",
        "graph_access_token",
        "graph_token_expires_at",
        "smtp_auth_refused_at",
        "smtp_auth_refused_detail",
    )


MIGRATIONS: list[Callable[[], None]] = [
    _v1_foundation,
    _v2_oauth_clients,
    _v3_accounts,
    _v4_graph_delivery,
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
