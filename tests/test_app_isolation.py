"""Two apps in one process keep their own settings, database and keys: the factory sets up each
app's state on that app, so a second ``create_app`` never reconfigures the first."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from mailboxes import graphsend
from mailboxes.mailbackend import AppBackend
from mailboxes.upkeep import Upkeep
from models import OAuthClient, User
from oauth import grants
from people import passwords
from store import appstate
from store.db import database, vault
from tests.helpers.app import make_app, stored_client


def what_it_sees() -> dict[str, object]:
    return {
        "token timeout": grants.settings().timeout,
        "hosts": grants.settings().hosts.patterns,
        "graph": graphsend.settings().url,
        "argon2 time cost": passwords.hasher().argon.time_cost,
        "database": database.obj,
        "keyring": vault.get(),
        "users": [u.email for u in User.select()],
    }


def test_a_second_app_does_not_reconfigure_the_first(tmp_path: Path) -> None:
    first = make_app(
        tmp_path / "one",
        TOKEN_HTTP_TIMEOUT=5,
        CUSTOM_CLIENT_HOSTS="*.one.example",
        GRAPH_URL="https://graph.one.example",
        ARGON2_TIME_COST=1,
    )
    with first.app_context():
        owner = User.create(email="one@example.org", password_hash=passwords.hash_password("x"))
        stored_client(owner, "first's client", "first-secret")
        seen_first = what_it_sees()

    second = make_app(
        tmp_path / "two",
        TOKEN_HTTP_TIMEOUT=9,
        CUSTOM_CLIENT_HOSTS="*.two.example",
        GRAPH_URL="https://graph.two.example",
        ARGON2_TIME_COST=2,
    )
    with second.app_context():
        seen_second = what_it_sees()

    assert seen_first["token timeout"] == 5.0 and seen_second["token timeout"] == 9.0
    assert seen_first["graph"] == "https://graph.one.example"
    assert seen_second["graph"] == "https://graph.two.example"
    assert (seen_first["argon2 time cost"], seen_second["argon2 time cost"]) == (1, 2)
    assert seen_first["database"] is not seen_second["database"]
    assert seen_first["keyring"] is not seen_second["keyring"]
    assert (seen_first["users"], seen_second["users"]) == (["one@example.org"], [])

    with first.app_context():  # after the second app: still the first's, secrets included
        assert what_it_sees() == seen_first
        assert OAuthClient.get().client_secret == "first-secret"
        assert passwords.verify_password(User.get().password_hash, "x")


def test_the_serving_threads_work_for_their_own_app(tmp_path: Path) -> None:
    first = make_app(tmp_path / "one", TOKEN_HTTP_TIMEOUT=5)
    backend, upkeep = AppBackend(first.config, first), Upkeep(app=first)
    make_app(tmp_path / "two", TOKEN_HTTP_TIMEOUT=9)

    def seen(app: Flask | None) -> tuple[float, object]:
        with appstate.bound(app):
            return grants.settings().timeout, database.obj

    assert backend.app is first and upkeep.app is first
    with first.app_context():
        expected = (5.0, database.obj)
    assert seen(backend.app) == expected
    backend.close()


def test_a_dropped_apps_database_stays_open_while_code_outside_any_app_uses_it(
    tmp_path: Path,
) -> None:
    """A fixture may make an app, use it, drop it and go on outside any app: the pool that code
    uses is not closed when the dropped app is collected (only a replaced one is)."""
    import gc
    import threading

    app = make_app(tmp_path / "dropped")
    with app.app_context():
        User.create(email="kept@example.org", password_hash="x")
    assert User.select().count() == 1  # outside any app: this thread's connection stays open
    del app
    collector = threading.Thread(target=gc.collect)  # collection runs in any thread
    collector.start()
    collector.join()
    assert [u.email for u in User.select()] == ["kept@example.org"]

    make_app(tmp_path / "next")  # a newer app: code outside any app now uses its database
    gc.collect()
    assert list(User.select()) == []
