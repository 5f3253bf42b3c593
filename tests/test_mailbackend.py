"""The app's proxy backend turns every failure of the token path into a refusal with a reason."""

from __future__ import annotations

import datetime as dt

import pytest

from mailboxes.mailbackend import AppBackend
from mailproxy import ProxyAuthError
from models import Account, User, utcnow
from store.db import Ciphertext
from tests.helpers.app import stored_client


@pytest.fixture
def account(app):
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        client = stored_client(owner, "c", "client-secret-value")
        account = Account(
            owner=owner,
            address="box@example.test",
            provider="other",
            client=client,
            status="active",
            access_token="a-token",
            refresh_token="r-token",
            token_expires_at=utcnow() + dt.timedelta(hours=1),
        )
        account.save()
        return account


def test_a_disabled_account_gets_a_refusal_not_an_exception(app, account):
    Account.update(status="disabled").where(Account.id == account.id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        AppBackend(app.config).access_token(account.id)
    assert refused.value.kind == "disabled"


def test_an_unreadable_token_is_a_temporary_refusal(app, account, caplog):
    garbage = Ciphertext(b"\x01" + b"\x00" * 40)
    Account.update(access_token=garbage).where(Account.id == account.id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        AppBackend(app.config).access_token(account.id)
    assert refused.value.kind == "unavailable"
    assert "a-token" not in caplog.text and "r-token" not in caplog.text
