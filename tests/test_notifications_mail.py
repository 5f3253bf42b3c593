"""Notification email end to end on the test bed: through the Postfix peer as the SMTP relay,
and through a linked mailbox as the instance's sender (its own SMTP path with XOAUTH2, via
Dovecot submission and Postfix); the message arrives in the recipient's Dovecot mailbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import notifications, notifychannels
from mailboxes.mailbackend import AppBackend
from mailproxy import ProxyAuthError
from models import Notification, User
from people import users
from tests.helpers.app import make_app
from tests.helpers.mail import link_with_client_credentials
from tests.helpers.web import AuthActions, post_form

pytestmark = pytest.mark.peers
OWNER_PASSWORD = "owner-password-1"
POLICY = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)


@pytest.fixture
def app(instance: Path, peers: Any) -> Flask:
    return make_app(
        instance, UPSTREAM_CA_FILE=peers.ca_file, NOTIFY_ATTEMPTS=2, NOTIFY_RETRY_SECONDS=0
    )


@pytest.fixture
def owner(app: Flask, peers: Any) -> User:
    """The admin, whose login address is a mailbox of the test bed's Dovecot."""
    address, _ = peers.new_mailbox("notify-owner", messages=0)
    with app.app_context():
        return users.create_admin(address, OWNER_PASSWORD)


@pytest.fixture
def web(app: Flask, client: FlaskClient, owner: User) -> FlaskClient:
    AuthActions(app, client).login(owner.email, OWNER_PASSWORD)
    return client


def relay(peers: Any, port: int, username: str = "") -> notifychannels.Relay:
    return notifychannels.Relay(
        host=peers.host, port=port, security="plain", username=username,
        from_address="auth-email@example.test",
    )  # fmt: skip


def test_the_test_button_and_an_event_arrive_through_the_postfix_relay(
    app: Flask, web: FlaskClient, owner: User, peers: Any
) -> None:
    saved = post_form(
        web,
        "/admin/notifications",
        {"mode": "relay", "host": peers.host, "port": str(peers.postfix_smtp_port),
         "security": "plain", "from_address": "auth-email@example.test",
         "failing_minutes": "60"},
    )  # fmt: skip
    assert saved.status_code == 302, saved.get_data(as_text=True)
    post_form(web, "/settings/notifications/test/email", {}, "/settings/notifications")
    notifications.drain(app.config)
    assert peers.wait_for_message(owner.email, "[Auth-Email] Test notification from Auth-Email")
    assert 'status-active">sent' in web.get("/settings/notifications").get_data(as_text=True)

    # a real event, by the default settings (every event, by email): SMTP refused by policy
    account = link_with_client_credentials(owner, peers, "notify-policy")
    backend = AppBackend(app.config)
    try:
        with pytest.raises(ProxyAuthError):
            backend.upstream_refused(account.id, "smtp", POLICY)
        with pytest.raises(ProxyAuthError):  # again the same day: told once
            backend.upstream_refused(account.id, "smtp", POLICY)
    finally:
        backend.close()
    notifications.drain(app.config)
    subject = f"[Auth-Email] SMTP refused for {account.address}: SMTP AUTH is disabled"
    assert peers.wait_for_message(owner.email, subject)
    raw = peers.doveadm("fetch", "-u", owner.email, "text", "mailbox", "INBOX", "header",
                        "subject", "SMTP refused")  # fmt: skip
    assert "Set-CASMailbox" in raw and f"/accounts/{account.id}" in raw
    assert "Auto-Submitted: auto-generated" in raw
    assert len([s for s in peers.subjects(owner.email) if "SMTP refused" in s]) == 1


def test_a_linked_mailbox_sends_the_notification_over_its_own_smtp_path(
    app: Flask, web: FlaskClient, owner: User, peers: Any
) -> None:
    sender = link_with_client_credentials(owner, peers, "notify-sender")
    page = web.get("/admin/notifications").get_data(as_text=True)
    assert sender.address in page  # offered as the sender
    saved = post_form(
        web,
        "/admin/notifications",
        {"mode": "mailbox", "account": str(sender.id), "port": "587", "security": "starttls",
         "failing_minutes": "60"},
    )  # fmt: skip
    assert saved.status_code == 302, saved.get_data(as_text=True)
    post_form(web, "/settings/notifications/test/email", {}, "/settings/notifications")
    assert notifications.drain(app.config) == 1
    note = Notification.get()
    assert note.status == "sent", note.last_error
    assert peers.wait_for_message(owner.email, "[Auth-Email] Test notification from Auth-Email")
    raw = peers.doveadm("fetch", "-u", owner.email, "hdr", "mailbox", "INBOX")
    assert f"From: {sender.address}" in raw


def test_a_refusing_relay_is_recorded_with_its_words_and_not_retried(
    app: Flask, web: FlaskClient, owner: User, peers: Any
) -> None:
    # Postfix's submission port takes only authenticated clients (and only OAuth mechanisms)
    notifychannels.save_sender("relay", relay=relay(peers, peers.postfix_submission_port))
    notifications.queue_test(owner, "email")
    notifications.drain(app.config)
    note = Notification.get()
    assert note.status == "failed" and note.attempts == 1
    assert f"The relay {peers.host}:{peers.postfix_submission_port} refused" in note.last_error
    assert "5.7.1" in note.last_error or "554" in note.last_error

    notifychannels.save_sender(
        "relay", relay=relay(peers, peers.postfix_submission_port, "someone"), password="pw-x1"
    )
    notifications.queue_test(owner, "email")
    notifications.drain(app.config)
    last = Notification.select().order_by(Notification.created_at.desc(), Notification.id.desc())
    note = last.first()
    assert note.status == "failed" and "cannot take the login" in note.last_error
    assert "XOAUTH2" in note.last_error and "pw-x1" not in note.last_error
    page = web.get("/settings/notifications").get_data(as_text=True)
    assert "cannot take the login" in page and "pw-x1" not in page


def test_a_microsoft_mailbox_set_to_graph_sends_the_notification_through_graph(
    instance: Path, sims: Any, sim_settings: dict[str, Any]
) -> None:
    from tests.helpers.graph import mailbox

    app = make_app(
        instance,
        PUBLIC_URL="http://127.0.0.1:8080",
        **{**sim_settings, "GRAPH_TIMEOUT": 5},
    )
    with app.app_context():
        users.create_admin("admin@example.org", "admin-password-1")
    sender = mailbox(app, sims, "graph", "smtp_auth_disabled_tenant")
    told = sims.entra_user("told", seed=1).email
    with app.app_context():
        person = users.create_user(told, "told-password-1", False)
        from models import Account

        account = Account.get(Account.address == sender.email)
        notifychannels.save_sender("mailbox", account_id=account.id)
        notifications.queue_test(person, "email")
        assert notifications.drain(app.config) == 1
        note = Notification.get()
        assert note.status == "sent", note.last_error
    assert sims.peers.wait_for_message(told, "[Auth-Email] Test notification from Auth-Email")
    graph_mailbox, graph_sender, recipients = sims.graph.sent[-1]
    assert (graph_mailbox, graph_sender, recipients) == (sender.email, sender.email, [told])


@pytest.mark.parametrize(("security", "port_name"), [("starttls", "submission_port"),
                                                     ("tls", "submissions_port")])  # fmt: skip
def test_a_tls_relay_is_reached_and_its_refusal_recorded_word_for_word(
    app: Flask, owner: User, peers: Any, security: str, port_name: str
) -> None:
    """Dovecot's submission service as the relay: TLS with the bed's CA works (over STARTTLS
    and implicit TLS); it wants a login, and says so."""
    port = getattr(peers, port_name)
    notifychannels.save_sender(
        "relay",
        relay=notifychannels.Relay(host=peers.mail_host, port=port, security=security,
                                   from_address="auth-email@example.test"),
    )  # fmt: skip
    notifications.queue_test(owner, "email")
    notifications.drain(app.config)
    note = Notification.get()
    assert note.status == "failed", note.last_error
    assert note.last_error.startswith(f"The relay {peers.mail_host}:{port} refused: 530")
    assert "SSL" not in note.last_error and "certificate" not in note.last_error


def test_a_sender_mailbox_whose_cached_token_was_revoked_renews_it_once_and_sends(
    app: Flask, owner: User, peers: Any
) -> None:
    sender = link_with_client_credentials(owner, peers, "notify-revoked")
    client = sender.client
    peers.revoke_token(str(sender.access_token), client.client_id, str(client.client_secret))
    before = sender.token_version
    notifychannels.save_sender("mailbox", account_id=sender.id)
    notifications.queue_test(owner, "email")
    notifications.drain(app.config)
    note = Notification.get()
    assert note.status == "sent", note.last_error
    assert peers.wait_for_message(owner.email, "[Auth-Email] Test notification from Auth-Email")
    from models import Account

    assert Account.get_by_id(sender.id).token_version > before  # renewed once


def test_an_https_webhook_is_verified_with_the_system_and_the_extra_cas(
    app: Flask, owner: User, peers: Any
) -> None:
    import ssl

    from models import NotificationSettings
    from tests.helpers.notifications import Receiver, verified

    receiver = Receiver()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(peers.server_cert_file, peers.server_key_file)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    try:
        prefs = NotificationSettings.of(owner.id)
        prefs.webhook_enabled, prefs.webhook_secret = True, "whsec_tls"
        prefs.webhook_url = receiver.url.replace("http://", "https://") + "/hook"
        prefs.save()
        notifications.queue_test(owner, "webhook")
        notifications.drain(app.config)  # UPSTREAM_CA_FILE is the bed's CA
        assert Notification.get().status == "sent", Notification.get().last_error
        assert verified("whsec_tls", receiver.hooks()[0])["event"] == "test"

        app.config["UPSTREAM_CA_FILE"] = ""
        from oauth import grants

        grants.init_app(app)  # only the system CAs now: the bed's CA is unknown
        notifications.queue_test(owner, "webhook")
        notifications.drain(app.config)
        failed = Notification.get(Notification.status != "sent")
        assert "Could not reach the webhook" in failed.last_error
        assert "SSLError" in failed.last_error
    finally:
        receiver.close()
