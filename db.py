"""The database: one peewee proxy, opened from a URL, with encrypted fields and schema migrations.

The web app opens one connection per request; the mail proxy's worker threads use peewee's
per-thread connections through the same proxy.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import peewee as pw
from playhouse.db_url import connect

from vault import Keyring, aad_for

database = pw.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "synchronous": "normal",
}


class _VaultHolder:
    """The keyring in use; set by the app factory so models can decrypt outside a request."""

    keyring: Keyring | None = None

    def get(self) -> Keyring:
        if self.keyring is None:
            raise RuntimeError("the vault is not loaded; create the app first")
        return self.keyring


vault = _VaultHolder()


# Connections are pooled: a request or a proxy login "opens" one without paying for a new
# connection and its pragmas each time; a waiting caller gets one within ``timeout`` seconds.
POOL = {"max_connections": 64, "stale_timeout": 600, "timeout": 30}


def open_database(url: str) -> pw.Database:
    """A pooled peewee database for ``url`` (sqlite:///path or postgresql://...)."""
    scheme, _, rest = url.partition("://")
    if not scheme.endswith("+pool"):
        url = f"{scheme}+pool://{rest}"
    if scheme.startswith("sqlite"):
        return connect(url, pragmas=SQLITE_PRAGMAS, check_same_thread=False, **POOL)
    return connect(url, **POOL)


def use_database(db: pw.Database) -> None:
    """Point the models at ``db``, releasing the pool of the one used before (tests make many)."""
    previous = database.obj
    if previous is not None and previous is not db and hasattr(previous, "close_all"):
        previous.close_all()
    database.initialize(db)


class Ciphertext(bytes):
    """Bytes as stored; only these may reach the database through an EncryptedField."""


class EncryptedAccessor(pw.FieldAccessor):
    """Decrypts on read; a plaintext assignment is sealed when the row is saved."""

    def __get__(self, instance: Any, instance_type: Any = None) -> Any:
        if instance is None:
            return self.field
        value = instance.__data__.get(self.name)
        if isinstance(value, Ciphertext):
            return vault.get().open(value, self.field.aad(instance))
        return value


class EncryptedField(pw.BlobField):
    """A secret column: AES-GCM ciphertext bound to table, column and the row's ``uid``."""

    accessor_class = EncryptedAccessor

    def aad(self, instance: Any) -> bytes:
        return aad_for(self.model._meta.table_name, self.column_name, instance.uid)

    def db_value(self, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Ciphertext):
            raise TypeError("plaintext must never reach the database; assign and save() instead")
        return super().db_value(bytes(value))

    def python_value(self, value: Any) -> Any:
        return None if value is None else Ciphertext(bytes(value))


class Prepared:
    """A SELECT whose SQL is built once per database; later calls only bind their arguments,
    and the rows become models (joined ones included) through the built query's own cursor
    wrapper. peewee spends ~0.3 ms of Python building even a one-line query, several times
    what SQLite needs to run it.

    :param build: the query for the given arguments, which must be its only parameters, in
        order (otherwise it is built anew on every call).
    """

    def __init__(self, build: Callable[..., Any]):
        self.build = build
        self.attr = f"_prepared_{id(self)}"

    def __call__(self, *args: Any) -> list[Any]:
        db = database.obj
        built = getattr(db, self.attr, None)
        if built is None:
            query = self.build(*args)
            sql, params = query.sql()
            if len(params) != len(args):
                return list(query)
            built = (sql, query)
            setattr(db, self.attr, built)
        sql, query = built
        cursor = database.execute_sql(sql, args)
        return list(query._get_cursor_wrapper(cursor))


def new_uid() -> str:
    return secrets.token_hex(16)


class BaseModel(pw.Model):
    # peewee adds an ``id`` AutoField to models without another primary key; say so for mypy.
    id: int

    class Meta:
        database = database
        legacy_table_names = False


class SecretModel(BaseModel):
    """A model with encrypted columns; ``uid`` binds each ciphertext to its row."""

    uid = pw.CharField(max_length=32, unique=True, default=new_uid)

    @classmethod
    def encrypted_fields(cls) -> list[EncryptedField]:
        return [f for f in cls._meta.sorted_fields if isinstance(f, EncryptedField)]

    def seal_secrets(self) -> None:
        for f in self.encrypted_fields():
            value = self.__data__.get(f.name)
            if value is not None and not isinstance(value, Ciphertext):
                self.__data__[f.name] = Ciphertext(vault.get().seal(str(value), f.aad(self)))
                self._dirty.add(f.name)  # type: ignore[attr-defined]

    def save(self, *args: Any, **kwargs: Any) -> Any:
        self.seal_secrets()
        return super().save(*args, **kwargs)


def has_ciphertext(models: list[type[SecretModel]]) -> bool:
    """Whether any encrypted column holds a value (so its key must not be replaced)."""
    for model in models:
        if not model.table_exists():
            continue
        for f in model.encrypted_fields():
            if model.select().where(f.is_null(False)).exists():
                return True
    return False


def reencrypt_all(models: list[type[SecretModel]], new: Keyring) -> int:
    """Re-seal every secret under ``new.current`` in one transaction; returns the values moved."""
    old = vault.get()
    moved = 0
    with database.atomic():
        for model in models:
            fields = model.encrypted_fields()
            for row in model.select():
                updates: dict[Any, Any] = {}
                for f in fields:
                    blob = row.__data__.get(f.name)
                    if blob is None:
                        continue
                    plain = old.open(blob, f.aad(row))
                    updates[f] = Ciphertext(new.seal(plain, f.aad(row)))
                    moved += 1
                if updates:
                    model.update(updates).where(model._meta.primary_key == row.get_id()).execute()
    return moved
