"""The dashboard's rules without a browser: one address rule, the authorization page's choices,
the first-run checklist, readable audit events with filters and pages, pending invitations,
the client editor's unused fields, unique ids, and the plain 400 page."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import linking, onboarding
from models import Account, AuditEvent, Invite, MailPassword, OAuthClient, User, utcnow
from oauth import clients as oauth_clients
from oauth import providers
from people import addresses, audit, users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD
from tests.helpers.web import AuthActions, post_form
from web import audit_view, timefmt

ROOT = Path(__file__).resolve().parent.parent


def make_client(owner: User, name: str = "Team app", **over: object) -> OAuthClient:
    values: dict[str, object] = {
        "owner": owner,
        "name": name,
        "provider": "other",
        "token_url": "https://login.example.test/token",
        "authorize_url": "https://login.example.test/authorize",
        "scope": "mail",
        "client_id": "cid",
        "client_secret": "client-secret",
        **over,
    }
    return OAuthClient.create(**values)


# --- One address rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["admin@example.test", "it@corp.local", "Ops@Mail.Internal", "a.b+tag@sub.example.lan"],
)
def test_special_use_domains_are_addresses(address: str) -> None:
    assert addresses.normalize(f"  {address} ") == address.lower()


@pytest.mark.parametrize(
    "address", ["", "admin", "admin@", "@example.test", "a@b", "a b@example.test", "a@@b.test"]
)
def test_what_is_not_an_address(address: str) -> None:
    assert not addresses.is_valid(address)


def test_create_admin_with_an_internal_domain_can_sign_in(app: Flask, client: FlaskClient) -> None:
    runner = app.test_cli_runner()
    done = runner.invoke(
        args=["create-admin", "Admin@Example.Test", "--password-stdin"],
        input=ADMIN_PASSWORD + "\n",
    )
    assert done.exit_code == 0, done.output
    answer = post_form(
        client, "/login", {"email": "admin@example.test", "password": ADMIN_PASSWORD}
    )
    assert answer.status_code == 302 and answer.headers["Location"] == "/"


def test_create_admin_refuses_what_the_forms_refuse(app: Flask) -> None:
    runner = app.test_cli_runner()
    done = runner.invoke(args=["create-admin", "admin", "--password-stdin"], input="x" * 12 + "\n")
    assert done.exit_code != 0 and "Enter an email address" in done.output
    assert User.select().count() == 0


def test_the_same_rule_in_every_form(admin_client: FlaskClient) -> None:
    created = post_form(
        admin_client, "/admin/users", {"email": "dev@team.internal"}, form_page="/admin/users"
    )
    assert created.status_code == 201
    refused = post_form(admin_client, "/admin/users", {"email": "dev@team"})
    assert refused.status_code == 400 and addresses.MESSAGE in refused.get_data(as_text=True)
    page = admin_client.get("/accounts/new?address=box@team.internal").get_data(as_text=True)
    assert 'id="authorize-form"' in page


# --- The authorization page ------------------------------------------------------------------


@pytest.fixture
def admin(app: Flask, auth: AuthActions) -> User:
    auth.setup_admin()
    return User.get(User.email == ADMIN_EMAIL)


def test_the_default_is_the_one_primary_action_and_is_not_listed_twice(admin: User) -> None:
    team = make_client(admin, "Team", shared=True)
    mine = make_client(admin, "Mine")
    oauth_clients.set_default_client("other", team)

    options = onboarding.authorization_options(admin, "other")

    assert options.primary == team and options.primary_is_default
    assert [c.name for c in options.others] == ["Mine"] and mine in options.others


def test_the_only_usable_client_is_the_primary_action(admin: User, auth: AuthActions) -> None:
    user = auth.create_user("u@example.test")
    team = make_client(admin, "Team", shared=True)

    options = onboarding.authorization_options(user, "google")

    assert options.primary == team and not options.primary_is_default and not options.others


def test_an_unguessed_provider_still_offers_the_defaults(admin: User, auth: AuthActions) -> None:
    user = auth.create_user("u@example.test")
    default = make_client(admin, "Admin's own")  # not shared: a default serves all the same
    oauth_clients.set_default_client("other", default)

    assert onboarding.authorization_options(user, "").primary == default


def test_an_unguessed_provider_with_several_clients_asks_for_a_choice_in_one_sentence(
    admin: User, client: FlaskClient
) -> None:
    make_client(admin, "First")
    make_client(admin, "Second")

    page = client.get("/accounts/new?address=box@unknown.example").get_data(as_text=True)
    sentence = " ".join(page.split('id="no-default">')[1].split("</p>")[0].split())

    assert sentence == (
        "The provider could not be guessed from the address; choose it above, "
        "or choose one of the clients below."
    )
    assert 'class="primary"' not in page.split('id="authorize-form"')[1]


def test_nothing_usable_names_who_to_ask(
    admin: User, auth: AuthActions, client: FlaskClient
) -> None:
    auth.create_user("u@example.test")
    auth.logout()
    auth.login("u@example.test", USER_PASSWORD)

    home = client.get("/").get_data(as_text=True)
    page = client.get("/accounts/new?address=me@gmail.com").get_data(as_text=True)

    assert 'id="nothing-to-authorize"' in home and ADMIN_EMAIL in home
    assert 'id="who-to-ask"' in page and f"mailto:{ADMIN_EMAIL}" in page
    assert "add your own client" not in page  # no permission for custom clients
    assert 'class="primary"' not in page.split('id="authorize-form"')[1]


# --- The first-run checklist -----------------------------------------------------------------


def test_the_checklist_ticks_each_step_from_the_data(admin: User, client: FlaskClient) -> None:
    def ticked() -> list[str]:
        return [s.key for s in onboarding.first_run_steps(admin) if s.done]

    assert ticked() == []
    assert "No provider has a default client yet" in client.get("/").get_data(as_text=True)
    team = make_client(admin, "Team", shared=True)
    assert ticked() == ["share"]
    oauth_clients.set_default_client("other", team)
    assert ticked() == ["share", "default"]
    account = Account.create(owner=admin, address="a@example.test", provider="other", client=team)
    account.status = "active"
    account.save()
    assert ticked() == ["share", "default", "link"]
    linking.add_password(admin, account, "Laptop", "laptop-password-1")
    assert ticked() == ["share", "default", "link", "password"]
    MailPassword.update(last_used_at=utcnow()).execute()
    assert ticked() == ["share", "default", "link", "password", "mailclient"]
    page = client.get("/").get_data(as_text=True)
    assert 'id="first-run"' not in page and 'id="no-default-warning"' not in page


def test_a_provider_in_use_without_default_is_a_warning(admin: User, client: FlaskClient) -> None:
    team = make_client(admin, "Team", shared=True)
    oauth_clients.set_default_client("other", team)
    gmail = make_client(admin, "Google app", provider="google")
    Account.create(owner=admin, address="x@gmail.com", provider="google", client=gmail)

    warning = onboarding.missing_defaults()

    assert not warning.none_at_all and warning.providers == [providers.get("google").name]
    assert "No default client for Google" in client.get("/").get_data(as_text=True)


# --- The audit log ---------------------------------------------------------------------------


def _codes_in_source() -> set[str]:
    """Every event code the code base records (f-string codes expanded by hand below)."""
    found: set[str] = set()
    pattern = re.compile(
        r"""(?:record|record_request)\(\s*(?:audit\.record,\s*)?f?"([a-z_.{}]+)\""""
    )
    skip = {"tests", "bench", ".venv", "instance"}
    for path in [p for p in ROOT.rglob("*.py") if skip.isdisjoint(p.relative_to(ROOT).parts)]:
        found.update(pattern.findall(path.read_text()))
        found.update(re.findall(r'audit\.record,\s*"([a-z_.]+)"', path.read_text()))
    expanded = set()
    for code in found:
        if code == "client.{state}":
            expanded |= {"client.shared", "client.unshared"}
        elif code == "user.custom_clients_{state}":
            expanded |= {"user.custom_clients_granted", "user.custom_clients_withdrawn"}
        else:
            expanded.add(code)
    return expanded


def test_every_event_code_has_words() -> None:
    codes = _codes_in_source()
    assert {"login.failed", "mail.login_failed", "account.unlinked"} <= codes
    assert sorted(c for c in codes if c not in audit_view.WORDING) == []


def test_audit_page_in_words_with_filters_and_pages(
    admin: User, auth: AuthActions, client: FlaskClient
) -> None:
    for _ in range(120):
        audit.record("mail.login_failed", ip="198.51.100.1", target="box@example.test")
    old = AuditEvent.create(action="user.created", actor=admin, actor_email=ADMIN_EMAIL)
    AuditEvent.update(at=dt.datetime(2026, 1, 5, 12)).where(AuditEvent.id == old.id).execute()

    first = client.get("/admin/audit").get_data(as_text=True)
    third = client.get("/admin/audit?page=3").get_data(as_text=True)
    users_only = client.get("/admin/audit?kind=users").get_data(as_text=True)
    january = client.get("/admin/audit?since=2026-01-01&until=2026-01-31").get_data(as_text=True)
    by_user = client.get("/admin/audit?user=box@").get_data(as_text=True)

    assert "a mail program failed to sign in" in first
    assert ">mail.login_failed<" not in first  # the code only in the hover title
    assert first.count('data-action="') == audit_view.PAGE_SIZE and 'rel="next"' in first
    assert third.count('data-action="') == 121 + 1 - 2 * audit_view.PAGE_SIZE  # + the sign-in
    assert 'rel="next"' not in third and 'rel="prev"' in third
    assert users_only.count('data-action="') == 2 and "created a user" in users_only
    assert january.count('data-action="') == 1
    assert by_user.count('data-action="') == audit_view.PAGE_SIZE
    assert client.get("/admin/audit?page=x&since=nonsense&kind=evil").status_code == 200


def test_own_activity_shows_only_own_events(admin: User, client: FlaskClient) -> None:
    audit.record("mail.login_failed", target="someone-else@example.test")
    page = client.get("/settings/activity").get_data(as_text=True)
    assert "someone-else@example.test" not in page and "created the administrator" in page


# --- Pending invitations ---------------------------------------------------------------------


def test_pending_invites_new_link_and_revoke(admin: User, client: FlaskClient) -> None:
    first = users.create_invite("new@example.test", admin, False, 72)
    invite = Invite.get()
    listed = client.get("/admin/users").get_data(as_text=True).replace("<wbr>", "")
    assert "new@example.test" in listed and f"renew-invite-{invite.id}" in listed

    renewed = post_form(client, f"/admin/invites/{invite.id}/renew", {}, form_page="/admin/users")
    link = re.search(
        r'id="invite-link" type="text" readonly value="([^"]+)"', renewed.get_data(True)
    )
    assert renewed.status_code == 201 and link
    token = link.group(1).rsplit("/", 1)[1]
    assert users.find_invite(first) is None and users.find_invite(token) is not None

    revoked = post_form(client, f"/admin/invites/{invite.id}/revoke", {}, form_page="/admin/users")
    assert revoked.status_code == 302 and users.find_invite(token) is None
    assert Invite.select().count() == 0
    assert (
        post_form(client, f"/admin/invites/{invite.id}/revoke", {}, "/admin/users").status_code
        == 404
    )


def test_invite_actions_are_the_admins_only(
    admin: User, auth: AuthActions, client: FlaskClient
) -> None:
    users.create_invite("new@example.test", admin, False, 72)
    invite = Invite.get()
    target = auth.create_user("u@example.test")
    auth.logout()
    auth.login("u@example.test", USER_PASSWORD)
    for path in (f"/admin/invites/{invite.id}/renew", f"/admin/invites/{invite.id}/revoke"):
        assert post_form(client, path, {}, form_page="/settings/").status_code == 404
    assert client.get(f"/admin/users/{target.id}/disable").status_code == 404
    assert Invite.select().count() == 1


# --- The client editor -----------------------------------------------------------------------


def test_client_credentials_needs_a_real_tenant_and_shows_no_redirect_uri(
    admin_client: FlaskClient,
) -> None:
    form = {
        "name": "Daemon",
        "provider": "microsoft365",
        "grant": "client_credentials",
        "tenant": "organizations",
        **providers.defaults_for("microsoft365", "client_credentials", "organizations"),
        "authorize_url": "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
        "client_id": "00000000-aaaa-bbbb-cccc-000000000001",
        "client_secret": "s3cret",
        "submit": "Save client",
    }
    refused = post_form(admin_client, "/settings/clients/new", form)
    page = refused.get_data(as_text=True)
    assert (
        refused.status_code == 400
        and "Client Credentials needs your directory's own tenant" in page.replace("&#39;", "'")
    )
    assert 'id="error-summary"' in page
    redirect_block = page.split('id="setup-guide"')[1].split('id="redirect-uri"')[0]
    assert 'data-show-if="authorization_code" hidden' in redirect_block

    saved = post_form(
        admin_client, "/settings/clients/new", {**form, "tenant": "contoso.onmicrosoft.com"}
    )
    assert saved.status_code == 302
    client = OAuthClient.get(OAuthClient.name == "Daemon")
    assert client.authorize_url == "" and client.device_url == ""  # unused by the grant


def test_every_field_explains_itself(admin_client: FlaskClient) -> None:
    page = admin_client.get("/settings/clients/new").get_data(as_text=True)
    for label, words in (
        ("Permission URL", "where people sign in and allow access"),
        ("OAuth flow / grant", "How the mailbox's permission is obtained"),
        ("SASL mechanism", "How the token is handed to the mail server"),
    ):
        assert label in page and words in page.replace("&#39;", "'")


# --- Pages: ids, times, the expired form -----------------------------------------------------


def test_ids_are_unique_on_every_page(admin: User, client: FlaskClient) -> None:
    team = make_client(admin, "Team", shared=True)
    account = Account.create(
        owner=admin, address="a@example.test", provider="other", client=team, status="active"
    )
    linking.add_password(admin, account, "Laptop", "laptop-password-1")
    for path in (
        "/",
        "/settings/",
        "/settings/activity",
        "/settings/clients/new",
        f"/settings/clients/{team.id}/edit",
        f"/accounts/{account.id}",
        f"/accounts/{account.id}/mail-client",
        f"/accounts/{account.id}/unlink",
        "/accounts/new?address=b@example.test",
        "/admin/users",
        "/admin/settings",
        "/admin/audit",
    ):
        page = client.get(path).get_data(as_text=True)
        ids = Counter(re.findall(r'\sid="([^"]+)"', page))
        assert [i for i, n in ids.items() if n > 1] == [], path
        for target in re.findall(r'<label for="([^"]+)"', page):
            assert ids[target] == 1, (path, target)


def test_times_read_relative_with_utc_on_hover() -> None:
    now = dt.datetime(2026, 12, 1, 12, 0)
    assert timefmt.relative(now - dt.timedelta(minutes=2), now) == "2 minutes ago"
    assert timefmt.relative(now + dt.timedelta(hours=1, minutes=5), now) == "in 1 hour"
    assert timefmt.relative(now - dt.timedelta(seconds=5), now) == "just now"
    tag = timefmt.time_tag(now - dt.timedelta(days=3), now)
    assert 'title="2026-11-28 12:00 UTC"' in tag and ">3 days ago<" in tag


def test_an_expired_form_says_so_plainly(admin_client: FlaskClient) -> None:
    answer = admin_client.post("/settings/password", data={"csrf_token": "stale"})
    page = answer.get_data(as_text=True)
    assert answer.status_code == 400
    assert "This form expired" in page and "Reload the page and try again" in page
    assert "CSRF" not in page


def test_long_addresses_may_wrap_at_their_dots_only() -> None:
    from web.accounts import breakable

    assert breakable("a.b@c-d.test") == "a.<wbr>b@<wbr>c-<wbr>d.<wbr>test"
    assert breakable("<x>@y.z") == "&lt;x&gt;@<wbr>y.<wbr>z"
