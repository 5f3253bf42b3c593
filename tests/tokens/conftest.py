"""Fixtures of the token tests: an owner on SQLite and again on PostgreSQL, a fast-retrying app,
a token endpoint that answers 503."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from models import User
from tests.helpers.app import make_app
from tests.helpers.linking import PUBLIC, PeerInfo
from tests.helpers.tokens import FlakyTokenEndpoint


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def owner(request: pytest.FixtureRequest, instance: Path, peer: PeerInfo) -> User:
    """A user of an app on SQLite, and again on PostgreSQL (instances sharing a database)."""
    from people import users

    database = {}
    if request.param == "postgres":
        database["DATABASE_URL"] = request.getfixturevalue("pg_url")
    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC, **database)
    with app.app_context():
        users.create_admin("admin@example.org", "admin-password-1")
        return users.create_user("owner@example.org", "owner-password-1", True)


@pytest.fixture
def fast_app(instance: Path) -> Flask:
    # A generous timeout: on a loaded machine a 400 must not turn into a retried timeout.
    return make_app(instance, TOKEN_HTTP_TIMEOUT=10, TOKEN_BACKOFF=0.01, TOKEN_ATTEMPTS=3)


@pytest.fixture
def endpoint_503() -> Iterator[FlakyTokenEndpoint]:
    server = FlakyTokenEndpoint()
    yield server
    server.close()
