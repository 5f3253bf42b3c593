"""Linking mailboxes against the real peers: the OAuth server, Dovecot (IMAP) and its CA.

The product is pointed at the peers only through its normal interfaces: an "Other (custom
server)" OAuth client with the peer's URLs and mail servers, and ``UPSTREAM_CA_FILE``. The OAuth
server is driven over HTTP here (its login and consent forms); ``test_linking_browser.py`` does
the same with real Chromium. The helpers shared by the linking tests are in
``tests/helpers/linking.py``.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
import requests
from flask import Flask

from mailboxes import linking, upkeep, verification
from models import (
    Account,
    AuditEvent,
    MailPassword,
    PendingAuthorization,
    utcnow,
)
from oauth import errors as oauth_errors
from oauth import tokens
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.helpers.linking import (
    REDIRECT,
    PeerInfo,
    link_by_code,
    mailbox,
    op_sign_in,
    path_and_query,
    peer_client,
    query_of,
    register,
    revoke_at_op,
    signed_in_user,
    token_requests,
)
from tests.helpers.web import AuthActions, post_form

# ---------------------------------------------------------------------------------- tests

pytestmark = pytest.mark.peers


def test_authorization_code_links_and_verifies(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    auth = AuthActions(peer_app, client)
    user = signed_in_user(auth, "ann@example.org")
    reg = register(peer)
    oauth_client = peer_client(user, peer, reg)
    address = mailbox("ann")

    done, _ = link_by_code(client, peer, oauth_client, address)

    assert done.status_code == 302
    account = Account.get(Account.address == address)
    assert done.headers["Location"].endswith(f"/accounts/{account.id}")
    assert account.status == "active", account.status_detail
    assert account.owner_id == user.id and account.client_id == oauth_client.id
    assert account.refresh_token and account.access_token
    assert account.stored("access_token") != account.access_token.encode()  # stored encrypted
    page = client.get(done.headers["Location"]).get_data(as_text=True)
    assert "Set the password your mail clients will use" in page
    assert account.access_token not in page and account.refresh_token not in page
    assert AuditEvent.select().where(AuditEvent.action == "account.linked").count() == 1


def test_client_credentials_links_without_a_browser(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "cc@example.org")
    address = mailbox("cc")
    reg = register(peer, mailbox=address)
    oauth_client = peer_client(user, peer, reg, grant="client_credentials", scope="mail")

    answer = post_form(
        client,
        "/accounts/new",
        {"address": address, "provider": "other", "client": str(oauth_client.id)},
        form_page=f"/accounts/new?address={address}",
    )

    assert answer.status_code == 302
    account = Account.get(Account.address == address)
    assert account.status == "active", account.status_detail
    assert account.refresh_token is None and account.access_token


def test_client_credentials_for_the_wrong_mailbox_explains_exchange_steps(
    peer_app: Flask, peer: PeerInfo
) -> None:
    user = AuthActions(peer_app, peer_app.test_client()).create_user("w@example.org", True)
    reg = register(peer, mailbox=mailbox("someone"))
    oauth_client = peer_client(user, peer, reg, grant="client_credentials", scope="mail")
    address = mailbox("other")

    started = linking.start(user, address, oauth_client, REDIRECT)

    assert started.done is not None and not started.done.ok
    account = Account.get(Account.address == address)
    assert account.status == "error"
    assert "Add-MailboxPermission" in account.status_detail


def test_code_replay_is_rejected_and_changes_nothing(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "rep@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("rep")
    _, back = link_by_code(client, peer, oauth_client, address)
    before = Account.get(Account.address == address)

    again = client.get(path_and_query(back))

    assert again.status_code == 400
    assert "already used" in again.get_data(as_text=True)
    after = Account.get(Account.address == address)
    assert after.token_version == before.token_version
    assert after.refresh_token == before.refresh_token


def test_reused_code_with_a_new_state_is_refused_by_the_provider(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "reuse@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("reuse")
    _, back = link_by_code(client, peer, oauth_client, address)
    before = Account.get(Account.address == address)
    fresh = linking.start(user, address, oauth_client, REDIRECT)
    state = query_of(fresh.url)["state"]

    answer = client.get(f"/authorize?code={query_of(back)['code']}&state={state}")

    assert answer.status_code == 400
    assert "no longer valid" in answer.get_data(as_text=True)
    after = Account.get(Account.address == address)
    assert (after.status, after.token_version) == ("active", before.token_version)


def test_tampered_state_is_rejected_and_changes_nothing(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "tamper@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("tamper")
    started = linking.start(user, address, oauth_client, REDIRECT)
    back = op_sign_in(peer, started.url, address)
    args = query_of(back)

    answer = client.get(f"/authorize?code={args['code']}&state={args['state'][:-2]}xx")

    assert answer.status_code == 400
    assert "No authorization is waiting" in answer.get_data(as_text=True)
    account = Account.get(Account.address == address)
    assert account.status == "pending" and account.access_token is None
    assert PendingAuthorization.get(PendingAuthorization.state == args["state"]).consumed_at is None


def test_callback_without_pending_authorization(peer_app: Flask) -> None:
    client = peer_app.test_client()
    AuthActions(peer_app, client).login()
    answer = client.get("/authorize?code=abc&state=nothing-pending")
    assert answer.status_code == 400
    assert "No authorization is waiting" in answer.get_data(as_text=True)
    assert Account.select().count() == 0


def test_state_of_another_user_is_not_accepted(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    auth = AuthActions(peer_app, client)
    other = auth.create_user("victim@example.org", True)
    signed_in_user(auth, "thief@example.org")
    started = linking.start(other, mailbox("v"), peer_client(other, peer, register(peer)), REDIRECT)
    state = query_of(started.url)["state"]

    answer = client.get(f"/authorize?code=x&state={state}")

    assert answer.status_code == 400
    assert PendingAuthorization.get(PendingAuthorization.state == state).consumed_at is None


def test_provider_denial_is_explained(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "deny@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("deny")
    started = linking.start(user, address, oauth_client, REDIRECT)

    back = op_sign_in(peer, started.url, address, approve=False)
    answer = client.get(path_and_query(back))

    page = answer.get_data(as_text=True)
    assert answer.status_code == 400 and "declined" in page
    assert Account.get_or_none(Account.address == address) is None  # nothing left behind


def test_token_response_without_refresh_token_changes_nothing(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "norefresh@example.org")
    reg = register(peer, grant_types=["authorization_code"])
    oauth_client = peer_client(user, peer, reg)
    address = mailbox("nort")

    answer, _ = link_by_code(client, peer, oauth_client, address)

    assert answer.status_code == 400
    assert "no refresh token" in answer.get_data(as_text=True)
    assert Account.get_or_none(Account.address == address) is None


def test_address_linked_by_another_user_is_refused_only_after_the_provider_let_you_in(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    auth = AuthActions(peer_app, client)
    first = auth.create_user("first@example.org", True)
    address = mailbox("taken")
    reg = register(peer, mailbox=address)
    linking.start(first, address, peer_client(first, peer, reg, grant="client_credentials"), "")
    before = Account.get(Account.address == address)
    second = signed_in_user(auth, "second@example.org")
    mine = peer_client(second, peer, register(peer))

    # Starting looks the same as for any address: off to the provider, nothing told yet.
    answer, _ = link_by_code(client, peer, mine, address)

    assert answer.status_code == 409
    assert "already linked in this instance" in answer.get_data(as_text=True)
    after = Account.get(Account.address == address)
    assert after.owner_id == first.id and after.status == before.status
    assert after.__data__["refresh_token"] == before.__data__["refresh_token"]
    assert after.__data__["access_token"] == before.__data__["access_token"]


def test_reauthorize_after_invalid_grant_returns_to_active_and_keeps_passwords(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "again@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("again")
    link_by_code(client, peer, oauth_client, address)
    account = Account.get(Account.address == address)
    linking.add_password(user, account, "laptop", "correct horse battery")
    revoke_at_op(peer, email=address)
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)
    assert Account.get_by_id(account.id).status == "needs_reauth"
    assert "Re-authorize" in client.get("/").get_data(as_text=True)

    start = post_form(client, f"/accounts/{account.id}/reauthorize", {}, form_page="/")
    assert start.status_code == 302
    back = op_sign_in(peer, start.headers["Location"], address)
    done = client.get(path_and_query(back))

    assert done.status_code == 302
    again = Account.get_by_id(account.id)
    assert again.status == "active" and again.status_detail == ""
    assert MailPassword.select().where(MailPassword.account == account).count() == 1
    assert tokens.get_access_token(account.id) == again.access_token


def test_unlink_revokes_at_the_provider_and_deletes_everything(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "bye@example.org")
    reg = register(peer)
    oauth_client = peer_client(user, peer, reg)
    address = mailbox("bye")
    link_by_code(client, peer, oauth_client, address)
    account = Account.get(Account.address == address)
    refresh = account.refresh_token
    linking.add_password(user, account, "phone", "correct horse battery")

    answer = post_form(client, f"/accounts/{account.id}/unlink", {"address": address})

    assert answer.status_code == 302
    assert Account.get_or_none(Account.id == account.id) is None
    assert MailPassword.select().count() == 0
    gone = requests.post(
        peer.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh},
        auth=(reg["client_id"], reg["client_secret"]),
        timeout=10,
    )
    assert gone.status_code == 400 and gone.json()["error"] == "invalid_grant"
    event = AuditEvent.get(AuditEvent.action == "account.unlinked")
    assert event.target == address and refresh not in event.detail


def test_verification_fails_when_the_mail_server_refuses(peer_app: Flask, peer: PeerInfo) -> None:
    user = AuthActions(peer_app, peer_app.test_client()).create_user("v@example.org", True)
    address = mailbox("verify")
    reg = register(peer, mailbox=address)
    # Right token, wrong server port: the IMAP check must fail and say so.
    oauth_client = peer_client(
        user, peer, reg, grant="client_credentials", imap_port=peer.pop3s_port
    )

    started = linking.start(user, address, oauth_client, REDIRECT)

    assert started.done is not None and not started.done.ok
    assert Account.get(Account.address == address).status == "error"


def test_password_grant_links_when_the_admin_allows_it(peer_app: Flask, peer: PeerInfo) -> None:
    """The legacy Resource Owner Password grant, at a real token endpoint, verified by IMAP."""
    admin_web = peer_app.test_client()
    AuthActions(peer_app, admin_web).login(ADMIN_EMAIL, ADMIN_PASSWORD)
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "ropc@example.org")
    reg = register(peer, grant_types=["password", "refresh_token"])
    oauth_client = peer_client(user, peer, reg, grant="password", scope="openid email mail")
    address = mailbox("ropc")
    form = {"address": address, "provider": "other", "client": str(oauth_client.id)}
    page = f"/accounts/new?address={address}"

    assert 'name="password"' not in client.get(page).get_data(as_text=True)
    refused = post_form(client, "/accounts/new", {**form, "password": "pw-x"}, form_page=page)
    assert refused.status_code in (400, 404)
    assert Account.get_or_none(Account.address == address) is None

    allowed = post_form(
        admin_web,
        "/admin/settings",
        {"allow_ropc": "y", "new_users_custom_clients": "y"},
        form_page="/admin/settings",
    )
    assert allowed.status_code == 302
    assert 'name="password"' in client.get(page).get_data(as_text=True)
    wrong = post_form(client, "/accounts/new", {**form, "password": "not-it"}, form_page=page)
    assert Account.get_or_none(Account.address == address) is None
    assert "The user name or password was refused" in wrong.get_data(as_text=True)
    assert "not-it" not in wrong.get_data(as_text=True)

    local = address.split("@")[0]
    linked = post_form(client, "/accounts/new", {**form, "password": f"pw-{local}"}, form_page=page)

    assert linked.status_code == 302
    account = Account.get(Account.address == address)
    assert account.status == "active", account.status_detail
    assert account.refresh_token and account.access_token
    assert f"pw-{local}" not in client.get(f"/accounts/{account.id}").get_data(as_text=True)


def test_shared_mailbox_is_linked_with_a_delegates_sign_in(peer_app: Flask, peer: PeerInfo) -> None:
    """The mailbox address differs from who signed in; it is what goes into XOAUTH2's user=."""
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "deleg@example.org")
    delegate, shared = mailbox("delegate"), mailbox("shared")
    reg = register(peer, delegate=delegate, delegated_mailbox=shared)
    oauth_client = peer_client(user, peer, reg)
    started = linking.start(user, shared, oauth_client, REDIRECT)
    assert started.url

    back = op_sign_in(peer, started.url, delegate)
    account, result = linking.complete_callback(user, query_of(back), REDIRECT)

    assert result.ok, result.message
    account = Account.get_by_id(account.id)
    assert account.address == shared and account.signed_in_as == delegate
    assert account.status == "active"
    page = client.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert delegate in page


def test_failed_reauthorization_keeps_the_working_tokens(peer_app: Flask, peer: PeerInfo) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "keep@example.org")
    oauth_client = peer_client(user, peer, register(peer))
    address = mailbox("keep")
    link_by_code(client, peer, oauth_client, address)
    before = Account.get(Account.address == address)
    assert before.status == "active"

    start = post_form(client, f"/accounts/{before.id}/reauthorize", {}, form_page="/")
    # The person signs in as someone else: a token for another mailbox fails the IMAP check.
    back = op_sign_in(peer, start.headers["Location"], mailbox("other"))
    done = client.get(path_and_query(back), follow_redirects=True)

    page = done.get_data(as_text=True)
    assert "signing in failed" in page and "was not saved" in page
    after = Account.get_by_id(before.id)
    assert after.refresh_token == before.refresh_token
    assert after.access_token == before.access_token
    assert after.status == "active" and after.signed_in_as == before.signed_in_as
    assert verification.verify(after).ok
    assert tokens.get_access_token(after.id, force_refresh=True) != before.access_token


def test_another_users_placeholder_does_not_block_the_address(
    peer_app: Flask, peer: PeerInfo
) -> None:
    auth = AuthActions(peer_app, peer_app.test_client())
    first = auth.create_user("left@example.org", True)
    second = auth.create_user("next@example.org", True)
    address = mailbox("left")
    left = linking.start(first, address, peer_client(first, peer, register(peer)), REDIRECT)
    mine = peer_client(second, peer, register(peer))

    started = linking.start(second, address, mine, REDIRECT)  # the first may still come back
    back = op_sign_in(peer, started.url, address)
    account, result = linking.complete_callback(second, query_of(back), REDIRECT)

    assert result.ok, result.message
    assert Account.linked_at(address).owner_id == second.id
    late = op_sign_in(peer, left.url, address)  # the first comes back: too late
    with pytest.raises(oauth_errors.AuthorizationProblem, match="already linked"):
        linking.complete_callback(first, query_of(late), REDIRECT)
    assert [a.owner_id for a in Account.select().where(Account.address == address)] == [second.id]


def test_upkeep_deletes_old_abandoned_placeholders(peer_app: Flask, peer: PeerInfo) -> None:
    user = AuthActions(peer_app, peer_app.test_client()).create_user("old@example.org", True)
    client = peer_client(user, peer, register(peer))
    old = utcnow() - dt.timedelta(hours=2)

    def placeholder(name: str, created: dt.datetime) -> Account:
        return Account.create(
            owner=user, address=f"{name}@example.test", provider="other", client=client,
            created_at=created,
        )  # fmt: skip

    gone = placeholder("gone", old)
    recent = placeholder("recent", utcnow())
    waiting = placeholder("waiting", old)
    PendingAuthorization.create(
        state="still-waiting", owner=user, account=waiting, client=client, code_verifier="v",
        expires_at=utcnow() + dt.timedelta(minutes=5),
    )  # fmt: skip
    linked = placeholder("linked", old)
    tokens.store_tokens(linked, {"access_token": "a", "refresh_token": "r", "expires_in": 3600})

    upkeep.refresh_idle_accounts()

    assert Account.get_or_none(Account.id == gone.id) is None
    for kept in (recent, waiting, linked):
        assert Account.get_or_none(Account.id == kept.id) is not None


def test_device_code_page_is_read_only_and_completes_by_post(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    user = signed_in_user(AuthActions(peer_app, client), "device@example.org")
    reg = register(peer)
    oauth_client = peer_client(user, peer, reg, grant="device_code")
    address = mailbox("device")
    start = post_form(
        client,
        "/accounts/new",
        {"address": address, "provider": "other", "client": str(oauth_client.id)},
        form_page=f"/accounts/new?address={address}",
    )
    assert start.status_code == 302
    page_url = start.headers["Location"]
    page = client.get(page_url)
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and "Refresh" not in page.headers
    assert 'id="device-check"' in text and "device.js" in text and "<script>" not in text
    code = re.search(r'value="([^"]+)" id="user-code"', text)
    assert code is not None
    peer.approve_device(code.group(1), address)
    before = token_requests(peer, reg["client_id"])

    client.get(page_url)  # looking at the page changes nothing
    assert token_requests(peer, reg["client_id"]) == before
    assert Account.get(Account.address == address).status == "pending"
    assert client.post(page_url).status_code == 400  # no CSRF token
    done = post_form(client, page_url, {})

    assert done.status_code == 302 and "/device/" not in done.headers["Location"]
    assert Account.get(Account.address == address).status == "active"
    assert client.get(page_url).status_code == 302  # finished: on to the account's page


def test_a_taken_address_by_device_code_is_refused_when_the_device_is_approved(
    peer_app: Flask, peer: PeerInfo
) -> None:
    client = peer_app.test_client()
    auth = AuthActions(peer_app, client)
    first = auth.create_user("holder@example.org", True)
    address = mailbox("takendev")
    reg = register(peer, mailbox=address)
    linking.start(first, address, peer_client(first, peer, reg, grant="client_credentials"), "")
    second = signed_in_user(auth, "devicer@example.org")
    mine = peer_client(second, peer, register(peer), grant="device_code")
    start = post_form(
        client,
        "/accounts/new",
        {"address": address, "provider": "other", "client": str(mine.id)},
        form_page=f"/accounts/new?address={address}",
    )
    assert start.status_code == 302  # the device page, as for any address
    page = client.get(start.headers["Location"])
    assert page.status_code == 200
    code = re.search(r'value="([^"]+)" id="user-code"', page.get_data(as_text=True))
    assert code is not None
    peer.approve_device(code.group(1), address)

    done = post_form(client, start.headers["Location"], {})

    assert done.status_code == 409
    assert "already linked in this instance" in done.get_data(as_text=True)
    account = Account.get(Account.address == address)
    assert account.owner_id == first.id and account.status == "active"
