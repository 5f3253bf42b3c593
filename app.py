"""Auth-Email: the application factory.

``create_app()`` loads configuration and instance secrets, opens the database and registers the
screens. It starts no thread and opens no socket: ``serve.py`` runs the web UI and the mail proxy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

import config
from mailboxes import graphsend
from migrations import migrate
from models import SECRET_MODELS, Meta
from oauth import grants, providers
from people import passwords
from store.db import (
    check_keyring,
    database,
    has_ciphertext,
    key_ids_in_use,
    open_database,
    use_database,
    use_keyring,
)
from store.vault import (
    SECRET_KEY_FILE,
    VAULT_KEY_FILE,
    KeyFileError,
    load_keyring,
    load_or_create_secret_key,
)

log = logging.getLogger("auth_email")


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app. ``test_config`` overrides every other layer (and may set INSTANCE_PATH)."""
    test_config = dict(test_config or {})
    instance_path = test_config.pop("INSTANCE_PATH", None) or config.instance_path_from_environ()
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    app.config.from_mapping(config.DEFAULTS)
    app.config.from_pyfile("config.py", silent=True)
    app.config.update(config.from_environ(os.environ))
    app.config.update(test_config)
    app.config.update(config.typed(app.config))

    instance = Path(app.instance_path)
    instance.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not app.config["DATABASE_URL"]:
        app.config["DATABASE_URL"] = f"sqlite:///{instance / 'auth-email.db'}"
    app.config["PUBLIC_URL"] = app.config["PUBLIC_URL"].rstrip("/")

    app.config["SECRET_KEY"] = load_or_create_secret_key(instance / SECRET_KEY_FILE)
    secure = urlsplit(app.config["PUBLIC_URL"]).scheme == "https"
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_NAME="auth_email_session",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=secure,
        WTF_CSRF_TIME_LIMIT=None,
        # Pages send no Referer (Referrer-Policy: no-referrer, as OAuth codes travel in URLs),
        # so Flask-WTF's HTTPS referrer check would refuse every form; the token still applies.
        WTF_CSRF_SSL_STRICT=False,
        # Checked before a body is read: a larger request is a 413, never held in memory.
        MAX_CONTENT_LENGTH=app.config["MAX_REQUEST_BYTES"],
        MAX_FORM_MEMORY_SIZE=app.config["MAX_FORM_FIELD_BYTES"],
        MAX_FORM_PARTS=100,
    )
    _quiet_sql_log(app.config["LOG_SQL"])
    passwords.init_app(app)
    providers.init_app(app)  # before grants: the hosts it always allows follow it
    grants.init_app(app)
    graphsend.init_app(app)
    init_database(app)

    from web import fields, security

    security.init_app(app)
    fields.init_app(app)

    from web import (
        accounts,
        admin,
        auth,
        cli,
        clients,
        health,
        mailsetup,
        notifications,
        ops,
        settings,
    )
    from web import delivery as delivery_pages

    auth.init_app(app)
    app.register_blueprint(accounts.bp)
    app.register_blueprint(delivery_pages.bp)
    app.register_blueprint(settings.bp)
    app.register_blueprint(clients.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(mailsetup.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(notifications.bp)
    cli.init_app(app)
    return app


def _quiet_sql_log(wanted: bool) -> None:
    """peewee logs every query with its parameters (password hashes, ciphertext) at DEBUG: keep its
    logger at INFO, even under LOG_LEVEL=DEBUG, unless LOG_SQL asks for the queries."""
    logging.getLogger("peewee").setLevel(logging.NOTSET if wanted else logging.INFO)


def init_database(app: Flask) -> None:
    """Open the database, bring its schema up to date and load the vault key."""
    use_database(open_database(app.config["DATABASE_URL"]), app)
    with app.app_context(), database.connection_context():
        migrate()
        _private_sqlite_files(app.config["DATABASE_URL"])
        key_file = Path(app.instance_path) / VAULT_KEY_FILE
        keyring = load_keyring(key_file, has_ciphertext(SECRET_MODELS))
        missing = key_ids_in_use(SECRET_MODELS) - keyring.keys.keys()
        if missing:
            # e.g. the key was rotated on another instance sharing this database
            raise KeyFileError(
                f"The database holds secrets sealed with key {', '.join(sorted(missing))}, "
                f"which {key_file} does not have. If the key was rotated on another instance "
                "sharing this database, copy its vault.key here and start again."
            )
        check_keyring(keyring, Meta, SECRET_MODELS)
        use_keyring(keyring, app)

    @app.before_request
    def _connect() -> None:
        database.connect(reuse_if_open=True)

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        if not database.is_closed():
            database.close()


def _private_sqlite_files(url: str) -> None:
    """The database file holds only ciphertext secrets, but still: not for other users."""
    if url.startswith("sqlite:///"):
        base = Path(url.removeprefix("sqlite:///"))
        for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
            if path.exists():
                path.chmod(0o600)
