"""Shared fixtures: an app on a fresh instance folder, its clients, and signed-in users."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from models import User

# The real peers (OAuth server, Dovecot, Postfix, Chromium) and their fixtures.
pytest_plugins = ["tests.pgserver"]
if importlib.util.find_spec("tests.peerbed"):
    pytest_plugins.append("tests.peerbed")
    pytest_plugins.append("tests.providers.plugin")  # Entra/Exchange/Graph/Google simulators

ADMIN_EMAIL = "admin@example.org"
ADMIN_PASSWORD = "admin-password-1"
USER_PASSWORD = "user-password-1"

# Cheap argon2 parameters: the tests hash hundreds of passwords; production keeps the defaults.
FAST_HASHING = {"ARGON2_TIME_COST": 1, "ARGON2_MEMORY_KIB": 1024, "ARGON2_PARALLELISM": 1}


def make_app(instance: Path, **overrides: Any) -> Flask:
    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(instance),
        "PUBLIC_URL": "http://127.0.0.1:8080",
        # The peers (OAuth server, Dovecot) listen on loopback; production keeps this off.
        "CUSTOM_CLIENT_LOOPBACK": True,
        **FAST_HASHING,
        **overrides,
    }
    return create_app(config)


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    return tmp_path / "instance"


@pytest.fixture
def app(instance: Path) -> Iterator[Flask]:
    yield make_app(instance)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()


def csrf_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of the form on ``path`` (the tests submit forms as a browser would)."""
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'name="csrf_token" value="([^"]+)"', page
    )
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def post_form(
    client: FlaskClient,
    path: str,
    data: dict[str, Any],
    form_page: str | None = None,
    **kwargs: Any,
):
    """POST ``data`` to ``path`` with the CSRF token taken from ``form_page`` (default: path)."""
    token = csrf_token(client, form_page or path)
    return client.post(path, data={"csrf_token": token, **data}, **kwargs)


def stored_client(owner: User, name: str, secret: str) -> Any:
    """A minimal saved OAuth client holding ``secret`` (for tests of the encrypted storage)."""
    from models import OAuthClient

    client = OAuthClient(
        owner=owner,
        name=name,
        provider="other",
        token_url="https://t.example/token",
        scope="mail",
        client_id="cid",
        client_secret=secret,
    )
    client.save()
    return client


class AuthActions:
    def __init__(self, app: Flask, client: FlaskClient) -> None:
        self.app = app
        self.client = client

    def setup_admin(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> None:
        response = post_form(
            self.client, "/setup", {"email": email, "password": password, "confirm": password}
        )
        assert response.status_code == 302, response.get_data(as_text=True)

    def create_user(self, email: str, can_custom_clients: bool = False) -> User:
        from people import users

        with self.app.app_context():
            return users.create_user(email, USER_PASSWORD, can_custom_clients)

    def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD):
        return post_form(self.client, "/login", {"email": email, "password": password})

    def logout(self):
        return post_form(self.client, "/logout", {}, form_page="/settings/")


@pytest.fixture
def auth(app: Flask, client: FlaskClient) -> AuthActions:
    return AuthActions(app, client)


@pytest.fixture
def admin_client(auth: AuthActions) -> FlaskClient:
    """A client signed in as the administrator (setup done)."""
    auth.setup_admin()
    return auth.client


class LiveServer:
    """The app served over real HTTP on 127.0.0.1 (for Chromium and for HTTP clients)."""

    def __init__(self, app: Flask) -> None:
        import threading

        from waitress import create_server

        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=0, threads=8)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        app.config["PUBLIC_URL"] = self.url
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    """``app`` served over HTTP; PUBLIC_URL is set to the address it got."""
    server = LiveServer(app)
    yield server
    server.close()
