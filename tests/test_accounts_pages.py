"""The accounts screens without the peers: pages, passwords, ownership, error explanations."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playhouse.shortcuts import model_to_dict

from mailboxes import linking, upkeep, verification
from models import Account, AuditEvent, MailPassword, PendingAuthorization, User
from oauth import clients as oauth_clients
from oauth import errors as oauth_errors
from people import users
from people.passwords import verify_password
from tests.helpers.accounts import make_account, make_client
from tests.helpers.app import USER_PASSWORD
from tests.helpers.web import AuthActions, post_form

REDIRECT = "http://127.0.0.1:8080/authorize"


def test_home_lists_accounts_with_status_and_attention(client: FlaskClient, alice: User) -> None:
    team = make_client(alice, secret_expires_on=dt.date.today() + dt.timedelta(days=3))
    make_account(alice, "ok@example.com", team, status="active", bytes_relayed=2048)
    make_account(
        alice, "stale@example.com", team, status="needs_reauth", status_detail="grant revoked"
    )

    page = client.get("/").get_data(as_text=True).replace("<wbr>", "")  # wrap points

    assert "ok@example.com" in page and "stale@example.com" in page
    assert "Needs re-authorization" in page and "Active" in page
    assert "2.0 kB" in page and "Team app" in page
    assert 'id="attention"' in page and "grant revoked" in page
    assert "expires in 3 days" in page
    assert "access-secret" not in page and "refresh-secret" not in page


def test_empty_home_offers_add_account(client: FlaskClient, alice: User) -> None:
    page = client.get("/").get_data(as_text=True)
    assert "Add account" in page and "No mailbox is linked yet" in page


def test_authorization_page_guesses_the_provider(client: FlaskClient, alice: User) -> None:
    page = client.get("/accounts/new?address=Someone@Gmail.com").get_data(as_text=True)
    assert '<option selected value="google">' in page
    assert "no default client for Google" in page
    changed = client.get("/accounts/new?address=someone@gmail.com&provider=outlook")
    assert '<option selected value="outlook">' in changed.get_data(as_text=True)


def test_authorization_page_main_button_uses_the_default_client(
    app: Flask, client: FlaskClient, alice: User
) -> None:
    admin = User.by_email("admin@example.org")
    google = make_client(admin, name="Company Google", provider="google", shared=True)
    oauth_clients.set_default_client("google", google)
    own = make_client(alice, name="My own app")

    page = client.get("/accounts/new?address=someone@gmail.com").get_data(as_text=True)

    assert "Authorize with Company Google" in page
    assert f'value="{own.id}"' in page and "My own app" in page
    answer = post_form(
        client,
        "/accounts/new",
        {"address": "someone@gmail.com", "provider": "google", "client": "default"},
        form_page="/accounts/new?address=someone@gmail.com",
    )
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location.startswith("https://login.example.com/authorize?")
    assert "code_challenge_method=S256" in location and "access_type=offline" in location
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Fauthorize" in location
    pending = PendingAuthorization.get()
    assert pending.state in location and pending.code_verifier not in location
    assert Account.get(Account.address == "someone@gmail.com").status == "pending"


def test_no_default_client_is_a_clear_error(client: FlaskClient, alice: User) -> None:
    answer = post_form(
        client,
        "/accounts/new",
        {"address": "someone@gmail.com", "provider": "google", "client": "default"},
        form_page="/accounts/new?address=someone@gmail.com",
    )
    assert answer.status_code == 400
    assert "no default client" in answer.get_data(as_text=True)
    assert Account.select().count() == 0


def test_someone_elses_private_client_cannot_be_used(
    app: Flask, client: FlaskClient, auth: AuthActions, alice: User
) -> None:
    bob = auth.create_user("bob@example.org", can_custom_clients=True)
    private = make_client(bob, name="Bob's app")
    page = client.get("/accounts/new?address=x@example.com").get_data(as_text=True)
    assert "Bob&#39;s app" not in page
    answer = post_form(
        client,
        "/accounts/new",
        {"address": "x@example.com", "provider": "other", "client": str(private.id)},
        form_page="/accounts/new?address=x@example.com",
    )
    assert answer.status_code == 400 and "not available" in answer.get_data(as_text=True)
    assert Account.select().count() == 0


def test_mail_password_entered_twice(client: FlaskClient, alice: User) -> None:
    account = make_account(alice, "pw@example.com", make_client(alice), status="active")
    path = f"/accounts/{account.id}/passwords"
    page = f"/accounts/{account.id}"
    assert "Set the password your mail clients will use" in client.get(page).get_data(as_text=True)

    mismatch = post_form(
        client, path, {"label": "Laptop", "password": "a" * 14, "confirm": "b" * 14}, page
    )
    assert mismatch.status_code == 400 and "do not match" in mismatch.get_data(as_text=True)
    short = post_form(client, path, {"label": "Laptop", "password": "abc", "confirm": "abc"}, page)
    assert short.status_code == 400 and "at least" in short.get_data(as_text=True)
    assert MailPassword.select().count() == 0

    good = "correct horse battery staple"
    saved = post_form(client, path, {"label": "Laptop", "password": good, "confirm": good}, page)

    assert saved.status_code == 302
    stored = MailPassword.get()
    assert stored.label == "Laptop" and stored.password_hash.startswith("$argon2id$")
    assert verify_password(stored.password_hash, good)
    assert good not in client.get(page).get_data(as_text=True)


def test_generated_password_is_shown_once(client: FlaskClient, alice: User) -> None:
    account = make_account(alice, "gen@example.com", make_client(alice), status="active")
    page = f"/accounts/{account.id}"

    answer = post_form(
        client, f"{page}/passwords", {"label": "Phone", "generate": "y"}, form_page=page
    )

    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    shown_html = text.split('id="shown-password" aria-label="New password">')[1].split("</p>")[0]
    shown = re.sub(r"<[^>]+>", "", shown_html)
    assert len(shown) >= 20 and shown_html.count('class="group"') >= 4
    assert verify_password(MailPassword.get().password_hash, shown)
    assert answer.headers["Cache-Control"] == "no-store"
    assert shown not in client.get(page).get_data(as_text=True)
    assert not any(shown in e.detail for e in AuditEvent.select())


def test_several_passwords_and_revoking_one(client: FlaskClient, alice: User) -> None:
    account = make_account(alice, "multi@example.com", make_client(alice), status="active")
    laptop = linking.add_password(alice, account, "Laptop", "laptop-password-1")
    linking.add_password(alice, account, "Scanner", "scanner-password-1")
    scanner = MailPassword.get(MailPassword.label == "Scanner")
    page = f"/accounts/{account.id}"
    assert "Laptop" in client.get(page).get_data(as_text=True)

    answer = post_form(client, f"{page}/passwords/{scanner.id}/revoke", {}, form_page=page)

    assert answer.status_code == 302
    assert [p.label for p in MailPassword.select()] == ["Laptop"]
    assert verify_password(MailPassword.get().password_hash, laptop)
    assert AuditEvent.get(AuditEvent.action == "account.password_revoked").detail == "Scanner"


def test_ownership_matrix_every_account_route_is_404(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    auth.setup_admin()
    owner = auth.create_user("owner@example.org", can_custom_clients=True)
    team = make_client(owner)
    theirs = make_account(owner, "theirs@example.com", team, status="active")
    linking.add_password(owner, theirs, "Laptop", "owner-mail-password")
    their_password = MailPassword.get()
    pending = PendingAuthorization.create(
        state="device-state", owner=owner, account=theirs, client=team, device_code="dc",
        user_code="ABCD", verification_uri="https://x", expires_at=theirs.created_at
        + dt.timedelta(days=1),
    )  # fmt: skip
    intruder = auth.create_user("intruder@example.org", can_custom_clients=True)
    auth.logout()
    auth.login("intruder@example.org", USER_PASSWORD)
    mine = make_account(intruder, "mine@example.com", make_client(intruder, name="x"))
    before = (_row(Account.get_by_id(theirs.id)), MailPassword.select().count())
    events = AuditEvent.select().count()

    gets = [
        f"/accounts/{theirs.id}",
        f"/accounts/{theirs.id}/device/{pending.state}",
        f"/accounts/{theirs.id}/unlink",
        f"/accounts/{theirs.id}/passwords/{their_password.id}/revoke",
        f"/accounts/{mine.id}/passwords/{their_password.id}/revoke",
        f"/accounts/{theirs.id}/mail-client",
    ]
    posts = [
        f"/accounts/{theirs.id}/reauthorize",
        f"/accounts/{theirs.id}/test",
        f"/accounts/{theirs.id}/unlink",
        f"/accounts/{theirs.id}/passwords",
        f"/accounts/{theirs.id}/passwords/{their_password.id}/revoke",
        f"/accounts/{mine.id}/passwords/{their_password.id}/revoke",
        "/accounts/999999/unlink",
    ]
    for path in gets:
        assert client.get(path).status_code == 404, path
    for path in posts:
        data = {"label": "x", "generate": "y", "client": str(team.id)}
        assert post_form(client, path, data, form_page="/").status_code == 404, path

    assert (_row(Account.get_by_id(theirs.id)), MailPassword.select().count()) == before
    assert AuditEvent.select().count() == events
    assert "theirs@example.com" not in client.get("/").get_data(as_text=True)


def test_state_changes_need_csrf(client: FlaskClient, alice: User) -> None:
    account = make_account(alice, "csrf@example.com", make_client(alice), status="active")
    for path in ("unlink", "passwords", "reauthorize", "test"):
        assert client.post(f"/accounts/{account.id}/{path}").status_code == 400
    assert Account.get_or_none(Account.id == account.id) is not None


def test_unlink_without_revocation_endpoint_deletes_tokens_and_passwords(
    client: FlaskClient, alice: User
) -> None:
    account = make_account(alice, "gone@example.com", make_client(alice), status="active")
    linking.add_password(alice, account, "Laptop", "laptop-password-1")

    page = f"/accounts/{account.id}/unlink"
    wrong = post_form(client, page, {"address": "other@example.com"})
    assert wrong.status_code == 400 and "Type gone@example.com exactly" in wrong.get_data(True)
    assert Account.select().count() == 1
    answer = post_form(client, page, {"address": " Gone@Example.com "})

    assert answer.status_code == 302
    assert Account.select().count() == 0 and MailPassword.select().count() == 0
    assert AuditEvent.get(AuditEvent.action == "account.unlinked").target == "gone@example.com"


def test_address_of_another_user_is_refused_once_a_grant_arrives(app: Flask, alice: User) -> None:
    bob = users.create_user("bob2@example.org", USER_PASSWORD, True)
    bobs = make_account(bob, "bobs@example.com", make_client(bob, name="b"), status="active")
    mine = make_client(alice)
    started = linking.start(alice, "BOBS@example.com", mine, REDIRECT)
    assert started.url.startswith("https://login.example.com/authorize?")  # as for any address
    grant = {"access_token": "alices-access", "refresh_token": "alices-refresh"}
    with pytest.raises(oauth_errors.AuthorizationProblem, match="already linked") as refused:
        linking.finish(started.account, mine, grant, actor=alice)
    assert refused.value.status == 409
    after = Account.get_by_id(bobs.id)
    assert (after.owner_id, after.status, after.client_id) == (bob.id, "active", bobs.client_id)
    assert str(after.refresh_token) == "refresh-secret"


def test_upkeep_thread_starts_and_stops(app: Flask) -> None:
    worker = upkeep.Upkeep(interval=3600)
    worker.start()
    worker.stop(timeout=5)
    assert worker._thread is None


def test_plain_imap_is_refused_off_loopback() -> None:
    from mailproxy.backend import Endpoint

    with pytest.raises(verification.VerificationFailed, match="not loopback"):
        verification.check_imap(Endpoint("mail.example.com", 143, "plain"), "a@b.c", "token")


def test_xoauth2_user_is_the_mailbox_address() -> None:
    from mailproxy.backend import Endpoint

    imap = Endpoint("imap.example.com", 993, "tls")
    payload = verification.sasl_payload(imap, "XOAUTH2", "shared@example.com", "tok")
    assert payload == b"user=shared@example.com\x01auth=Bearer tok\x01\x01"
    bearer = verification.sasl_payload(imap, "OAUTHBEARER", "s@e.c", "t")
    assert bearer == b"n,a=s@e.c,\x01host=imap.example.com\x01port=993\x01auth=Bearer t\x01\x01"


@pytest.mark.parametrize(
    ("error", "description", "expected"),
    [
        ("access_denied", "", "declined"),
        ("invalid_request", "AADSTS50011: The redirect URI does not match", REDIRECT),
        ("invalid_client", "AADSTS7000215: Invalid client secret provided.", "Value"),
        (
            "invalid_client",
            "AADSTS7000222: The provided client secret keys are expired.",
            "expired",
        ),
        ("consent_required", "AADSTS65001: The user or administrator has not consented", "consent"),
        ("unauthorized_client", "AADSTS700016: Application not found in the directory", "tenant"),
        ("invalid_request", "AADSTS50194: Application is not configured as multi-tenant", "common"),
        ("invalid_client", "", "client ID or secret"),
        ("invalid_grant", "", "again"),
        ("something_new", "odd", "provider"),
    ],
)
def test_provider_errors_are_explained(error: str, description: str, expected: str) -> None:
    explanation = oauth_errors.explain(error, description, REDIRECT)
    text = f"{explanation.title} {explanation.cause} {explanation.fix}"
    assert expected in text
    assert explanation.detail == description


def _row(account: Account) -> dict:
    """Every column as stored (secrets as ciphertext)."""
    row = model_to_dict(account, recurse=False)
    return {**row, **{f.name: account.stored(f.name) for f in account.encrypted_fields()}}
