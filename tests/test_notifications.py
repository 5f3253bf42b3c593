"""Notifications: each event from the place that decides it, the once-a-day rule, the outbox's
bounded retries, the signed webhook (a real HTTP receiver on loopback), the settings pages and
the schema upgrade from version 7. Email through the test bed is in test_notifications_mail."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

import migrations
from mailboxes import notifications
from mailboxes.mailbackend import AppBackend
from mailproxy import ProxyAuthError
from models import (
    Account,
    MailPassword,
    Notification,
    NotificationSettings,
    OAuthClient,
    Setting,
    User,
    utcnow,
)
from oauth import clients as oauth_clients
from oauth import errors as oauth_errors
from oauth import tokens
from people import users
from people.passwords import hash_password
from tests.helpers.app import ADMIN_EMAIL, make_app
from tests.helpers.notifications import Receiver, verified
from tests.helpers.web import AuthActions, post_form

SMTP_POLICY = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def app(instance: Path) -> Flask:
    return make_app(instance, NOTIFY_ATTEMPTS=3, NOTIFY_RETRY_SECONDS=0, NOTIFY_TIMEOUT=5)


@pytest.fixture
def web(app: Flask, client: FlaskClient) -> FlaskClient:
    AuthActions(app, client).setup_admin()
    return client


@pytest.fixture
def owner(app: Flask, web: FlaskClient) -> User:
    return User.get(User.email == ADMIN_EMAIL)


def webhook_on(web: FlaskClient, receiver: Receiver, kinds: list[str] | None = None) -> str:
    """Choose the events and the webhook through the settings page; returns the secret shown."""
    kinds = list(notifications.KINDS) if kinds is None else kinds
    data = {f"kind_{k}": "y" for k in kinds}
    data.update(webhook_enabled="y", webhook_url=f"{receiver.url}/hook")
    page = post_form(web, "/settings/notifications", data)
    assert page.status_code == 200, page.get_data(as_text=True)
    assert page.headers["Cache-Control"] == "no-store"
    html = page.get_data(as_text=True)
    found = re.search(r'id="shown-secret"[^>]*>(whsec_[A-Za-z0-9_-]+)<', html)
    assert found, "the signing secret is shown once after the first save"
    return found.group(1)


def linked(owner: User, receiver: Receiver, address: str = "box@example.test") -> Account:
    client = OAuthClient.create(
        owner=owner, name="local", provider="other", token_url=f"{receiver.url}/token",
        scope="mail", client_id="cid", client_secret="client-secret-value",
        smtp_host="127.0.0.1", smtp_port=2525, smtp_security="plain",
    )  # fmt: skip
    account = Account(
        owner=owner, address=address, provider="other", client=client, status="active",
        access_token="a-token", refresh_token="r-token",
        token_expires_at=utcnow() + dt.timedelta(hours=1),
    )  # fmt: skip
    account.save()
    return account


def drain(app: Flask, rounds: int = 1) -> None:
    for _ in range(rounds):
        notifications.drain(app.config)


# ---------------------------------------------------------------------------------- events


def test_reauth_reaches_the_webhook_signed_and_only_once_a_day(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver)
    account = linked(owner, receiver)
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)  # the endpoint: invalid_grant
    drain(app)
    [hook] = receiver.hooks()
    body = verified(secret, hook)
    assert body["event"] == "reauth" and body["mailbox"] == "box@example.test"
    assert body["url"].endswith(f"/accounts/{account.id}")
    assert "grant revoked" in body["detail"]
    assert hook["headers"]["X-Auth-Email-Event"] == "reauth"
    # a tampered body does not verify
    with pytest.raises(AssertionError):
        verified(secret, {**hook, "body": hook["body"].replace(b"reauth", b"reauts")})

    # the same event again today: nothing new is queued or sent
    Account.update(status="active").where(Account.id == account.id).execute()
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)
    drain(app)
    assert len(receiver.hooks()) == 1
    assert Notification.select().where(Notification.kind == "reauth").count() == 1
    # tomorrow it is told again (the key is the day)
    assert Notification.raise_event(owner.id, "reauth", "box@example.test", "t") == 0
    tomorrow = (utcnow().date() + dt.timedelta(days=1)).isoformat()
    assert Notification.raise_event(owner.id, "reauth", "box@example.test", "t", period=tomorrow)


def test_a_deleted_shared_client_tells_the_people_whose_mailboxes_used_it(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    """The admin deletes a shared client: each other person's mailbox needs re-authorization,
    and they are told (the admin, who deleted it, is not)."""
    webhook_on(web, receiver)  # the admin would hear about their own mailbox too
    team = linked(owner, receiver).client
    OAuthClient.update(shared=True).where(OAuthClient.id == team.id).execute()
    member = users.create_user("member@example.org", "member-password-1", False)
    prefs = NotificationSettings.of(member.id)
    prefs.webhook_enabled, prefs.webhook_secret = True, "whsec_member"
    prefs.webhook_url = f"{receiver.url}/member"
    prefs.save()
    receiver.answers["/member"] = (200, {"ok": True})
    theirs = Account.create(
        owner=member, address="member@example.test", provider="other", client=team,
        status="active", refresh_token="r-token",
    )  # fmt: skip

    oauth_clients.delete_client(OAuthClient.get_by_id(team.id), reauth_accounts=True)
    drain(app)

    assert Account.get_by_id(theirs.id).status == "needs_reauth"
    [hook] = [r for r in receiver.requests if r["path"] == "/member"]
    assert receiver.hooks() == []  # the admin, who deleted it, is not told
    body = verified("whsec_member", hook)
    assert (body["event"], body["mailbox"]) == ("reauth", "member@example.test")
    assert "was deleted" in body["detail"]


def test_renewal_failing_is_told_only_after_the_instance_threshold(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver)
    receiver.answers["/token"] = (503, {"error": "temporarily_unavailable"})
    account = linked(owner, receiver)
    Setting.write("notify_failing_minutes", "30")

    def fail(since_minutes: int) -> None:
        Account.update(
            refresh_failing_since=utcnow() - dt.timedelta(minutes=since_minutes),
            refresh_failures=3,
            next_refresh_at=None,
        ).where(Account.id == account.id).execute()
        with pytest.raises(oauth_errors.TokenUnavailable):
            tokens.get_access_token(account.id, force_refresh=True)

    fail(10)
    assert Notification.select().count() == 0  # failing for 10 minutes, told after 30
    fail(45)
    drain(app)
    [hook] = receiver.hooks()
    body = verified(secret, hook)
    assert body["event"] == "renewal_failing" and "over 30 min" in body["title"]


def test_policy_refusal_is_told_from_the_recorded_refusal(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver)
    account = linked(owner, receiver)
    backend = AppBackend(app.config)
    try:
        with pytest.raises(ProxyAuthError):
            backend.upstream_refused(account.id, "smtp", SMTP_POLICY)
    finally:
        backend.close()
    drain(app)
    body = verified(secret, receiver.hooks()[0])
    assert body["event"] == "policy_refusal"
    assert "SMTP AUTH is disabled" in body["title"]
    assert "Set-CASMailbox" in body["detail"]


def test_a_password_used_from_a_new_address_is_told_once(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver, ["new_ip"])
    account = linked(owner, receiver)
    from mailboxes import linking

    linking.add_password(owner, account, "Laptop", "laptop-password-1")  # never used here
    linking.add_password(owner, account, "Scanner", "scanner-password-1")
    backend = AppBackend(app.config)
    try:
        for ip in ("192.0.2.10", "192.0.2.10", "198.51.100.20", "192.0.2.10"):
            backend.authenticate("smtp", "box@example.test", "scanner-password-1", ip)
            backend.flush()
    finally:
        backend.close()
    scanner = MailPassword.get(MailPassword.label == "Scanner")
    assert scanner.known_ips.split() == ["192.0.2.10", "198.51.100.20"]
    [told] = Notification.select().where(Notification.kind == "new_ip")
    assert told.account_id == account.id
    assert told.detail == (
        "The password “Scanner” of box@example.test was used from 198.51.100.20, an address it "
        "was never used from before. If that was not you or one of your devices, revoke the "
        "password on the mailbox's page."
    )
    drain(app)
    [hook] = receiver.hooks()  # the first use is not "new"; going back to a known one neither
    body = verified(secret, hook)
    assert body["event"] == "new_ip" and "198.51.100.20" in body["title"]
    assert "Scanner" in body["detail"]


def test_a_credential_is_told_at_30_and_at_7_days_once_each(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver)
    account = linked(owner, receiver)
    today = dt.date(2027, 3, 1)
    OAuthClient.update(secret_expires_on=today + dt.timedelta(days=40)).execute()
    assert notifications.sweep(today) == 0
    assert notifications.sweep(today + dt.timedelta(days=10)) == 1  # 30 days left
    assert notifications.sweep(today + dt.timedelta(days=11)) == 0  # told already
    assert notifications.sweep(today + dt.timedelta(days=33)) == 1  # 7 days left
    assert notifications.sweep(today + dt.timedelta(days=36)) == 0
    drain(app)
    titles = [verified(secret, h)["title"] for h in receiver.hooks()]
    assert titles == [
        "The secret of “local” expires in 30 days, on 2027-04-10.",
        "The secret of “local” expires in 7 days, on 2027-04-10.",
    ]
    assert account.address in verified(secret, receiver.hooks()[0])["detail"]


def test_events_the_person_did_not_choose_are_not_sent(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    webhook_on(web, receiver, ["new_ip"])
    account = linked(owner, receiver)
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)
    drain(app)
    assert receiver.hooks() == [] and Notification.select().count() == 0


# ---------------------------------------------------------------------------------- delivery


def test_a_failing_webhook_is_tried_a_bounded_number_of_times_then_recorded(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    webhook_on(web, receiver)
    receiver.answers["/hook"] = (500, {"error": "receiver broken"})
    account = linked(owner, receiver)
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)
    drain(app, rounds=6)
    assert len(receiver.hooks()) == 3  # NOTIFY_ATTEMPTS
    note = Notification.get()
    assert (note.status, note.attempts) == ("failed", 3)
    assert note.last_error.startswith("The webhook at 127.0.0.1:")
    assert "answered 500 Internal Server Error" in note.last_error
    page = web.get("/settings/notifications").get_data(as_text=True)
    assert "failed after 3 tries" in page and "answered 500 Internal Server Error" in page


def test_a_refusing_webhook_is_not_retried_and_pauses_double(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    webhook_on(web, receiver)
    receiver.answers["/hook"] = (403, {})
    queued = notifications.queue_test(owner, "webhook")
    drain(app, rounds=3)
    assert len(receiver.hooks()) == 1
    assert Notification.get_by_id(queued.id).status == "failed"
    assert [notifications.pause(n, 60) for n in (1, 2, 3, 8)] == [60, 120, 240, 3600]


def test_a_hanging_webhook_costs_one_timeout_per_try(
    app: Flask, web: FlaskClient, owner: User
) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers
    try:
        app.config["NOTIFY_TIMEOUT"] = 1
        prefs = NotificationSettings.of(owner.id)
        prefs.webhook_url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        prefs.webhook_enabled, prefs.webhook_secret = True, "whsec_x"
        prefs.save()
        notifications.queue_test(owner, "webhook")
        drain(app)
        note = Notification.get()
        assert note.status == "pending" and note.attempts == 1
        assert "did not answer within 1 s" in note.last_error
    finally:
        silent.close()


def test_the_test_button_reports_success_and_the_exact_error(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    secret = webhook_on(web, receiver, [])
    answer = post_form(web, "/settings/notifications/test/webhook", {}, "/settings/notifications")
    assert answer.status_code == 302
    page = web.get("/settings/notifications").get_data(as_text=True)
    assert "sending" in page and 'http-equiv="refresh"' in page
    drain(app)
    body = verified(secret, receiver.hooks()[0])
    assert body["event"] == "test"
    page = web.get("/settings/notifications").get_data(as_text=True)
    assert 'status-active">sent' in page and 'http-equiv="refresh"' not in page

    receiver.answers["/hook"] = (410, {"gone": True})
    post_form(web, "/settings/notifications/test/webhook", {}, "/settings/notifications")
    drain(app)
    page = web.get("/settings/notifications").get_data(as_text=True)
    assert "answered 410 Gone" in page

    # email without a sender: said at once, nothing queued
    answer = post_form(web, "/settings/notifications/test/email", {}, "/settings/notifications")
    assert "has not set up an email sender" in web.get(answer.location).get_data(as_text=True)
    assert secret not in page  # the secret is shown once only


# ---------------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://hooks.example.org/x", "Use https://"),
        ("ftp://hooks.example.org/x", "Enter a full https:// URL."),
        ("https://user:pw@hooks.example.org/", "Put no user name or password"),
        ("https://10.1.2.3/hook", "is not an address this server allows"),
        ("", "Enter the URL that receives the webhook."),
    ],
)
def test_a_bad_webhook_url_is_refused_next_to_the_field(
    app: Flask, web: FlaskClient, url: str, error: str
) -> None:
    page = post_form(
        web,
        "/settings/notifications",
        {"kind_reauth": "y", "webhook_enabled": "y", "webhook_url": url},
    )
    assert page.status_code == 400
    html = page.get_data(as_text=True)
    assert error in html and 'aria-invalid="true"' in html
    assert f'value="{url}"' in html  # what was typed is kept
    assert NotificationSettings.select().count() == 0


def test_plain_http_webhooks_need_the_loopback_setting(instance: Path) -> None:
    from mailboxes.notifychannels import webhook_url_refusal

    assert webhook_url_refusal("http://127.0.0.1:9/h", {"CUSTOM_CLIENT_LOOPBACK": True}) is None
    refusal = webhook_url_refusal("http://127.0.0.1:9/h", {"CUSTOM_CLIENT_LOOPBACK": False})
    assert refusal and refusal.startswith("Use https://")
    refusal = webhook_url_refusal("https://localhost/h", {"CUSTOM_CLIENT_LOOPBACK": False})
    assert refusal and "loopback" in refusal
    assert webhook_url_refusal("https://hooks.example.org/h", {}) is None


def test_the_signing_secret_is_encrypted_and_shown_once(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver, instance: Path
) -> None:
    secret = webhook_on(web, receiver)
    assert secret not in web.get("/settings/notifications").get_data(as_text=True)
    raw = sqlite3.connect(instance / "auth-email.db").execute(
        "select webhook_secret from notification_settings"
    )
    assert secret.encode() not in raw.fetchone()[0]
    replaced = post_form(
        web, "/settings/notifications/secret", {}, "/settings/notifications"
    ).get_data(as_text=True)
    new = re.search(r'id="shown-secret"[^>]*>(whsec_[^<]+)<', replaced)
    assert new and new.group(1) != secret
    # the page beside it shows the stored choices, not the empty button form
    assert re.search(r'<input checked[^>]*name="webhook_enabled"', replaced), replaced
    assert str(NotificationSettings.of(owner.id).webhook_secret) == new.group(1)


def test_the_admin_sender_form_explains_bad_input_and_keeps_the_password(
    app: Flask, web: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"failing_minutes": "60", "security": "starttls", "port": "587"}
    page = post_form(web, "/admin/notifications", {**base, "mode": "relay"})
    html = page.get_data(as_text=True)
    assert page.status_code == 400
    assert "Enter the relay&#39;s host name." in html or "Enter the relay's host name." in html
    assert "Enter the address notifications come from." in html
    page = post_form(
        web,
        "/admin/notifications",
        {**base, "mode": "relay", "host": "smtp.example.org", "security": "plain",
         "from_address": "ae@example.org", "failing_minutes": "0"},
    )  # fmt: skip
    html = page.get_data(as_text=True)
    assert page.status_code == 400 and "must be on this machine" in html
    assert "Enter 1 to 10080 minutes." in html
    page = post_form(web, "/admin/notifications", {**base, "mode": "mailbox"})
    assert "Choose one of your linked mailboxes." in page.get_data(as_text=True)

    saved = post_form(
        web,
        "/admin/notifications",
        {**base, "mode": "relay", "host": "smtp.example.org", "username": "relay-user",
         "password": "relay-password-value", "from_address": "ae@example.org",
         "failing_minutes": "45"},
    )  # fmt: skip
    assert saved.status_code == 302
    html = web.get("/admin/notifications").get_data(as_text=True)
    assert "relay-password-value" not in html and "A password is stored." in html
    assert Notification.failing_minutes() == 45
    from models import InstanceSecret

    assert str(InstanceSecret.get().value) == "relay-password-value"
    post_form(
        web,
        "/admin/notifications",
        {**base, "mode": "relay", "host": "smtp.example.org", "username": "relay-user",
         "from_address": "ae@example.org"},
    )  # fmt: skip
    assert str(InstanceSecret.get().value) == "relay-password-value"  # blank keeps it
    assert "relay-password-value" not in caplog.text


def test_settings_pages_are_linked_and_others_cannot_reach_the_admin_one(
    app: Flask, web: FlaskClient, auth: AuthActions
) -> None:
    assert 'href="/settings/notifications"' in web.get("/settings/").get_data(as_text=True)
    assert 'href="/admin/notifications"' in web.get("/admin/settings").get_data(as_text=True)
    auth.create_user("someone@example.org")
    auth.logout()
    auth.login("someone@example.org", "user-password-1")
    assert web.get("/admin/notifications").status_code == 404
    assert web.get("/settings/notifications").status_code == 200


# ---------------------------------------------------------------------------------- schema


def test_a_version_7_database_gains_the_notification_tables_with_nothing_lost(
    instance: Path,
) -> None:
    from store.vault import Keyring, aad_for, write_private

    instance.mkdir(parents=True, mode=0o700)
    ring = Keyring.generate()
    write_private(instance / "vault.key", ring.dump())
    db = sqlite3.connect(instance / "auth-email.db")
    db.executescript((Path(__file__).parent / "schema_v7.sql").read_text())
    now = "2026-11-01 10:00:00"
    token = ring.seal("old-refresh-token", aad_for("account", "refresh_token", "a" * 32))
    with db:
        db.execute("insert into meta values ('schema_version', '7')")
        db.execute(
            "insert into user (id, email, password_hash, is_admin, is_enabled, "
            "can_custom_clients, session_version, created_at) values "
            "(1, 'old@example.org', 'h', 1, 1, 1, 1, ?)",
            (now,),
        )
        db.execute(
            "insert into account (id, uid, owner_id, address, provider, status, status_detail, "
            "signed_in_as, refresh_token, token_version, last_error, granted_scope, "
            "refresh_failures, refresh_error_kind, protocol_state, last_used_ip, bytes_relayed, "
            "created_at, smtp_delivery, smtp_auth_refused_detail) values (1, ?, 1, "
            "'old@example.test', 'other', 'active', '', '', ?, 3, '', '', 0, '', '', '', 42, ?, "
            "'', '')",
            ("a" * 32, token, now),
        )
        db.execute(
            "insert into mail_password (id, account_id, label, password_hash, created_at, "
            "last_used_at, last_used_ip) values (1, 1, 'Laptop', ?, ?, ?, '192.0.2.1')",
            (hash_password("old-mail-password"), now, now),
        )
        db.execute("insert into setting values ('allow_ropc', '1')")
    db.close()

    app = make_app(instance)
    with app.app_context():
        assert migrations.current_version() == migrations.LATEST == 9
        account = Account.get()
        assert (account.address, account.bytes_relayed) == ("old@example.test", 42)
        assert account.refresh_token == "old-refresh-token"
        assert Setting.read("allow_ropc") == "1"
        row = MailPassword.get()
        assert (row.label, row.last_used_ip, row.known_ips) == ("Laptop", "192.0.2.1", "")
        # the address on record counts as known: no "new address" for it, one for another
        assert MailPassword.note_use(1, "192.0.2.1") is False
        assert MailPassword.note_use(1, "203.0.113.9") is True
        assert Notification.raise_event(1, "reauth", "old@example.test", "t") == 0  # no sender
        assert migrations.migrate() == []
    tables = {r[0] for r in sqlite3.connect(instance / "auth-email.db").execute(
        "select name from sqlite_master where type = 'table'")}  # fmt: skip
    assert {"notification", "notification_settings"} <= tables


# ---------------------------------------------------------------------------------- service


def test_the_notifier_thread_sends_in_the_background_and_stops(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver
) -> None:
    import time

    secret = webhook_on(web, receiver, [])
    notifier = notifications.Notifier(app, {**app.config, "NOTIFY_POLL_SECONDS": 30})
    notifier.start()
    try:
        notifications.queue_test(owner, "webhook")
        notifier.wake()  # what the test button does: no 30 s wait
        deadline = time.monotonic() + 10
        while not receiver.hooks() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        notifier.stop()
    assert verified(secret, receiver.hooks()[0])["event"] == "test"
    assert notifier._thread is None


@pytest.mark.postgres
def test_on_postgres_concurrent_events_and_drains_send_each_message_once(
    instance: Path, pg_url: str, receiver: Receiver
) -> None:
    from store.db import database

    app = make_app(instance, DATABASE_URL=pg_url)
    with app.app_context():
        owner = User.create(email="pg-owner@example.org", password_hash="x")
        prefs = NotificationSettings.of(owner.id)
        prefs.webhook_enabled, prefs.webhook_secret = True, "whsec_pg"
        prefs.webhook_url = f"{receiver.url}/hook"
        prefs.save()
    queued: list[int] = []

    def raise_it() -> None:
        with database.connection_context():
            queued.append(Notification.raise_event(owner.id, "reauth", "box@example.test", "t"))

    def drain_it() -> None:
        with database.connection_context():
            notifications.drain(app.config)

    for work in (raise_it, drain_it):
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(queued) == [0, 0, 0, 1]
    assert len(receiver.hooks()) == 1
    with app.app_context():
        assert Notification.get().status == "sent"


def test_a_failing_queue_never_fails_the_place_that_decided_the_event(
    app: Flask, web: FlaskClient, owner: User, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A recorded refusal still stands when its notification cannot be queued."""
    from mailboxes import refusals
    from store.db import database

    webhook_on(web, receiver)
    account = linked(owner, receiver)
    database.execute_sql('ALTER TABLE "notification" RENAME TO "notification_gone"')
    try:
        refusals.record(account.id, refusals.explain("smtp", SMTP_POLICY, account.address))
    finally:
        database.execute_sql('ALTER TABLE "notification_gone" RENAME TO "notification"')
    assert "smtp" in refusals.states(Account.get_by_id(account.id))
    assert "notification policy_refusal about box@example.test not queued" in caplog.text


def test_old_messages_are_forgotten_pending_ones_kept(app: Flask, owner: User) -> None:
    old = utcnow() - dt.timedelta(days=notifications.KEEP_DAYS + 1)
    for status in ("sent", "failed", "pending"):
        Notification.create(user=owner, kind="test", dedup=status, channel="email",
                            status=status, created_at=old)  # fmt: skip
    Notification.create(user=owner, kind="test", dedup="new", channel="email", status="sent")
    notifications.sweep()
    assert sorted(n.dedup for n in Notification.select()) == ["new", "pending"]
