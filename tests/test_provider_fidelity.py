"""What a user of Microsoft or Google meets, mapped: every AADSTS code of the provider notes,
the tenant rules per grant, the US Government clouds, Google's Testing status."""

from __future__ import annotations

import pytest

from oauth import errors as oauth_errors
from oauth import providers
from tests.helpers.clients import add, field_help, one_client

# Every AADSTS code the provider notes list (token endpoint and authorize page).
AADSTS_CODES = [
    70008, 700082, 700084, 50173, 50076, 50079, 53003, 65001, 7000215, 7000222, 7000218,
    700025, 700016, 50194, 90002, 50196, 500011, 70011, 9002313, 54005, 70000, 70016, 50011,
]  # fmt: skip


@pytest.mark.parametrize("code", AADSTS_CODES)
def test_every_aadsts_code_has_its_own_cause_and_fix(code: int) -> None:
    said = oauth_errors.explain(
        "invalid_grant", f"AADSTS{code}: something happened.\r\nTrace ID: x"
    )
    generic = oauth_errors.explain("invalid_grant", "")
    assert said.code == f"AADSTS{code}"
    assert said.title and said.cause and said.fix
    assert (said.title, said.fix) != (generic.title, generic.fix)
    assert oauth_errors.known_explanation("invalid_grant", f"AADSTS{code}: x") is not None


def test_only_the_request_loop_counts_as_throttling() -> None:
    assert oauth_errors.is_throttling("invalid_grant", "AADSTS50196: The server terminated ...")
    assert not oauth_errors.is_throttling("invalid_grant", "AADSTS700082: expired")


def test_google_expired_or_revoked_is_recognised_with_the_testing_status() -> None:
    said = oauth_errors.explain("invalid_grant", "Token has been expired or revoked.")
    assert "Testing" in said.cause and "7 days" in said.cause and "Publish" in said.fix


@pytest.mark.parametrize(
    ("key", "login", "resource", "smtp"),
    [
        ("microsoft_gcc_high", "login.microsoftonline.us", "outlook.office365.us",
         "smtp.office365.us"),
        ("microsoft_dod", "login.microsoftonline.us", "outlook-dod.office365.us",
         "smtp-dod.office365.us"),
    ],
)  # fmt: skip
def test_us_government_clouds_are_presets(key: str, login: str, resource: str, smtp: str) -> None:
    code = providers.defaults_for(key, "authorization_code", "contoso.onmicrosoft.us")
    assert code["token_url"] == f"https://{login}/contoso.onmicrosoft.us/oauth2/v2.0/token"
    assert f"https://{resource}/IMAP.AccessAsUser.All" in code["scope"]
    assert f"https://{resource}/SMTP.Send" in code["scope"]
    app_only = providers.defaults_for(key, "client_credentials", "contoso.onmicrosoft.us")
    assert app_only["scope"] == f"https://{resource}/.default"
    preset = providers.get(key)
    assert preset.smtp is not None and preset.smtp.host == smtp and preset.has_tenant
    assert preset.imap is not None and preset.imap.host == resource


def test_a_gcc_high_client_is_saved_with_its_cloud(app, admin_client) -> None:
    response = add(
        admin_client,
        provider="microsoft_gcc_high",
        name="Gov",
        tenant="contoso.onmicrosoft.us",
        token_url="",
        authorize_url="",
        scope="",
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    saved = one_client(app, name="Gov")
    assert saved.token_url.startswith("https://login.microsoftonline.us/contoso.onmicrosoft.us/")


@pytest.mark.parametrize(
    ("grant", "tenant", "accepted"),
    [
        ("authorization_code", "organizations", True),
        ("device_code", "organizations", True),
        ("device_code", "common", True),
        ("client_credentials", "organizations", False),
        ("client_credentials", "contoso.onmicrosoft.com", True),
        ("authorization_code", "consumers", False),
    ],
)
def test_tenant_rules_per_grant(app, admin_client, grant: str, tenant: str, accepted: bool) -> None:
    response = add(admin_client, grant=grant, tenant=tenant)
    assert (response.status_code == 302) is accepted, response.get_data(as_text=True)[:2000]
    if not accepted:
        assert field_help(response.get_data(as_text=True), "tenant")


def test_the_google_guide_warns_about_the_testing_status(admin_client) -> None:
    page = admin_client.get("/settings/clients/new?provider=google").get_data(as_text=True)
    assert 'id="google-testing-warning"' in page and "7 days" in page
