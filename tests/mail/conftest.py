"""Fixtures of the mail tests: the app set up for the peers with every listener on a free port,
its administrator signed in to the web UI, and the proxy running with stdlib clients at it.

A test module may replace ``app`` (``test_mail_backend_guards.py`` lowers the per-IP limit); the
other fixtures here are then built on its app.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes.mailbackend import MailProxyService
from models import User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.mail import EVERY_LISTENER_ON_A_FREE_PORT, PUBLIC, MailClients
from tests.helpers.web import AuthActions


@pytest.fixture
def app(instance: Path, peers: Any) -> Flask:
    """The app as an admin would configure it for the peers (their CA), proxy on free ports."""
    app = make_app(
        instance,
        PUBLIC_URL=PUBLIC,
        UPSTREAM_CA_FILE=peers.ca_file,
        LOGIN_FAILURE_LIMIT=3,
        LOGIN_BLOCK_SECONDS=6,  # long enough to see the block on a loaded 2-core machine
        LOGIN_FAILURE_LIMIT_PER_IP=1000,
        **EVERY_LISTENER_ON_A_FREE_PORT,
    )
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


@pytest.fixture
def owner(app: Flask) -> User:
    return User.get(User.email == ADMIN_EMAIL)


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    """The owner signed in to the web UI."""
    client = app.test_client()
    AuthActions(app, client).login()
    return client


@pytest.fixture
def service(app: Flask) -> Iterator[MailProxyService]:
    proxy = MailProxyService(app)
    proxy.start()
    yield proxy
    proxy.stop()
    assert proxy.controller.errors == 0, "an unexpected exception reached the proxy"


@pytest.fixture
def mail(app: Flask, service: MailProxyService) -> MailClients:
    return MailClients(app, service)
