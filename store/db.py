"""The database: one peewee proxy, opened from a URL, with encrypted fields and schema migrations.

The proxy stands for the current app's database and the vault for its keyring (each app keeps
its own, see ``store.appstate``). The web app opens one connection per request; the mail proxy's
worker threads use peewee's per-thread connections through the same proxy.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable
from typing import Any

import peewee as pw
from flask import Flask
from playhouse.db_url import connect

from store import appstate
from store.vault import KeyFileError, Keyring, VaultError, aad_for

_DATABASE: appstate.Slot[pw.Database] = appstate.Slot("database")
_KEYRING: appstate.Slot[Keyring] = appstate.Slot("keyring")


class _AppDatabase(pw.DatabaseProxy):
    """The models' database: the current app's (outside any app, the one opened last)."""

    __slots__ = ()

    @property  # type: ignore[override]
    def obj(self) -> Any:
        return _DATABASE.get_or_none()

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr == "obj":  # initialize(): a database for code outside any app
            _DATABASE.set(None, value)
        else:
            object.__setattr__(self, attr, value)


database = _AppDatabase()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "synchronous": "normal",
    # Pages read through a memory map instead of a read() and a copy each: every write by
    # another connection (the proxy's bookkeeping) empties this one's page cache, so a login's
    # queries re-read their pages; mapped, that costs ~15 % less CPU (bench/README.md).
    "mmap_size": 256 * 1024 * 1024,
}


class _VaultHolder:
    """The current app's keyring; set by the app factory (``use_keyring``), so models can
    decrypt in the app's requests, commands and service threads."""

    @property
    def keyring(self) -> Keyring | None:
        return _KEYRING.get_or_none()

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        _KEYRING.set(appstate.current(), keyring)

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
        # Transactions take the write lock when they begin (BEGIN IMMEDIATE): one that read first
        # and then writes cannot wait for the lock (SQLite fails it at once, "database is
        # locked", whatever busy_timeout says) while another thread's transaction writes.
        return connect(
            url, pragmas=SQLITE_PRAGMAS, check_same_thread=False, lock_type="IMMEDIATE", **POOL
        )
    return connect(url, **POOL)


def use_database(db: pw.Database, app: Flask | None = None) -> None:
    """Point ``app``'s models at ``db`` (its pool is released with the app). Without an app:
    the database of code outside any app, releasing the pool of the one used before."""
    if app is not None:
        _DATABASE.set(app, db)
        if hasattr(db, "close_all"):
            weakref.finalize(app, _release, db)
        return
    previous = _DATABASE.get_or_none()
    if previous is not None and previous is not db and hasattr(previous, "close_all"):
        previous.close_all()
    database.initialize(db)


def _release(db: Any) -> None:
    """An app's pool goes with the app, unless code outside any app still uses it (a test's
    fixture may make an app, drop it, and go on with its database)."""
    if not _DATABASE.is_fallback(db):
        db.close_all()


def close_database(app: Flask) -> None:
    """Close ``app``'s pooled connections now (the serving process's last step). SQLite copies
    its write-ahead log into the database file when the last connection closes; leaving that to
    the interpreter's exit left a fresh instance's rows only in the -wal file once uvloop was
    loaded (whoever copies just auth-email.db would lose them)."""
    db = _DATABASE.of(app)
    if db is not None and hasattr(db, "close_all"):
        db.close_all()


def use_keyring(keyring: Keyring, app: Flask) -> None:
    """Give ``app`` its vault keyring."""
    _KEYRING.set(app, keyring)


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
        # the binary type of the database in use (an app's may be SQLite, the next PostgreSQL);
        # BlobField's own is fixed when a proxy is initialized, which per-app databases are not
        return database.get_binary_type()(bytes(value))

    def python_value(self, value: Any) -> Any:
        return None if value is None else Ciphertext(bytes(value))


# Row ids are signed 64-bit integers in every database we run on; a longer number in a URL or
# form is no row at all, and SQLite would raise OverflowError on it.
MAX_ID = 2**63 - 1


def parse_id(value: object) -> int | None:
    """A row id from a URL or form value (ASCII digits, 1 to MAX_ID), or None."""
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 19:
        return None
    number = int(value)
    return number if 0 < number <= MAX_ID else None


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
    id: Any  # an int on a row, a field on the class (``Model.id.desc()``)

    class Meta:
        database = database
        legacy_table_names = False


class SecretModel(BaseModel):
    """A model with encrypted columns; ``uid`` binds each ciphertext to its row."""

    uid = pw.CharField(max_length=32, unique=True, default=new_uid)

    @classmethod
    def encrypted_fields(cls) -> list[EncryptedField]:
        return [f for f in cls._meta.sorted_fields if isinstance(f, EncryptedField)]

    def stored(self, name: str) -> Ciphertext | None:
        """A secret column's value as stored (never decrypted; None when empty or unsaved)."""
        value = self.__data__.get(name)
        return value if isinstance(value, Ciphertext) else None

    def has_secret(self, name: str) -> bool:
        """Whether a secret column holds a value, without decrypting it."""
        return self.__data__.get(name) is not None

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


def key_ids_in_use(models: list[type[SecretModel]]) -> set[str]:
    """The ids of the keys that sealed the stored secrets."""
    found: set[str] = set()
    for model in models:
        if not model.table_exists():
            continue
        for f in model.encrypted_fields():
            rows: Any = model.select(f).where(f.is_null(False)).tuples()
            for (blob,) in rows:
                found.add(Keyring.key_id_of(bytes(blob)))
    return found


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


# A known value sealed under each key id when the key is first used: at start, a vault.key whose
# key has the right id but the wrong bytes (a copy from another instance, a bad restore) is
# refused at once, instead of every mail login failing later.
KEY_CHECK_VALUE = "auth-email vault key check"


def _check_aad(key_id: str) -> bytes:
    return aad_for("meta", "vault_check", key_id)


def check_keyring(keyring: Keyring, meta: Any, models: list[type[SecretModel]]) -> None:
    """Verify every key of ``keyring`` against its check value in ``meta``; raise KeyFileError.

    A key without a check value yet (a new key, or an instance from before checks existed) gets
    one, but only after it has decrypted a value already stored under its id, if there is one.
    """
    for key_id, key in keyring.keys.items():
        single = Keyring(keys={key_id: key}, current=key_id)
        name = f"vault_check:{key_id}"
        row = meta.get_or_none(meta.key == name)
        if row is not None:
            try:
                ok = single.open(bytes.fromhex(row.value), _check_aad(key_id)) == KEY_CHECK_VALUE
            except (VaultError, ValueError):
                ok = False
            if not ok:
                raise KeyFileError(_wrong_key(key_id))
            continue
        sample = _sample_ciphertext(models, key_id)
        if sample is not None:
            blob, aad = sample
            try:
                single.open(blob, aad)
            except VaultError:
                raise KeyFileError(_wrong_key(key_id)) from None
        sealed = single.seal(KEY_CHECK_VALUE, _check_aad(key_id)).hex()
        meta.insert(key=name, value=sealed).on_conflict_ignore().execute()


def _wrong_key(key_id: str) -> str:
    return (
        f"The vault key {key_id} in vault.key does not decrypt this database's secrets: the key "
        "file belongs to another instance or copy. Put back the vault.key that was kept with "
        "this database (from your backup of the instance folder) and start again."
    )


def _sample_ciphertext(models: list[type[SecretModel]], key_id: str) -> tuple[bytes, bytes] | None:
    """One stored value made with ``key_id`` and its associated data, if any."""
    for model in models:
        if not model.table_exists():
            continue
        fields = model.encrypted_fields()
        for row in model.select():
            for f in fields:
                blob = row.__data__.get(f.name)
                if blob is not None and Keyring.key_id_of(blob) == key_id:
                    return bytes(blob), f.aad(row)
    return None
