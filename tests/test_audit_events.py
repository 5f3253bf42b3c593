"""The audit log records who did what, from where, to whom: every admin action, invites, and
the linking steps (against the real OAuth server and Dovecot for the latter)."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import linking, verification
from models import Account, AuditEvent, Setting, User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD
from tests.helpers.linking import (
    REDIRECT,
    PeerInfo,
    mailbox,
    op_sign_in,
    peer_client,
    query_of,
    register,
)
from tests.helpers.web import AuthActions, post_form

IP = "127.0.0.1"  # the test client's address


def last(action: str) -> AuditEvent:
    event = (
        AuditEvent.select()
        .where(AuditEvent.action == action)
        .order_by(AuditEvent.id.desc())
        .first()
    )
    assert event is not None, f"no {action} event"
    return event


def by_admin(action: str, target: str) -> None:
    event = last(action)
    assert (event.actor_email, event.target, event.ip) == (ADMIN_EMAIL, target, IP), action


def test_every_admin_action_on_a_user_is_audited(
    app: Flask, admin_client: FlaskClient, auth: AuthActions
) -> None:
    email = "worker@example.org"
    created = post_form(admin_client, "/admin/users", {"email": email, "password": USER_PASSWORD})
    assert created.status_code == 302
    by_admin("user.created", email)
    user = User.by_email(email)

    toggled = post_form(
        admin_client, f"/admin/users/{user.id}/custom-clients", {}, form_page="/admin/users"
    )
    assert toggled.status_code == 302
    by_admin("user.custom_clients_granted", email)
    post_form(admin_client, f"/admin/users/{user.id}/custom-clients", {}, form_page="/admin/users")
    by_admin("user.custom_clients_withdrawn", email)

    post_form(admin_client, f"/admin/users/{user.id}/disable", {}, form_page="/admin/users")
    by_admin("user.disabled", email)
    post_form(admin_client, f"/admin/users/{user.id}/enable", {}, form_page="/admin/users")
    by_admin("user.enabled", email)
    assert User.get_by_id(user.id).is_enabled

    reset = post_form(
        admin_client, f"/admin/users/{user.id}/password", {"password": "a-new-password-2"}
    )
    assert reset.status_code == 302
    by_admin("user.password_reset", email)

    saved = post_form(
        admin_client, "/admin/settings", {"new_users_custom_clients": "y", "allow_ropc": "y"}
    )
    assert saved.status_code == 302
    event = last("settings.changed")
    assert (event.actor_email, event.ip) == (ADMIN_EMAIL, IP)
    assert Setting.read("allow_ropc") == "1"
    page = admin_client.get("/admin/audit").get_data(as_text=True)
    for action in ("user.created", "user.password_reset", "settings.changed"):
        assert action in page
    assert USER_PASSWORD not in page and "a-new-password-2" not in page


def test_an_admin_password_reset_ends_the_users_sessions(
    app: Flask, admin_client: FlaskClient
) -> None:
    user = users.create_user("resetme@example.org", USER_PASSWORD, False)
    theirs = app.test_client()
    assert AuthActions(app, theirs).login(user.email, USER_PASSWORD).status_code == 302
    assert theirs.get("/settings/").status_code == 200

    reset = post_form(
        admin_client, f"/admin/users/{user.id}/password", {"password": "reset-password-3"}
    )

    assert reset.status_code == 302
    ended = theirs.get("/settings/")
    assert ended.status_code == 302 and "/login" in ended.headers["Location"]
    again = app.test_client()
    assert AuthActions(app, again).login(user.email, USER_PASSWORD).status_code == 401
    assert AuthActions(app, again).login(user.email, "reset-password-3").status_code == 302
    assert admin_client.get("/admin/users").status_code == 200  # the admin's own session stays


def test_an_invite_is_audited_when_sent_and_when_accepted(
    app: Flask, admin_client: FlaskClient
) -> None:
    email = "newcomer@example.org"
    sent = post_form(admin_client, "/admin/users", {"email": email, "password": ""})
    assert sent.status_code == 201
    by_admin("user.invited", email)
    link = re.search(r"(/invite/[A-Za-z0-9_\-]+)", sent.get_data(as_text=True))
    assert link is not None
    newcomer = app.test_client()

    accepted = post_form(
        newcomer, link.group(1), {"password": "newcomer-pass-1", "confirm": "newcomer-pass-1"}
    )

    assert accepted.status_code == 302
    event = last("user.invite_accepted")
    assert (event.actor_email, event.ip) == (email, IP)
    assert ADMIN_PASSWORD not in (event.detail + event.target)


@pytest.mark.peers
def test_linking_steps_are_audited(
    peer_app: Flask,
    peer: PeerInfo,
) -> None:
    """Started, failed (the user declines at the provider), password added, tested."""
    user = users.create_user("linker@example.org", USER_PASSWORD, True)
    reg = register(peer)
    client = peer_client(user, peer, reg)
    address = mailbox("audit")
    ip = "198.51.100.4"

    declined = linking.start(user, address, client, REDIRECT, ip=ip)
    started = last("account.authorize_started")
    assert (started.actor_email, started.target, started.ip) == (user.email, address, ip)
    back = op_sign_in(peer, declined.url, address, approve=False)
    with pytest.raises(Exception, match="declined"):
        linking.complete_callback(user, query_of(back), REDIRECT, ip=ip)
    failed = last("account.authorize_failed")
    assert (failed.actor_email, failed.target, failed.ip, failed.detail) == (
        user.email,
        address,
        ip,
        "access_denied",
    )

    started_again = linking.start(user, address, client, REDIRECT, ip=ip)
    back = op_sign_in(peer, started_again.url, address)
    account, result = linking.complete_callback(user, query_of(back), REDIRECT, ip=ip)
    assert result.ok, result.message
    linking.add_password(user, account, "Printer", ip=ip)
    added = last("account.password_added")
    assert (added.target, added.detail, added.ip) == (address, "Printer", ip)

    tested = verification.recheck(user, Account.get_by_id(account.id), ip=ip)
    assert tested.ok, tested.message
    event = last("account.tested")
    assert (event.actor_email, event.target, event.detail, event.ip) == (
        user.email,
        address,
        "ok",
        ip,
    )
    for row in AuditEvent.select():
        text = " ".join(str(v) for v in row.__data__.values())
        assert reg.get("client_secret", "-") not in text
