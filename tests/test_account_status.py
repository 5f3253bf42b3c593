"""Account statuses: one enum, every change through Account.set_status."""

from __future__ import annotations

import pytest
from flask import Flask

from models import Account, AccountStatus, User


def test_every_status_has_words_for_people() -> None:
    for status in AccountStatus:
        assert status.label and status.explanation.endswith(".")
    assert [s for s in AccountStatus if s.works] == [AccountStatus.ACTIVE]
    assert {s for s in AccountStatus if s.needs_attention} == {"needs_reauth", "error"}


def test_set_status_writes_status_detail_and_more_in_one_update(app: Flask) -> None:
    with app.app_context():
        user = User.create(email="s@example.org", password_hash="x")
        account = Account.create(owner=user, address="s@example.com", provider="google")
        assert account.state is AccountStatus.PENDING
        changed = Account.set_status(
            Account.id == account.id, AccountStatus.NEEDS_REAUTH, "gone", last_error="gone"
        )
        fresh = Account.get_by_id(account.id)
        assert changed == 1
        assert (fresh.state, fresh.status_detail, fresh.last_error) == (
            "needs_reauth",
            "gone",
            "gone",
        )
        with pytest.raises(ValueError):
            Account.set_status(Account.id == account.id, "broken")
        assert Account.get_by_id(account.id).status == "needs_reauth"
