"""Prepared queries make their rows through a RowPlan after the first call: the models must be
the ones peewee makes (values, joined rows, nothing dirty, no extra query)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import peewee as pw
import pytest
from flask import Flask

from models import Account, AccountStatus, OAuthClient, User, utcnow
from store.db import Prepared, database
from store.rows import RowPlan
from tests.helpers.app import stored_client


def _state(row: Any) -> tuple[Any, ...]:
    rel = {k: (v.__data__ if v is not None else None) for k, v in row.__rel__.items()}
    return type(row), dict(row.__data__), rel, set(row._dirty)


@pytest.fixture
def rows(app: Flask) -> Iterator[dict[str, Any]]:
    with app.app_context(), database.connection_context():
        owner = User.create(email="owner@example.test", password_hash="x")
        client = stored_client(owner, "Team", "client-secret")
        linked = Account.create(
            owner=owner,
            address="b@example.test",
            provider="other",
            client=client,
            status=AccountStatus.ACTIVE.value,
            access_token="token",
            token_expires_at=utcnow() + dt.timedelta(hours=1),
        )
        Account.create(owner=owner, address="a@example.test", provider="other", client=None)
        yield {"owner": owner, "client": client, "linked": linked}


def test_joined_rows_are_what_peewee_makes(app: Flask, rows: dict[str, Any]) -> None:
    def build(owner_id: int) -> Any:
        return (
            Account.select(Account, OAuthClient)
            .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=Account.client == OAuthClient.id)
            .where(Account.owner == owner_id)
            .order_by(Account.address)
        )

    query = Prepared(build)
    with app.app_context(), database.connection_context():
        owner = rows["owner"].id
        first, second = query(owner), query(owner)  # peewee's rows, then the plan's
        assert isinstance(getattr(database.obj, query.attr)[2], RowPlan)
        assert (
            [_state(r) for r in second]
            == [_state(r) for r in first]
            == [_state(r) for r in build(owner)]
        )
        unlinked, linked = second
        assert unlinked.__rel__ == {"client": None} and unlinked.client is None
        assert linked.client.name == "Team" and linked.client.client_secret == "client-secret"
        assert linked.access_token == "token" and isinstance(linked.token_expires_at, dt.datetime)
        assert not linked.is_dirty() and not linked.client.is_dirty()
        linked.status = AccountStatus.ERROR.value  # a plan's row saves like any other
        linked.save()
        assert Account.get_by_id(linked.id).status == "error"


def test_single_model_rows_and_no_rows(app: Flask, rows: dict[str, Any]) -> None:
    query = Prepared(lambda email: User.select().where(User.email == email))
    with app.app_context(), database.connection_context():
        assert query("nobody@example.test") == []  # no row yet: no plan
        assert getattr(database.obj, query.attr)[2] is None
        first, second = query("owner@example.test"), query("owner@example.test")
        assert [_state(r) for r in second] == [_state(r) for r in first]
        assert second[0].email == "owner@example.test" and second[0].id == rows["owner"].id


def test_shapes_it_does_not_know_keep_peewees_path(app: Flask, rows: dict[str, Any]) -> None:
    dicts = Prepared(lambda owner: Account.select().where(Account.owner == owner).dicts())
    counted = Prepared(
        lambda owner: (
            Account.select(Account.owner, pw.fn.COUNT(Account.id).alias("n"))
            .where(Account.owner == owner)
            .group_by(Account.owner)
        )
    )
    with app.app_context(), database.connection_context():
        owner = rows["owner"].id
        assert dicts(owner) == dicts(owner) and dicts(owner)[0]["address"]
        assert getattr(database.obj, dicts.attr)[2] is False
        assert counted(owner)[0].n == counted(owner)[0].n == 2
        assert getattr(database.obj, counted.attr)[2] is False
