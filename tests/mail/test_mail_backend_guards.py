"""The mail backend's guards, through the real proxy, the real backend and the real peers.

Each test here is named for a behaviour that a one-line change once broke without any test
noticing (see tests/MUTATION.md): a disabled owner's mailboxes, the per-IP failure count, the
refusal of a fresh token by the mail server, and the upstream STARTTLS before the token is sent.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import refusals as mailrefusals
from models import Account, AuditEvent, MailPassword, OAuthClient, User
from people import throttle, users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.mail import (
    EVERY_LISTENER_ON_A_FREE_PORT,
    PASSWORD,
    PUBLIC,
    WORDS,
    WRONG,
    MailClients,
    link_with_client_credentials,
    message,
    metric,
    read_first_message,
)
from tests.helpers.web import AuthActions, post_form

pytestmark = pytest.mark.peers

PER_IP_LIMIT = 4


@pytest.fixture
def app(instance: Path, peers: Any) -> Flask:
    """As in test_mail_through_app, but with a per-IP limit low enough to reach."""
    app = make_app(
        instance,
        PUBLIC_URL=PUBLIC,
        UPSTREAM_CA_FILE=peers.ca_file,
        LOGIN_FAILURE_LIMIT=1000,
        LOGIN_FAILURE_LIMIT_PER_IP=PER_IP_LIMIT,
        LOGIN_BLOCK_SECONDS=600,
        **EVERY_LISTENER_ON_A_FREE_PORT,
    )
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


def test_a_disabled_users_mailboxes_are_refused_over_imap_pop3_and_smtp(
    app: Flask,
    owner: User,
    peers: Any,
    mail: MailClients,
    web: FlaskClient,
) -> None:
    user = users.create_user(f"leaver-{secrets.token_hex(3)}@example.org", "leaver-pass-1", False)
    account = link_with_client_credentials(user, peers, "leaver")
    mail.imap(account.address, PASSWORD).logout()  # works, and is now in the auth cache

    answer = post_form(web, f"/admin/users/{user.id}/disable", {}, form_page="/admin/users")

    assert answer.status_code == 302
    assert not User.get_by_id(user.id).is_enabled
    for protocol in ("imap", "pop3", "smtp"):
        said = mail.refusal(protocol, account.address, PASSWORD)
        assert "disabled" in said.lower(), (protocol, said)
    event = AuditEvent.get(AuditEvent.action == "user.disabled")
    assert (event.actor_email, event.target) == (ADMIN_EMAIL, user.email)


def test_failures_from_one_ip_block_it_across_addresses(
    owner: User,
    peers: Any,
    mail: MailClients,
) -> None:
    """Guessing one password for many addresses: the per-IP count blocks the IP, so even the
    right password of another mailbox waits (the per-address limit is out of reach here)."""
    account = link_with_client_credentials(owner, peers, "per-ip")
    for n in range(PER_IP_LIMIT):
        said = mail.refusal("imap", f"guess-{n}@example.test", WRONG)
        assert WORDS["credentials"]["imap"] in said

    blocked = mail.refusal("imap", account.address, PASSWORD)

    assert "try again in" in blocked.lower(), blocked
    per_ip = throttle.Key("mail:ip:127.0.0.1", throttle.Policy(PER_IP_LIMIT, 1))
    assert throttle.retry_after([per_ip]) > 0


def test_a_fresh_token_the_mail_server_refuses_is_recorded_for_that_protocol(
    owner: User,
    peers: Any,
    mail: MailClients,
    web: FlaskClient,
) -> None:
    """The mailbox permission is gone (the token is good, but not for this mailbox): the proxy
    refreshes once, the server refuses the fresh token too, and the refusal is recorded for IMAP
    with its cause, so later logins get the reason without hammering the provider. The grant
    itself still works: only the token endpoint's refusal marks an account for re-authorizing."""
    account = link_with_client_credentials(owner, peers, "perm")
    elsewhere = f"moved-{secrets.token_hex(4)}@example.test"
    Account.update(address=elsewhere).where(Account.id == account.id).execute()
    # its password's lookup digest names the old address: found the way older passwords are
    MailPassword.update(lookup=None).where(MailPassword.account == account.id).execute()
    rejected = {"protocol": "imap", "reason": "token_rejected"}
    before = metric(web, "mailproxy_upstream_errors_total", **rejected)

    said = mail.refusal("imap", elsewhere, PASSWORD)

    stored = Account.get_by_id(account.id)
    refusal = mailrefusals.states(stored).get("imap")
    assert refusal is not None, (said, stored.protocol_state)
    assert refusal.title in said or refusal.cause in said, said
    assert stored.status == "active"
    assert metric(web, "mailproxy_upstream_errors_total", **rejected) == before + 1


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_the_upstream_starttls_comes_before_the_token(
    owner: User,
    peers: Any,
    mail: MailClients,
    protocol: str,
) -> None:
    """Upstream STARTTLS on each protocol: the peer, like real providers, refuses a token sent
    in clear, so a proxy that skipped (or botched) STARTTLS could not log in."""
    account = link_with_client_credentials(owner, peers, f"stls-{protocol}")
    plain_ports = {"imap": peers.imap_port, "pop3": peers.pop3_port, "smtp": peers.submission_port}
    OAuthClient.update(
        {
            f"{protocol}_host": peers.mail_host,
            f"{protocol}_port": plain_ports[protocol],
            f"{protocol}_security": "starttls",
        }
    ).where(OAuthClient.id == account.client.id).execute()

    if protocol == "imap":
        conn = mail.imap(account.address, PASSWORD)
        assert b"Seed message 1" in read_first_message(conn)
        conn.logout()
    elif protocol == "pop3":
        conn3 = mail.pop3(account.address, PASSWORD)
        assert conn3.stat()[0] == 2
        conn3.quit()
    else:
        subject = f"over upstream STARTTLS {secrets.token_hex(4)}"
        smtp = mail.smtp(account.address, PASSWORD)
        smtp.send_message(message(account.address, subject))
        smtp.quit()
        assert peers.wait_for_message(account.address, subject)


def test_a_disabled_user_is_signed_out_and_their_sign_in_is_refused_and_audited(
    app: Flask,
) -> None:
    client = app.test_client()
    user = users.create_user(f"web-{secrets.token_hex(3)}@example.org", "web-user-pass-1", False)
    actions = AuthActions(app, client)
    assert actions.login(user.email, "web-user-pass-1").status_code == 302
    assert client.get("/settings/").status_code == 200
    users.set_enabled(User.get_by_id(user.id), False)

    answer = client.get("/settings/")

    assert answer.status_code == 302 and "/login" in answer.headers["Location"]
    refused = actions.login(user.email, "web-user-pass-1")
    assert refused.status_code == 401  # the form again, with the reason
    assert "disabled" in refused.get_data(as_text=True).lower()
    event = AuditEvent.get(AuditEvent.action == "login.disabled")
    assert event.actor_email == user.email and event.ip
