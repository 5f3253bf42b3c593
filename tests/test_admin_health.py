"""The admin's mailbox health overview: every mailbox, its state, and what needs attention."""

from __future__ import annotations

import datetime as dt

from models import Account, OAuthClient, User, utcnow
from people import audit
from store.db import database
from tests.helpers.app import USER_PASSWORD

SECRET = "client-secret-never-shown-1"
TOKEN = "access-token-never-shown-1"


def seed(app, auth) -> None:
    auth.setup_admin()
    alice = auth.create_user("alice@example.org", can_custom_clients=True)
    bob = auth.create_user("bob@example.org")
    with app.app_context(), database.connection_context():
        soon = OAuthClient.create(
            owner=alice,
            name="Expiring app",
            provider="microsoft365",
            token_url="https://login.microsoftonline.com/t/oauth2/v2.0/token",
            scope="s",
            client_id="cid",
            client_secret=SECRET,
            secret_expires_on=dt.date.today() + dt.timedelta(days=5),
        )
        fine = OAuthClient.create(
            owner=alice,
            name="Fine app",
            provider="google",
            token_url="https://oauth2.googleapis.com/token",
            scope="s",
            client_id="cid2",
            client_secret=SECRET,
        )
        Account.create(
            owner=alice,
            address="ok@team.example",
            provider="google",
            client=fine,
            status="active",
            access_token=TOKEN,
            token_expires_at=utcnow() + dt.timedelta(hours=1),
            last_used_at=utcnow(),
        )
        Account.create(
            owner=alice,
            address="expiring@team.example",
            provider="microsoft365",
            client=soon,
            status="active",
        )
        Account.create(
            owner=bob,
            address="reauth@team.example",
            provider="google",
            client=fine,
            status="needs_reauth",
            status_detail="The provider revoked the grant.",
        )
        Account.create(
            owner=bob,
            address="failing@team.example",
            provider="google",
            client=fine,
            status="active",
            last_error="2026-12-01 10:00 UTC: the token endpoint answered HTTP 503",
            refresh_failures=1,
        )
        audit.record(
            "mail.login", actor=alice, ip="192.0.2.1", target="ok@team.example", detail="imap"
        )
        audit.record(
            "mail.login_needs_reauth",
            actor=bob,
            ip="192.0.2.2",
            target="reauth@team.example",
            detail="smtp",
        )
        User.update(is_admin=False).where(User.email == "bob@example.org").execute()


def row(page: str, address: str) -> str:
    start = page.index(f'data-mailbox="{address}"')
    return page[start : page.index("</tr>", start)]


def test_admin_sees_every_mailbox_with_its_state_and_counts(app, auth, client):
    seed(app, auth)
    page = client.get("/admin/health").get_data(as_text=True)
    for address in ("ok@", "expiring@", "reauth@", "failing@"):
        assert f'data-mailbox="{address}team.example"' in page
    assert '<strong data-count="mailboxes">4</strong>' in page
    assert '<strong data-count="attention">3</strong>' in page
    assert '<strong data-count="reauth">1</strong>' in page
    assert '<strong data-count="active">1</strong>' in page
    ok = row(page, "ok@team.example")
    assert "alice@example.org" in ok and "Fine app" in ok and "IMAP: ok" in ok
    assert "valid until" in ok and 'class="attention"' not in ok
    assert "client secret expires in 5 days" in row(page, "expiring@team.example")
    reauth = row(page, "reauth@team.example")
    assert "The provider revoked the grant." in reauth and "SMTP: needs re-authorization" in reauth
    assert "renewal failing" in row(page, "failing@team.example")
    assert SECRET not in page and TOKEN not in page


def test_needs_attention_filter_leaves_out_the_working_ones(app, auth, client):
    seed(app, auth)
    page = client.get("/admin/health?show=attention").get_data(as_text=True)
    assert 'data-mailbox="ok@team.example"' not in page
    assert 'data-mailbox="reauth@team.example"' in page
    assert '<strong data-count="mailboxes">4</strong>' in page  # counts stay for the instance


def test_only_the_admin_sees_it(app, auth, client):
    seed(app, auth)
    auth.logout()
    auth.login("alice@example.org", USER_PASSWORD)
    assert client.get("/admin/health").status_code == 404
    auth.logout()
    assert client.get("/admin/health").status_code in (302, 401)
