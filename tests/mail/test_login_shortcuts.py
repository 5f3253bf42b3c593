"""Work a warm mail login and a page view no longer repeat, and the cases where they still must.

A login's password check hands the proxy the token it read with the account, but only when
``get_access_token`` would have returned that very token; a page reads the instance settings
once, and a change made during or between requests is seen.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailboxes import mailbackend
from mailboxes.mailbackend import AppBackend
from models import Account, Setting, User, utcnow
from store.db import Ciphertext
from tests.helpers.app import make_app
from tests.helpers.mail import PASSWORD, MailClients, link_with_client_credentials


def _grant(flask_app: Flask, address: str) -> Any:
    running = mailbackend.running(flask_app)
    assert running is not None
    backend: AppBackend = running.backend
    return backend.authenticate("imap", address, PASSWORD, "127.0.0.1")


@pytest.mark.peers
def test_a_warm_login_carries_the_stored_token_only_when_it_needs_no_renewal(
    app: Flask,
    owner: User,
    peers: Any,
    mail: MailClients,
) -> None:
    account = link_with_client_credentials(owner, peers, "shortcut")
    mail.imap(account.address, PASSWORD).logout()  # a token stored, the password cached
    stored = Account.get_by_id(account.id).access_token

    grant = _grant(app, account.address)
    assert grant.token == stored
    assert stored not in repr(grant)

    # Inside the renewal margin, or while another refresh holds the claim: the proxy asks.
    hour_ago = utcnow() - dt.timedelta(hours=1)
    Account.update(
        last_refresh_at=hour_ago, token_expires_at=utcnow() + dt.timedelta(seconds=10)
    ).where(Account.id == account.id).execute()
    assert _grant(app, account.address).token == ""
    Account.update(
        token_expires_at=utcnow() + dt.timedelta(hours=1),
        refresh_claimed_until=utcnow() + dt.timedelta(seconds=30),
    ).where(Account.id == account.id).execute()
    assert _grant(app, account.address).token == ""

    # A token that cannot be read: the proxy asks, and access_token refuses it in its words.
    good = Account.get_by_id(account.id).stored("access_token")
    Account.update(
        access_token=Ciphertext(b"\x01" + b"\x00" * 40), refresh_claimed_until=None
    ).where(Account.id == account.id).execute()
    assert _grant(app, account.address).token == ""
    Account.update(access_token=good).where(Account.id == account.id).execute()

    # A token the proxy asks for instead still logs in.
    Account.update(token_expires_at=utcnow() + dt.timedelta(seconds=10)).where(
        Account.id == account.id
    ).execute()
    Account.update(refresh_claimed_until=None).where(Account.id == account.id).execute()
    mail.imap(account.address, PASSWORD).logout()
    assert Account.get_by_id(account.id).access_token != stored  # renewed on the way


def test_settings_are_read_once_per_request_and_afresh_in_the_next(instance: Path) -> None:
    plain = make_app(instance)
    with plain.app_context():
        Setting.write("probe", "before")
        Setting.write("other", "kept")

    with plain.test_request_context("/"):
        assert Setting.read("probe") == "before"
        Setting.write("probe", "written in the request")
        assert Setting.read("probe") == "written in the request"
        Setting.delete().where(Setting.key == "probe").execute()
        assert Setting.read("probe") is None
        assert Setting.read("other") == "kept"
        Setting.update(value="changed").where(Setting.key == "other").execute()
        assert Setting.read("other") == "kept"  # the request's copy: read once

    with plain.app_context():  # changed outside any request (another process, say)
        Setting.write("probe", "between")
        assert Setting.read("probe") == "between"
    with plain.test_request_context("/"):
        assert (Setting.read("probe"), Setting.read("other")) == ("between", "changed")
