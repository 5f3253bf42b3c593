"""Ordered schema migrations, applied at start; the version lives in the ``meta`` table.

Each step is idempotent (create what is missing, add a column only if absent), so a step that
creates a table with today's model and a later step that adds a column to it cannot collide.
Append new steps; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migration

import models as m
from store.db import database


def _create(*tables: type[pw.Model]) -> None:
    database.create_tables(list(tables), safe=True)


def _v1_foundation() -> None:
    _create(m.Meta, m.Setting, m.User, m.Invite, m.AuditEvent, m.Throttle)


def _v2_oauth_clients() -> None:
    _create(m.OAuthClient)


def _v3_accounts() -> None:
    _create(m.Account, m.MailPassword, m.PendingAuthorization)


def _v4_password_lookup() -> None:
    """Mail passwords found by a keyed digest (constant work per failed login), and the instance
    secret that keys it. Existing passwords keep working and get their digest when next used."""
    _create(m.InstanceSecret)
    table = m.MailPassword._meta.table_name
    if "lookup" not in {c.name for c in database.get_columns(table)}:
        migrator = SchemaMigrator.from_database(database.obj)
        run_migration(migrator.add_column(table, "lookup", m.MailPassword.lookup))
    _create(m.MailPassword)  # its indexes, the new one included (create_tables is safe=True)


def _add_columns(model: type[pw.Model], *names: str) -> None:
    """Add the model's columns ``names`` where the table lacks them.

    Plain ``ADD COLUMN`` with a SQL default: peewee's migrator rebuilds a SQLite table to add a
    NOT NULL column, and dropping the old table would cascade to the rows that refer to it.
    """
    table = model._meta.table_name
    present = {column.name for column in database.get_columns(table)}
    types = database.obj.field_types
    for name in names:
        field = model._meta.fields[name]
        if field.column_name in present:
            continue
        kind = types.get(field.field_type, field.field_type)
        if getattr(field, "max_length", None):
            kind = f"{kind}({field.max_length})"
        ddl = f'"{field.column_name}" {kind}'
        if not field.null:
            default = field.default
            literal = str(int(default)) if isinstance(default, int) else f"'{default}'"
            ddl += f" NOT NULL DEFAULT {literal}"
        database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN {ddl}')


def _v5_renewal_state() -> None:
    """Granted scope, remembered refresh failures (back-off) and per-protocol refusals."""
    _add_columns(
        m.Account,
        "granted_scope",
        "refresh_failures",
        "refresh_failing_since",
        "next_refresh_at",
        "refresh_error_kind",
        "protocol_state",
    )


def _v6_client_certificates() -> None:
    """Certificate credentials (private_key_jwt) for custom clients."""
    _add_columns(m.OAuthClient, "credential", "private_key", "certificate")


def _v7_graph_delivery() -> None:
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


def _v8_per_user_pending_links() -> None:
    """An address unique per user while its link is pending, and instance-wide only once linked,
    so that each user's attempt at an address gets its own placeholder whoever has linked it.

    Only indexes change (no row is touched): the old instance-wide unique index on the address
    goes, the (owner, address) and the partial linked-address ones come. The rows of a v7
    database satisfy both, as their addresses were unique in the whole instance.
    """
    database.execute_sql('DROP INDEX IF EXISTS "account_address"')
    m.Account.create_table(safe=True)  # the table exists: only its missing indexes are made


def _v9_notifications() -> None:
    """Notifications: per-person choices, the outbox (with its once-a-day key), and the
    addresses each mail-client password was used from."""
    _create(m.NotificationSettings, m.Notification)
    _add_columns(m.MailPassword, "known_ips")


MIGRATIONS: list[Callable[[], None]] = [
    _v1_foundation,
    _v2_oauth_clients,
    _v3_accounts,
    _v4_password_lookup,
    _v5_renewal_state,
    _v6_client_certificates,
    _v7_graph_delivery,
    _v8_per_user_pending_links,
    _v9_notifications,
]
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
