"""Command-line tasks: ``flask --app app create-admin | rotate-key | backup``, and the import.

``import-emailproxy`` lives in ``emailproxy_import.py``.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from models import SECRET_MODELS, Meta
from people import addresses, audit, users
from store.db import check_keyring, database, reencrypt_all, vault
from store.vault import VAULT_KEY_FILE, lock_instance, write_private


def init_app(app: Flask) -> None:
    app.cli.add_command(create_admin)
    app.cli.add_command(rotate_key)
    app.cli.add_command(backup)
    from mailboxes import emailproxy_import

    app.cli.add_command(emailproxy_import.import_command)


@click.command("create-admin")
@with_appcontext
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def create_admin(email: str, password_stdin: bool) -> None:
    """Create the first administrator (the same as the setup page)."""
    try:
        email = addresses.normalize(email)
    except addresses.AddressError as error:
        raise click.ClickException(error.message) from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 10:
        raise click.ClickException("Use a password of at least 10 characters.")
    with database.connection_context():
        try:
            admin = users.create_admin(email, password)
        except users.UserError as error:
            raise click.ClickException(error.message) from None
        audit.record("user.setup_admin", actor=admin, ip="cli", target=admin.email)
    click.echo(f"Administrator {admin.email} created.")


@click.command("rotate-key")
@with_appcontext
def rotate_key() -> None:
    """Re-encrypt every stored secret under a new key, in one transaction."""
    instance = Path(current_app.instance_path)
    lock = lock_instance(instance)
    if lock is None:
        raise click.ClickException(
            "The service is running on this instance. Stop it first (e.g. `systemctl stop "
            "auth-email`; with PostgreSQL, every instance): a running process keeps the old key "
            "in memory and would write secrets no one could read after the rotation."
        )
    path = instance / VAULT_KEY_FILE
    old = vault.get()
    both = old.with_new_key()
    # The key file first holds old and new keys, so a crash at any point leaves data readable.
    write_private(path, both.dump())
    with database.connection_context():
        check_keyring(both, Meta, SECRET_MODELS)  # the new key's check value
        moved = reencrypt_all(SECRET_MODELS, both)
        current = both.only_current()
        vault.keyring = current
        write_private(path, current.dump())
        audit.record("vault.key_rotated", ip="cli", detail=f"{moved} values re-encrypted")
    click.echo(f"Re-encrypted {moved} secrets under key {both.current}.")


@click.command("backup")
@with_appcontext
@click.argument("destination", type=click.Path(dir_okay=False))
def backup(destination: str) -> None:
    """Consistent online copy of the database, safe while the service runs.

    The copy holds secrets only in encrypted form: back up instance/vault.key separately.
    """
    url = current_app.config["DATABASE_URL"]
    if not url.startswith("sqlite:///"):
        raise click.ClickException("For PostgreSQL use pg_dump (see the README).")
    target_path = Path(destination)
    # The copy holds password hashes and the audit log: it is private from its first byte. It is
    # written beside the destination and moved over it when complete, and no file SQLite makes
    # on the way (its journal) is readable by others either.
    partial = target_path.with_name(f".{target_path.name}.partial-{os.getpid()}")
    previous_umask = os.umask(0o077)
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        source = sqlite3.connect(url.removeprefix("sqlite:///"))
        target = sqlite3.connect(partial)
        try:
            with target:
                source.backup(target)
        finally:
            source.close()
            target.close()
        os.replace(partial, target_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.umask(previous_umask)
    click.echo(f"Backup written to {destination}.")
