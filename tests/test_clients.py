"""Custom OAuth clients: the editor, validation, the write-only secret, sharing, ownership,
deletion with dependent accounts, secret expiry warnings and the instance defaults."""

from __future__ import annotations

import datetime as dt
import html
import re
from typing import Any

import pytest

from models import Account, AuditEvent, OAuthClient, Setting, User
from oauth import clients as oauth_clients
from oauth import providers
from tests.helpers.app import USER_PASSWORD
from tests.helpers.clients import (
    APP_ID,
    M365,
    MICROSOFT_FORM,
    NEW,
    OTHER_FORM,
    SECRET,
    TENANT,
    add,
    field_help,
    one_client,
)
from tests.helpers.web import post_form

# --- helpers --------------------------------------------------------------------------------


def login_as(app, email: str, password: str = USER_PASSWORD):
    """A separate browser session signed in as ``email``."""
    browser = app.test_client()
    response = post_form(browser, "/login", {"email": email, "password": password})
    assert response.status_code == 302, response.get_data(as_text=True)
    return browser


def snapshot(app) -> dict[str, list[dict[str, Any]]]:
    with app.app_context():
        return {
            "clients": list(OAuthClient.select().order_by(OAuthClient.id).dicts()),
            "accounts": list(Account.select().order_by(Account.id).dicts()),
            "settings": list(Setting.select().order_by(Setting.key).dicts()),
        }


@pytest.fixture
def people(app, admin_client, auth):
    """The admin, alice and bob (both may add clients) and carol (may not)."""
    auth.create_user("alice@example.org", can_custom_clients=True)
    auth.create_user("bob@example.org", can_custom_clients=True)
    auth.create_user("carol@example.org", can_custom_clients=False)
    return {
        "admin": admin_client,
        "alice": login_as(app, "alice@example.org"),
        "bob": login_as(app, "bob@example.org"),
        "carol": login_as(app, "carol@example.org"),
    }


def user(app, email: str) -> User:
    with app.app_context():
        return User.by_email(email)


# --- the editor -----------------------------------------------------------------------------


def test_new_client_form_is_prefilled_with_the_presets_defaults(admin_client):
    page = admin_client.get(NEW).get_data(as_text=True)
    for label in (
        "Name",
        "Service provider",
        "OAuth flow / grant",
        "Permission URL",
        "Token URL",
        "OAuth scope",
        "Client ID",
        "Client secret",
        "Directory (tenant) ID",
        "Secret expires on",
    ):
        assert f">{label}</label>" in page
    organizations = providers.defaults_for("microsoft365", "authorization_code")
    assert f'value="{organizations["authorize_url"]}"' in page
    assert html.escape(organizations["scope"]) in page
    google = admin_client.get(NEW + "?provider=google").get_data(as_text=True)
    assert 'value="https://accounts.google.com/o/oauth2/v2/auth"' in google
    assert 'value="https://oauth2.googleapis.com/token"' in google


def test_editor_has_redirect_uri_with_copy_button_guides_and_script(admin_client, app):
    page = admin_client.get(NEW).get_data(as_text=True)
    assert 'id="redirect-uri" value="http://127.0.0.1:8080/authorize"' in page
    assert 'data-copy="#redirect-uri"' in page
    assert 'src="/static/clients.js"' in page
    assert '<script type="application/json" id="client-presets">' in page
    for text in (
        "App registrations",
        "<strong>Web</strong>",
        "IMAP.AccessAsApp",
        "POP.AccessAsApp",
        "SMTP.SendAsApp",
        "Grant admin consent",
        "<strong>Value</strong>",
        "New-ServicePrincipal",
        "Add-MailboxPermission",
        "Add-RecipientPermission",
        "Object ID of the Enterprise",
        "IMAP.AccessAsUser.All",
        "Gmail API",
        "Web application",
        "https://mail.google.com/",
        "consent screen",
    ):
        assert text in page, text
    # Only the guide of the current choice is shown without script.
    visible = re.findall(r'data-guide="([^"]+)" >', page)
    assert visible == ["microsoft365:authorization_code"]
    assert "style=" not in page and "<script>" not in page  # nothing inline, for the CSP


def test_add_microsoft_client_saves_the_preset_values(app, admin_client):
    response = add(admin_client, secret_expires_on="2030-01-31")
    assert response.status_code == 302
    assert response.location.endswith("/settings/#custom-clients")
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        saved = OAuthClient.get_by_id(saved.id)
        assert saved.owner.email == "admin@example.org"
        assert saved.provider == "microsoft365" and saved.grant == "authorization_code"
        assert saved.tenant == TENANT
        assert saved.authorize_url == M365["authorize_url"]
        assert saved.token_url == M365["token_url"]
        assert saved.scope == M365["scope"]
        assert saved.client_id == APP_ID
        assert saved.client_secret == SECRET
        assert saved.secret_set_at is not None
        assert saved.secret_expires_on == dt.date(2030, 1, 31)
        assert saved.shared is False
        assert providers.endpoints_for(saved)["smtp"].host == "smtp.office365.com"
        event = AuditEvent.get(AuditEvent.action == "client.created")
        assert SECRET not in event.detail + event.target


def test_add_custom_server_client_keeps_its_servers(app, admin_client):
    assert add(admin_client, provider="other").status_code == 302
    saved = one_client(app, name="Local IdP")
    endpoints = providers.endpoints_for(saved)
    assert (endpoints["imap"].host, endpoints["imap"].port, endpoints["imap"].security) == (
        "127.0.0.1",
        1430,
        "plain",
    )
    assert endpoints["smtp"].security == "starttls"
    assert providers.sasl_mechanism_for(saved) == "OAUTHBEARER"


def test_load_defaults_rerenders_the_defaults_without_saving(app, admin_client):
    response = post_form(
        admin_client,
        NEW,
        {
            **MICROSOFT_FORM,
            "provider": "microsoft365",
            "grant": "client_credentials",
            "token_url": "https://typed.example.org/token",
            "submit": "",
            "load_defaults": "Load defaults",
        },
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    cc = providers.defaults_for("microsoft365", "client_credentials", TENANT)
    assert f'value="{cc["token_url"]}"' in page
    assert "https://outlook.office365.com/.default" in page
    assert "typed.example.org" not in page
    assert re.findall(r'data-guide="([^"]+)" >', page) == ["microsoft365:client_credentials"]
    assert SECRET not in page
    with app.app_context():
        assert OAuthClient.select().count() == 0


def test_fields_still_at_a_default_follow_the_choice_on_save(app, admin_client):
    """Without script: switching provider and grant and saving stores the new defaults."""
    response = add(admin_client, grant="client_credentials", tenant="contoso.onmicrosoft.com")
    assert response.status_code == 302
    saved = one_client(app, name="Contoso Entra")
    expected = providers.defaults_for(
        "microsoft365", "client_credentials", "contoso.onmicrosoft.com"
    )
    assert saved.token_url == expected["token_url"]
    assert saved.scope == "https://outlook.office365.com/.default"
    assert saved.authorize_url == ""

    add(admin_client, name="Gmail", provider="google", client_id="123.apps.googleusercontent.com")
    google = one_client(app, name="Gmail")
    assert google.authorize_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert google.scope == "https://mail.google.com/" and google.tenant == ""


def test_typed_urls_are_kept(app, admin_client):
    add(admin_client, token_url="https://proxy.contoso.com/token", scope="custom.scope")
    saved = one_client(app, name="Contoso Entra")
    assert saved.token_url == "https://proxy.contoso.com/token"
    assert saved.scope == "custom.scope"


# --- validation -----------------------------------------------------------------------------

INVALID = [
    ({"name": ""}, "name", "Give the client a name."),
    ({"provider": "evil"}, "provider", "Not a valid choice."),
    ({"client_id": "not-a-guid"}, "client_id", "A Microsoft client ID is a GUID"),
    ({"client_id": ""}, "client_id", "Enter the client ID."),
    (
        {"client_secret": "", "grant": "client_credentials"},
        "client_secret",
        "Enter the client secret: with Client Credentials",
    ),
    ({"tenant": ""}, "tenant", "Enter the Directory (tenant) ID"),
    ({"tenant": "not a tenant!"}, "tenant", "A tenant is a GUID or a domain"),
    (
        {"tenant": "organizations", "grant": "client_credentials"},
        "tenant",
        "Client Credentials needs your directory's own tenant: “organizations”",
    ),
    (
        {"tenant": "common", "grant": "client_credentials"},
        "tenant",
        "Client Credentials needs your directory's own tenant: “common”",
    ),
    ({"token_url": "http://login.example.org/token"}, "token_url", "Use https://"),
    ({"authorize_url": "javascript:alert(1)"}, "authorize_url", "Enter a full URL"),
    ({"secret_expires_on": "next week"}, "secret_expires_on", "Enter a date like 2026-12-31."),
    (
        {"provider": "google", "grant": "client_credentials"},
        "grant",
        "Google (Gmail, Google Workspace) does not allow the Client Credentials grant.",
    ),
    (
        {"provider": "outlook", "grant": "password"},
        "grant",
        "does not allow the Resource Owner Password (legacy) grant.",
    ),
    ({"grant": "password"}, "grant", "The Resource Owner Password grant is turned off"),
    ({"grant": "implicit"}, "grant", "Not a valid choice."),
    ({"provider": "other", "authorize_url": ""}, "authorize_url", "Enter the Permission URL"),
    ({"provider": "other", "token_url": ""}, "token_url", "Enter the Token URL."),
    (
        {"provider": "other", "grant": "device_code", "device_url": ""},
        "device_url",
        "Enter the device authorization URL.",
    ),
    ({"provider": "other", "scope": "   "}, "scope", "Enter at least one scope."),
    ({"provider": "other", "imap_host": ""}, "imap_host", "Enter the IMAP server's host name."),
    ({"provider": "other", "pop3_host": "bad host!"}, "pop3_host", "Enter a host name or an IP"),
    ({"provider": "other", "smtp_port": ""}, "smtp_port", "Enter a port from 1 to 65535."),
    ({"provider": "other", "imap_port": "70000"}, "imap_port", "Enter a port from 1 to 65535."),
    (
        {"provider": "other", "smtp_security": "plain"},
        "smtp_security",
        "Plain connections are only allowed to a loopback host",
    ),
    (
        {"provider": "other", "revocation_url": "http://idp.example.org/revoke"},
        "revocation_url",
        "Use https://",
    ),
]


@pytest.mark.parametrize("overrides, name, message", INVALID)
def test_each_bad_input_is_explained_beside_its_field_and_nothing_is_saved(
    app, admin_client, overrides, name, message
):
    response = add(admin_client, **overrides)
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert message in field_help(page, name)
    assert 'aria-invalid="true"' in page
    assert SECRET not in page
    with app.app_context():
        assert OAuthClient.select().count() == 0


def test_names_are_unique_per_owner(app, people):
    assert add(people["alice"]).status_code == 302
    again = add(people["alice"])
    assert again.status_code == 400
    assert "You already have a client named “Contoso Entra”." in field_help(
        again.get_data(as_text=True), "name"
    )
    assert add(people["bob"]).status_code == 302  # another owner may use the name
    with app.app_context():
        assert OAuthClient.select().count() == 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"tenant": "common"},
        {"tenant": "organizations"},
        {"tenant": "contoso.onmicrosoft.com", "grant": "client_credentials"},
        {"tenant": TENANT, "grant": "device_code"},
        {"provider": "other", "token_url": "https://idp.example.org/token"},
        {"provider": "other", "grant": "client_credentials", "authorize_url": ""},
        {"provider": "other", "imap_host": "::1", "imap_security": "plain"},
    ],
)
def test_good_inputs_are_accepted(app, admin_client, overrides):
    assert add(admin_client, **overrides).status_code == 302


def test_ropc_is_accepted_once_the_admin_allows_it(app, admin_client):
    with app.app_context():
        Setting.write("allow_ropc", "1")
    assert add(admin_client, grant="password").status_code == 302
    assert one_client(app, name="Contoso Entra").grant == "password"


# --- the write-only secret --------------------------------------------------------------------


def test_the_secret_appears_on_no_page(app, admin_client):
    add(admin_client, secret_expires_on=(dt.date.today() + dt.timedelta(days=3)).isoformat())
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        Account.create(
            owner=saved.owner_id, address="m@contoso.com", provider="microsoft365", client=saved
        )
    # A failed edit carrying the secret must not echo it either.
    failed = post_form(
        admin_client,
        f"/settings/clients/{saved.id}/edit",
        {**MICROSOFT_FORM, "name": "", "client_secret": SECRET + "-new"},
    )
    assert failed.status_code == 400
    pages = [failed.get_data(as_text=True)]
    for path in (
        "/",
        "/settings/",
        "/settings/activity",
        NEW,
        f"/settings/clients/{saved.id}/edit",
        f"/settings/clients/{saved.id}/delete",
        "/admin/settings",
        "/admin/audit",
        "/admin/users",
    ):
        response = admin_client.get(path, follow_redirects=True)
        assert response.status_code == 200, path
        pages.append(response.get_data(as_text=True))
    for page in pages:
        assert SECRET not in page
    settings = pages[2]
    assert f"secret set on {dt.date.today().isoformat()}" in settings


def test_blank_secret_on_edit_keeps_it_and_a_new_one_replaces_it(app, admin_client):
    add(admin_client)
    saved = one_client(app, name="Contoso Entra")
    page = admin_client.get(f"/settings/clients/{saved.id}/edit").get_data(as_text=True)
    assert "Leave blank to keep it" in page
    edit = f"/settings/clients/{saved.id}/edit"
    response = post_form(
        admin_client, edit, {**MICROSOFT_FORM, "name": "Renamed", "client_secret": ""}
    )
    assert response.status_code == 302
    kept = one_client(app, id=saved.id)
    assert kept.name == "Renamed" and kept.client_secret == SECRET
    assert kept.secret_set_at == saved.secret_set_at
    post_form(admin_client, edit, {**MICROSOFT_FORM, "client_secret": "another-secret"})
    replaced = one_client(app, id=saved.id)
    assert replaced.client_secret == "another-secret"
    assert replaced.secret_set_at >= saved.secret_set_at


def test_edit_form_shows_the_stored_values(app, admin_client):
    add(admin_client, tenant="contoso.onmicrosoft.com", secret_expires_on="2031-05-06")
    saved = one_client(app, name="Contoso Entra")
    page = admin_client.get(f"/settings/clients/{saved.id}/edit").get_data(as_text=True)
    assert 'value="contoso.onmicrosoft.com"' in page
    assert 'value="2031-05-06"' in page
    assert f'value="{APP_ID}"' in page


# --- permissions and sharing ---------------------------------------------------------------


def test_user_without_permission_sees_the_section_explained_but_cannot_use_it(app, people):
    carol = people["carol"]
    page = carol.get("/settings/").get_data(as_text=True)
    assert "Custom OAuth clients" in page
    assert "You do not have this permission" in page
    assert NEW not in page
    denied = carol.get(NEW)
    assert denied.status_code == 403
    assert "does not have this permission" in denied.get_data(as_text=True)
    posted = post_form(carol, NEW, MICROSOFT_FORM, form_page="/settings/")
    assert posted.status_code == 403
    with app.app_context():
        assert OAuthClient.select().count() == 0


def test_withdrawn_permission_hides_own_clients_from_editing(app, people):
    add(people["alice"])
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        User.update(can_custom_clients=False).where(User.email == "alice@example.org").execute()
    assert people["alice"].get(f"/settings/clients/{saved.id}/edit").status_code == 404


def test_admin_shares_and_unshares_a_client(app, people):
    add(people["admin"])
    saved = one_client(app, name="Contoso Entra")
    share = f"/settings/clients/{saved.id}/share"
    assert post_form(people["admin"], share, {}, form_page="/settings/").status_code == 302
    assert one_client(app, id=saved.id).shared is True
    with app.app_context():
        bob = User.by_email("bob@example.org")
        carol = User.by_email("carol@example.org")
        assert [c.id for c in OAuthClient.usable_by(bob)] == [saved.id]
        assert [c.id for c in OAuthClient.usable_by(carol)] == [saved.id]
    assert "shared with the team" in people["admin"].get("/settings/").get_data(as_text=True)
    assert post_form(people["admin"], share, {}, form_page="/settings/").status_code == 302
    assert one_client(app, id=saved.id).shared is False


def test_only_the_admin_edits_a_shared_client(app, people):
    add(people["alice"])
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        OAuthClient.update(shared=True).where(OAuthClient.id == saved.id).execute()
    alice = people["alice"]
    assert alice.get(f"/settings/clients/{saved.id}/edit").status_code == 404
    listing = alice.get("/settings/").get_data(as_text=True)
    assert "managed by the administrator" in listing
    assert f"/settings/clients/{saved.id}/edit" not in listing
    edit = f"/settings/clients/{saved.id}/edit"
    assert people["admin"].get(edit).status_code == 200
    response = post_form(
        people["admin"], edit, {**MICROSOFT_FORM, "client_secret": "", "name": "Team app"}
    )
    assert response.status_code == 302
    changed = one_client(app, id=saved.id)
    assert changed.name == "Team app" and changed.owner_id == user(app, "alice@example.org").id


def test_non_admin_cannot_share(app, people):
    add(people["alice"])
    saved = one_client(app, name="Contoso Entra")
    before = snapshot(app)
    response = post_form(
        people["alice"], f"/settings/clients/{saved.id}/share", {}, form_page="/settings/"
    )
    assert response.status_code == 404
    assert snapshot(app) == before


# --- ownership: someone else's client is a 404 and nothing changes ----------------------------

ROUTES = [
    ("get", "/settings/clients/{id}/edit", None),
    ("post", "/settings/clients/{id}/edit", {**MICROSOFT_FORM, "name": "Hijacked"}),
    ("post", "/settings/clients/{id}/edit", {**MICROSOFT_FORM, "load_defaults": "1"}),
    ("get", "/settings/clients/{id}/delete", None),
    ("post", "/settings/clients/{id}/delete", {"delete": "Delete client"}),
    ("post", "/settings/clients/{id}/delete", {"reauth": "Delete and mark"}),
    ("post", "/settings/clients/{id}/share", {}),
]


@pytest.mark.parametrize("intruder", ["bob", "carol", "admin"])
@pytest.mark.parametrize("method, path, data", ROUTES)
def test_someone_elses_client_is_404_and_nothing_changes(app, people, intruder, method, path, data):
    add(people["alice"])
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        Account.create(
            owner=saved.owner_id, address="a@contoso.com", provider="microsoft365", client=saved
        )
    before = snapshot(app)
    browser = people[intruder]
    url = path.format(id=saved.id)
    if method == "get":
        response = browser.get(url)
    else:
        response = post_form(browser, url, data, form_page="/settings/")
    assert response.status_code == 404
    assert "Contoso Entra" not in response.get_data(as_text=True)
    assert snapshot(app) == before


@pytest.mark.parametrize("path", ["/settings/clients/999/edit", "/settings/clients/999/delete"])
def test_unknown_client_is_404(admin_client, path):
    assert admin_client.get(path).status_code == 404


def test_anonymous_is_sent_to_login(client, auth):
    auth.setup_admin()
    auth.logout()
    response = client.get(NEW)
    assert response.status_code == 302 and "/login" in response.location


# --- delete ---------------------------------------------------------------------------------


def test_delete_an_unused_client(app, admin_client):
    add(admin_client)
    saved = one_client(app, name="Contoso Entra")
    page = admin_client.get(f"/settings/clients/{saved.id}/delete").get_data(as_text=True)
    assert "No account uses this client" in page
    response = post_form(
        admin_client, f"/settings/clients/{saved.id}/delete", {"delete": "Delete client"}
    )
    assert response.status_code == 302
    with app.app_context():
        assert OAuthClient.select().count() == 0
        assert AuditEvent.select().where(AuditEvent.action == "client.deleted").count() == 1


def test_delete_of_a_used_client_lists_the_accounts_and_offers_the_choice(app, admin_client):
    add(admin_client)
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        for address in ("one@contoso.com", "two@contoso.com"):
            Account.create(
                owner=saved.owner_id,
                address=address,
                provider="microsoft365",
                client=saved,
                status="active",
            )
    path = f"/settings/clients/{saved.id}/delete"
    page = admin_client.get(path).get_data(as_text=True)
    assert "one@contoso.com" in page and "two@contoso.com" in page
    assert "Cancel" in page and "needs re-authorization" in page

    refused = post_form(admin_client, path, {"delete": "Delete client"})
    assert refused.status_code == 409
    with app.app_context():
        assert OAuthClient.select().count() == 1
        assert {a.status for a in Account.select()} == {"active"}

    done = post_form(admin_client, path, {"reauth": "Delete and mark"})
    assert done.status_code == 302
    with app.app_context():
        assert OAuthClient.select().count() == 0
        for account in Account.select():
            assert account.status == "needs_reauth"
            assert account.client_id is None
            assert "Contoso Entra" in account.status_detail


def test_delete_client_function(app, admin_client):
    add(admin_client)
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        client = OAuthClient.get_by_id(saved.id)
        account = Account.create(
            owner=client.owner_id, address="x@contoso.com", provider="microsoft365", client=client
        )
        with pytest.raises(oauth_clients.ClientInUse) as raised:
            oauth_clients.delete_client(client)
        assert [a.id for a in raised.value.accounts] == [account.id]
        assert [a.id for a in oauth_clients.delete_client(client, reauth_accounts=True)] == [
            account.id
        ]
        assert Account.get_by_id(account.id).status == "needs_reauth"


# --- secret expiry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "days, level",
    [(45, None), (31, None), (30, "30"), (8, "30"), (7, "7"), (1, "7"), (0, "7"), (-1, "expired")],
)
def test_expiry_levels(days, level):
    today = dt.date(2030, 6, 1)
    found = oauth_clients.expiry_level(today + dt.timedelta(days=days), today)
    assert (found[0] if found else None) == level


def test_expiry_warnings_list_the_dependent_accounts(app, people):
    today = dt.date.today()
    for name, days in (("Soon", 20), ("Very soon", 5), ("Gone", -2), ("Fine", 90)):
        add(
            people["alice"],
            name=name,
            secret_expires_on=(today + dt.timedelta(days=days)).isoformat(),
        )
    alice = user(app, "alice@example.org")
    with app.app_context():
        gone = OAuthClient.get(OAuthClient.name == "Gone")
        Account.create(
            owner=alice.id, address="dep@contoso.com", provider="microsoft365", client=gone
        )
        warnings = oauth_clients.secret_expiry_warnings(alice)
    assert [(w.client.name, w.level) for w in warnings] == [
        ("Gone", "expired"),
        ("Very soon", "7"),
        ("Soon", "30"),
    ]
    assert [a.address for a in warnings[0].accounts] == ["dep@contoso.com"]
    assert "expired on" in warnings[0].message
    assert "expires in 5 days" in warnings[1].message
    page = html.unescape(people["alice"].get("/settings/").get_data(as_text=True))
    assert "The secret of “Gone” expired on" in page
    assert "Accounts that depend on it: dep@contoso.com" in page
    assert "The secret of “Soon” expires in 20 days" in page
    assert "The secret of “Fine”" not in page


def test_a_shared_clients_expiry_warns_the_users_whose_accounts_depend_on_it(app, people):
    add(people["admin"], secret_expires_on=(dt.date.today() + dt.timedelta(days=3)).isoformat())
    saved = one_client(app, name="Contoso Entra")
    bob = user(app, "bob@example.org")
    carol = user(app, "carol@example.org")
    with app.app_context():
        OAuthClient.update(shared=True).where(OAuthClient.id == saved.id).execute()
        Account.create(
            owner=bob.id, address="bob@contoso.com", provider="microsoft365", client=saved
        )
        Account.create(
            owner=carol.id, address="c@contoso.com", provider="microsoft365", client=saved
        )
        for_bob = oauth_clients.secret_expiry_warnings(bob)
        for_admin = oauth_clients.secret_expiry_warnings(user(app, "admin@example.org"))
    assert [a.address for a in for_bob[0].accounts] == ["bob@contoso.com"]
    assert {a.address for a in for_admin[0].accounts} == {"bob@contoso.com", "c@contoso.com"}


# --- instance defaults -----------------------------------------------------------------------


def test_admin_picks_the_default_client_per_provider(app, people):
    add(people["admin"])
    admin_app = one_client(app, name="Contoso Entra")
    add(people["alice"], name="Alice app")
    alice_app = one_client(app, name="Alice app")
    page = people["admin"].get("/admin/settings").get_data(as_text=True)
    assert "Default authorization method" in page
    assert f'<option value="{admin_app.id}">' in page
    assert f'<option value="{alice_app.id}">' not in page  # private to alice
    with app.app_context():
        assert oauth_clients.default_client("microsoft365") is None
    response = post_form(
        people["admin"],
        "/settings/clients/defaults",
        {"default_microsoft365": str(admin_app.id), "default_google": ""},
        form_page="/admin/settings",
    )
    assert response.status_code == 302
    with app.app_context():
        assert oauth_clients.default_client("microsoft365").id == admin_app.id
        assert oauth_clients.default_client("google") is None
        assert Setting.read("default_client.microsoft365") == str(admin_app.id)
    page = people["admin"].get("/admin/settings").get_data(as_text=True)
    assert f'<option selected value="{admin_app.id}">' in page


def test_tampered_default_client_is_404_and_nothing_changes(app, people):
    add(people["alice"])
    alice_app = one_client(app, name="Contoso Entra")
    before = snapshot(app)
    response = post_form(
        people["admin"],
        "/settings/clients/defaults",
        {"default_microsoft365": str(alice_app.id)},
        form_page="/admin/settings",
    )
    assert response.status_code == 404
    wrong_provider = post_form(
        people["admin"],
        "/settings/clients/defaults",
        {"default_google": str(alice_app.id)},
        form_page="/admin/settings",
    )
    assert wrong_provider.status_code == 404
    assert snapshot(app) == before


def test_only_the_admin_sets_defaults(app, people):
    before = snapshot(app)
    response = post_form(
        people["alice"],
        "/settings/clients/defaults",
        {"default_google": ""},
        form_page="/settings/",
    )
    assert response.status_code == 404
    assert snapshot(app) == before


def test_deleting_the_default_client_clears_the_default(app, admin_client):
    add(admin_client)
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        oauth_clients.set_default_client("microsoft365", OAuthClient.get_by_id(saved.id))
        assert oauth_clients.default_client("microsoft365").id == saved.id
        oauth_clients.delete_client(OAuthClient.get_by_id(saved.id))
        assert oauth_clients.default_client("microsoft365") is None
        assert Setting.read("default_client.microsoft365") is None


def test_a_default_that_stops_being_shared_stops_serving(app, people):
    add(people["alice"])
    saved = one_client(app, name="Contoso Entra")
    with app.app_context():
        client = OAuthClient.get_by_id(saved.id)
        oauth_clients.set_shared(client, True)
        oauth_clients.set_default_client("microsoft365", client)
        assert oauth_clients.default_client("microsoft365").id == saved.id
        oauth_clients.set_shared(client, False)
        assert oauth_clients.default_client("microsoft365") is None
        with pytest.raises(oauth_clients.ClientError):
            oauth_clients.set_default_client("microsoft365", client)


# --- plain functions --------------------------------------------------------------------------


def test_save_client_needs_a_secret_on_create_and_clears_preset_fields(app, admin_client):
    admin = user(app, "admin@example.org")
    values = {k: v for k, v in MICROSOFT_FORM.items() if k in oauth_clients.EDITABLE}
    values.update(imap_host="evil.example", imap_port=1, secret_expires_on=None)
    with app.app_context():
        with pytest.raises(oauth_clients.ClientError):  # Client Credentials needs its secret
            oauth_clients.save_client(admin, {**values, "grant": "client_credentials"})
        saved = oauth_clients.save_client(admin, values, secret="s")
        assert saved.imap_host == "" and saved.imap_port is None
        assert saved.client_secret == "s"
        with pytest.raises(oauth_clients.ClientError):
            oauth_clients.save_client(admin, values, secret="s")  # same name, same owner


def test_load_defaults_on_other_keeps_typed_urls_and_drops_preset_ones(app, admin_client):
    response = post_form(
        admin_client,
        NEW,
        {
            **OTHER_FORM,
            "authorize_url": M365["authorize_url"],
            "token_url": "https://idp.example.org/token",
            "submit": "",
            "load_defaults": "Load defaults",
        },
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'value="https://idp.example.org/token"' in page
    assert M365["authorize_url"] not in page
    with app.app_context():
        assert OAuthClient.select().count() == 0


def test_custom_server_may_keep_a_big_providers_endpoints(app, admin_client):
    assert add(admin_client, provider="other", token_url=M365["token_url"]).status_code == 302
    assert one_client(app, name="Local IdP").token_url == M365["token_url"]


def test_the_editor_sets_how_a_microsoft_clients_mail_goes_out(app, admin_client):
    """Microsoft clients default to automatic (Graph once the tenant refuses SMTP AUTH) and say
    which Graph permission that needs; a Google client always uses SMTP AUTH."""
    page = admin_client.get(NEW).get_data(as_text=True)
    assert 'name="smtp_delivery"' in page and "Mail.Send" in page
    assert "https://graph.microsoft.com/Mail.Send" in page  # the delegated guide
    assert add(admin_client).status_code == 302
    assert add(admin_client, name="Graph only", smtp_delivery="graph").status_code == 302
    refused = add(admin_client, name="Bad mode", smtp_delivery="fax")
    assert refused.status_code == 400
    google = providers.defaults_for("google", "authorization_code")
    assert (
        add(admin_client, name="Gmail", provider="google", tenant="", smtp_delivery="graph",
            **google).status_code == 302
    )  # fmt: skip
    with app.app_context():
        modes = {c.name: c.smtp_delivery for c in OAuthClient.select()}
    assert modes == {"Contoso Entra": "auto", "Graph only": "graph", "Gmail": "smtp"}
