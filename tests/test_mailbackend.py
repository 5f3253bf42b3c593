"""The app's proxy backend turns every failure of the token path into a refusal with a reason."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from mailboxes.mailbackend import LAST_USE_EVERY, AppBackend, _account_relayed, _account_used
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


def test_a_failing_bookkeeping_write_loses_only_itself(app, account, caplog):
    """Writes queued together share one transaction; when one fails, the others are still
    written (each again on its own)."""
    backend = AppBackend(app.config, app)
    busy = threading.Event()
    backend._bookkeeping.submit(busy.wait, 10)  # the writes below queue up behind it

    def fails() -> None:
        Account.update(last_used_ip="half-written").where(Account.id == account.id).execute()
        raise RuntimeError("boom")

    try:
        backend.later(_account_used, account.id, "192.0.2.1", utcnow())
        backend.later(fails)
        backend.later(_account_relayed, account.id, 300)
        busy.set()
        backend.flush()
    finally:
        backend.close()
    with app.app_context():
        row = Account.get_by_id(account.id)
    assert (row.last_used_ip, row.bytes_relayed) == ("192.0.2.1", 300)
    assert "bookkeeping write failed" in caplog.text


def test_an_accounts_last_use_is_written_when_its_ip_changes_or_a_minute_passed(app, account):
    backend = AppBackend(app.config, app)

    def last_use() -> tuple[str, object]:
        backend.flush()
        with app.app_context():
            row = Account.get_by_id(account.id)
        return row.last_used_ip, row.last_used_at

    try:
        backend.session_opened(account.id, "imap", "192.0.2.1")
        ip, first = last_use()
        assert ip == "192.0.2.1" and first is not None
        backend.session_opened(account.id, "imap", "192.0.2.1")  # a device polling again
        assert last_use() == ("192.0.2.1", first)
        backend.session_opened(account.id, "pop3", "192.0.2.2")  # another place: at once
        ip, second = last_use()
        assert ip == "192.0.2.2" and second > first
        ip, at = backend._last_seen[account.id]
        backend._last_seen[account.id] = (ip, at - LAST_USE_EVERY)  # a minute later
        backend.session_opened(account.id, "imap", "192.0.2.2")
        assert last_use()[1] > second
    finally:
        backend.close()


def test_bookkeeping_writes_queued_together_share_one_transaction(app, account):
    """A login's writes (audit row, last use) come milliseconds apart: one commit for them."""
    from store.db import database

    backend = AppBackend(app.config, app)
    seen: list[int] = []

    def note() -> None:
        seen.append(id(database.top_transaction()))

    try:
        backend.later(note)
        backend.later(_account_used, account.id, "192.0.2.1", utcnow())
        backend.later(note)  # the second write after the first has been handed over
        backend.flush()
    finally:
        backend.close()
    assert len(seen) == 2 and seen[0] == seen[1]
