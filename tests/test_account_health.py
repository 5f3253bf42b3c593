"""The accounts pages tell the truth: a token that cannot be renewed is not "Active", and a
protocol the mail server refuses is named, with its cause and fix."""

from __future__ import annotations

import datetime as dt
import re

from flask.testing import FlaskClient

from mailboxes import refusals as mailrefusals
from models import Account, User, utcnow
from tests.helpers.accounts import make_account, make_client


def row(page: str, account: Account) -> str:
    found = re.search(rf'<tr data-account="{account.id}">(.*?)</tr>', page, re.S)
    assert found, page
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(1)))


def failing(account: Account, words: str) -> tuple[dt.datetime, dt.datetime]:
    since = utcnow().replace(microsecond=0) - dt.timedelta(minutes=7)
    next_try = utcnow().replace(microsecond=0) + dt.timedelta(minutes=4)
    Account.update(
        refresh_failures=3,
        refresh_failing_since=since,
        next_refresh_at=next_try,
        refresh_error_kind="unavailable",
        last_error=words,
    ).where(Account.id == account.id).execute()
    return since, next_try


def test_an_account_whose_token_cannot_be_renewed_is_not_shown_active(
    client: FlaskClient,
    alice: User,
) -> None:
    account = make_account(alice, "box@example.com", make_client(alice), status="active")
    since, next_try = failing(account, "the token endpoint answered HTTP 503")

    home = client.get("/").get_data(as_text=True)
    detail = client.get(f"/accounts/{account.id}").get_data(as_text=True)

    assert "Cannot renew token" in row(home, account) and "Active" not in row(home, account)
    attention = re.search(r'id="attention".*?</section>', home, re.S)
    assert attention and "the token endpoint answered HTTP 503" in attention.group(0)
    for page in (home, detail):
        assert f"{since:%Y-%m-%d %H:%M} UTC" in page and f"{next_try:%Y-%m-%d %H:%M} UTC" in page
    renewal = re.search(r'id="renewal".*?</div>', detail, re.S)
    assert renewal and "cannot be renewed" in renewal.group(0)
    assert "HTTP 503" in renewal.group(0)


def test_a_working_account_is_active_without_warnings(
    client: FlaskClient,
    alice: User,
) -> None:
    account = make_account(alice, "fine@example.com", make_client(alice), status="active")

    home = client.get("/").get_data(as_text=True)

    assert "Active" in row(home, account) and 'id="attention"' not in home


def test_a_refused_protocol_is_named_with_the_servers_words_and_the_fix(
    client: FlaskClient,
    alice: User,
) -> None:
    team = make_client(alice, provider="microsoft365", grant="authorization_code")
    account = make_account(alice, "shared@example.com", team, status="active")
    said = (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
        "the Tenant."
    )
    mailrefusals.record(account.id, mailrefusals.explain("smtp", said, account.address))

    home = client.get("/").get_data(as_text=True)
    detail = client.get(f"/accounts/{account.id}").get_data(as_text=True)

    assert "Active, SMTP refused" in row(home, account)
    smtp = re.search(r'<tr data-protocol="SMTP">.*?</tr>', detail, re.S)
    assert smtp is not None
    text = smtp.group(0)
    assert "SMTP AUTH is disabled" in text and "5.7.139" in text
    assert (
        "Set-CASMailbox -Identity shared@example.com -SmtpClientAuthenticationDisabled $false"
        in text
    )
    imap = re.search(r'<tr data-protocol="IMAP">.*?</tr>', detail, re.S)
    assert imap is not None and "No refusal recorded" in imap.group(0)


def attention_item(page: str, account: Account) -> str:
    found = re.search(rf'<li>\s*<a href="/accounts/{account.id}">.*?</li>', page, re.S)
    assert found, page
    return found.group(0)


def test_re_authorize_is_offered_only_where_a_new_authorization_can_fix_it(
    client: FlaskClient,
    alice: User,
) -> None:
    """A policy refusal is fixed at the mail server and a throttling token endpoint is retried
    by itself: for those the list points to the mailbox's page, not to a pointless sign-in."""
    team = make_client(alice, provider="microsoft365", grant="authorization_code")
    refused = make_account(alice, "refused@example.com", team, status="active")
    said = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled."
    mailrefusals.record(refused.id, mailrefusals.explain("smtp", said, refused.address))
    throttled = make_account(alice, "throttled@example.com", team, status="active")
    failing(throttled, "the token endpoint answered HTTP 429")
    revoked = make_account(alice, "revoked@example.com", team, status="needs_reauth")

    home = client.get("/").get_data(as_text=True)

    for account in (refused, throttled):
        item = attention_item(home, account)
        assert "Re-authorize" not in item and "What to do" in item, item
    assert "Re-authorize" in attention_item(home, revoked)
