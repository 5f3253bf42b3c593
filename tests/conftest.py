"""Shared fixtures: an app on a fresh instance folder, its clients, and signed-in users."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from models import User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD, make_app
from tests.helpers.linking import PUBLIC, PeerInfo
from tests.helpers.tokens import Scripted
from tests.helpers.web import AuthActions, LiveServer

# The real peers (OAuth server, Dovecot, Postfix, Chromium) and their fixtures.
pytest_plugins = ["tests.pgserver"]
if importlib.util.find_spec("tests.peerbed"):
    pytest_plugins.append("tests.peerbed")
    pytest_plugins.append("tests.providers.plugin")  # Entra/Exchange/Graph/Google simulators


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


@pytest.fixture
def auth(app: Flask, client: FlaskClient) -> AuthActions:
    return AuthActions(app, client)


@pytest.fixture
def admin_client(auth: AuthActions) -> FlaskClient:
    """A client signed in as the administrator (setup done)."""
    auth.setup_admin()
    return auth.client


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    """``app`` served over HTTP; PUBLIC_URL is set to the address it got."""
    server = LiveServer(app)
    yield server
    server.close()


@pytest.fixture
def peer(peers: Any) -> PeerInfo:
    return PeerInfo(peers)


@pytest.fixture
def peer_app(instance: Path, peer: PeerInfo) -> Flask:
    """An app that trusts the peers' throwaway CA (as an admin would configure it)."""
    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


@pytest.fixture
def alice(app: Flask, auth: AuthActions) -> User:
    auth.setup_admin()
    user = auth.create_user("alice@example.org", can_custom_clients=True)
    auth.logout()
    auth.login("alice@example.org", USER_PASSWORD)
    return user


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    """Local token endpoints that answer as scripted (the failures the peers lack)."""
    started: list[Scripted] = []

    def start(*answers: tuple[Any, ...], tls: tuple[str, str] | None = None) -> Scripted:
        started.append(Scripted(*answers, tls=tls))
        return started[-1]

    yield start
    for server in started:
        server.close()
