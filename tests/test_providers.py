"""Provider presets: every preset's defaults against the published values."""

from __future__ import annotations

import dataclasses

import pytest

from mailproxy.backend import Endpoint
from models import OAuthClient
from oauth import providers

M365_DELEGATED = (
    "https://outlook.office.com/IMAP.AccessAsUser.All "
    "https://outlook.office.com/POP.AccessAsUser.All "
    "https://outlook.office.com/SMTP.Send offline_access"
)
CHINA_DELEGATED = (
    "https://partner.outlook.cn/IMAP.AccessAsUser.All "
    "https://partner.outlook.cn/POP.AccessAsUser.All "
    "https://partner.outlook.cn/SMTP.Send offline_access"
)
TENANT = "11111111-2222-3333-4444-555555555555"
MS = "https://login.microsoftonline.com"
CN = "https://login.chinacloudapi.cn"


def test_preset_keys_and_labels():
    assert [key for key, _ in providers.choices()] == [
        "microsoft365",
        "outlook",
        "google",
        "microsoft_china",
        "microsoft_gcc_high",
        "microsoft_dod",
        "fastmail",
        "yahoo",
        "aol",
        "other",
    ]
    assert dict(providers.choices())["other"] == "Other (custom server)"


def test_unknown_preset_is_a_key_error():
    with pytest.raises(KeyError):
        providers.get("hotmail")


def test_presets_are_frozen_data():
    preset = providers.get("google")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        preset.grants["password"] = preset.grants["authorization_code"]  # type: ignore[index]


@pytest.mark.parametrize(
    "key, grant, expected",
    [
        (
            "microsoft365",
            "authorization_code",
            {
                "authorize_url": f"{MS}/{TENANT}/oauth2/v2.0/authorize",
                "token_url": f"{MS}/{TENANT}/oauth2/v2.0/token",
                "device_url": "",
                "scope": M365_DELEGATED,
            },
        ),
        (
            "microsoft365",
            "client_credentials",
            {
                "authorize_url": "",
                "token_url": f"{MS}/{TENANT}/oauth2/v2.0/token",
                "device_url": "",
                "scope": "https://outlook.office365.com/.default",
            },
        ),
        (
            "microsoft365",
            "device_code",
            {
                "authorize_url": "",
                "token_url": f"{MS}/{TENANT}/oauth2/v2.0/token",
                "device_url": f"{MS}/{TENANT}/oauth2/v2.0/devicecode",
                "scope": M365_DELEGATED,
            },
        ),
        (
            "microsoft365",
            "password",
            {
                "authorize_url": "",
                "token_url": f"{MS}/{TENANT}/oauth2/v2.0/token",
                "device_url": "",
                "scope": M365_DELEGATED,
            },
        ),
        (
            "outlook",
            "authorization_code",
            {
                "authorize_url": f"{MS}/consumers/oauth2/v2.0/authorize",
                "token_url": f"{MS}/consumers/oauth2/v2.0/token",
                "device_url": "",
                "scope": M365_DELEGATED,
            },
        ),
        (
            "google",
            "authorization_code",
            {
                "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
                "token_url": "https://oauth2.googleapis.com/token",
                "device_url": "",
                "scope": "https://mail.google.com/",
            },
        ),
        (
            "microsoft_china",
            "authorization_code",
            {
                "authorize_url": f"{CN}/{TENANT}/oauth2/v2.0/authorize",
                "token_url": f"{CN}/{TENANT}/oauth2/v2.0/token",
                "device_url": "",
                "scope": CHINA_DELEGATED,
            },
        ),
        (
            "microsoft_china",
            "client_credentials",
            {
                "authorize_url": "",
                "token_url": f"{CN}/{TENANT}/oauth2/v2.0/token",
                "device_url": "",
                "scope": "https://partner.outlook.cn/.default",
            },
        ),
        (
            "fastmail",
            "authorization_code",
            {
                "authorize_url": "https://api.fastmail.com/oauth/authorize",
                "token_url": "https://api.fastmail.com/oauth/refresh",
                "device_url": "",
                "scope": "https://www.fastmail.com/dev/protocol-imap "
                "https://www.fastmail.com/dev/protocol-pop "
                "https://www.fastmail.com/dev/protocol-smtp",
            },
        ),
        (
            "yahoo",
            "authorization_code",
            {
                "authorize_url": "https://api.login.yahoo.com/oauth2/request_auth",
                "token_url": "https://api.login.yahoo.com/oauth2/get_token",
                "device_url": "",
                "scope": "mail-w",
            },
        ),
        (
            "aol",
            "authorization_code",
            {
                "authorize_url": "https://api.login.aol.com/oauth2/request_auth",
                "token_url": "https://api.login.aol.com/oauth2/get_token",
                "device_url": "",
                "scope": "mail-w",
            },
        ),
        (
            "other",
            "authorization_code",
            {"authorize_url": "", "token_url": "", "device_url": "", "scope": ""},
        ),
    ],
)
def test_defaults_for_each_preset_and_grant(key, grant, expected):
    assert providers.defaults_for(key, grant, TENANT) == expected


def test_microsoft_tenant_defaults_to_organizations_and_templates_keep_the_placeholder():
    preset = providers.get("microsoft365")
    assert preset.grants["authorization_code"].token_url == f"{MS}/{{tenant}}/oauth2/v2.0/token"
    assert providers.defaults_for("microsoft365", "authorization_code")["token_url"] == (
        f"{MS}/organizations/oauth2/v2.0/token"
    )


def test_outlook_ignores_a_tenant_it_does_not_have():
    assert (
        "/consumers/"
        in providers.defaults_for("outlook", "authorization_code", TENANT)["authorize_url"]
    )


def test_a_grant_the_provider_does_not_allow_has_no_defaults():
    assert providers.defaults_for("google", "client_credentials") == {
        "authorize_url": "",
        "token_url": "",
        "device_url": "",
        "scope": "",
    }


@pytest.mark.parametrize(
    "key, grants",
    [
        ("microsoft365", {"authorization_code", "client_credentials", "device_code", "password"}),
        (
            "microsoft_china",
            {"authorization_code", "client_credentials", "device_code", "password"},
        ),
        ("outlook", {"authorization_code", "device_code"}),
        ("google", {"authorization_code"}),
        ("fastmail", {"authorization_code"}),
        ("yahoo", {"authorization_code"}),
        ("aol", {"authorization_code"}),
        ("other", {"authorization_code", "client_credentials", "device_code", "password"}),
    ],
)
def test_allowed_grants(key, grants):
    assert set(providers.get(key).grants) == grants
    assert {g for g, _ in providers.grant_choices(key)} == grants


@pytest.mark.parametrize(
    "key, imap, pop3, smtp, mechanism",
    [
        (
            "microsoft365",
            ("outlook.office365.com", 993, "tls"),
            ("outlook.office365.com", 995, "tls"),
            ("smtp.office365.com", 587, "starttls"),
            "XOAUTH2",
        ),
        (
            "outlook",
            ("outlook.office365.com", 993, "tls"),
            ("outlook.office365.com", 995, "tls"),
            ("smtp-mail.outlook.com", 587, "starttls"),
            "XOAUTH2",
        ),
        (
            "google",
            ("imap.gmail.com", 993, "tls"),
            ("pop.gmail.com", 995, "tls"),
            ("smtp.gmail.com", 465, "tls"),
            "XOAUTH2",
        ),
        (
            "microsoft_china",
            ("partner.outlook.cn", 993, "tls"),
            ("partner.outlook.cn", 995, "tls"),
            ("partner.outlook.cn", 587, "starttls"),
            "XOAUTH2",
        ),
        (
            "fastmail",
            ("imap.fastmail.com", 993, "tls"),
            ("pop.fastmail.com", 995, "tls"),
            ("smtp.fastmail.com", 465, "tls"),
            "OAUTHBEARER",
        ),
        (
            "yahoo",
            ("imap.mail.yahoo.com", 993, "tls"),
            ("pop.mail.yahoo.com", 995, "tls"),
            ("smtp.mail.yahoo.com", 465, "tls"),
            "XOAUTH2",
        ),
        (
            "aol",
            ("imap.aol.com", 993, "tls"),
            ("pop.aol.com", 995, "tls"),
            ("smtp.aol.com", 465, "tls"),
            "XOAUTH2",
        ),
    ],
)
def test_preset_servers_and_mechanism(key, imap, pop3, smtp, mechanism):
    client = OAuthClient(provider=key, imap_host="ignored.example", imap_port=1)
    assert providers.endpoints_for(client) == {
        "imap": Endpoint(*imap),
        "pop3": Endpoint(*pop3),
        "smtp": Endpoint(*smtp),
    }
    assert providers.sasl_mechanism_for(client) == mechanism


def test_other_uses_the_clients_own_servers_and_mechanism():
    client = OAuthClient(
        provider="other",
        imap_host="127.0.0.1",
        imap_port=1430,
        imap_security="plain",
        pop3_host="pop.example.org",
        pop3_port=995,
        pop3_security="tls",
        smtp_host="smtp.example.org",
        smtp_port=587,
        smtp_security="starttls",
        sasl_mechanism="OAUTHBEARER",
    )
    assert providers.endpoints_for(client) == {
        "imap": Endpoint("127.0.0.1", 1430, "plain"),
        "pop3": Endpoint("pop.example.org", 995, "tls"),
        "smtp": Endpoint("smtp.example.org", 587, "starttls"),
    }
    assert providers.sasl_mechanism_for(client) == "OAUTHBEARER"


def test_google_extra_authorize_params_and_revocation():
    google = OAuthClient(provider="google")
    assert providers.extra_authorize_params(google) == {
        "access_type": "offline",
        "prompt": "consent",
    }
    assert providers.revocation_url_for(google) == "https://oauth2.googleapis.com/revoke"
    microsoft = OAuthClient(provider="microsoft365")
    assert providers.extra_authorize_params(microsoft) == {}
    assert providers.revocation_url_for(microsoft) == ""
    custom = OAuthClient(provider="other", revocation_url="https://idp.example.org/revoke")
    assert providers.revocation_url_for(custom) == "https://idp.example.org/revoke"


def test_closed_registrations_and_tenants():
    closed = {p.key for p in providers.PRESETS.values() if p.registrations_closed}
    assert closed == {"fastmail", "yahoo", "aol"}
    with_tenant = {p.key for p in providers.PRESETS.values() if p.has_tenant}
    assert with_tenant == {"microsoft365", "microsoft_china", "microsoft_gcc_high", "microsoft_dod"}


@pytest.mark.parametrize(
    "address, expected",
    [
        ("someone@gmail.com", "google"),
        ("Someone@GoogleMail.com", "google"),
        ("a@outlook.com", "outlook"),
        ("a@hotmail.com", "outlook"),
        ("a@live.com", "outlook"),
        ("a@msn.com", "outlook"),
        ("a@fastmail.com", "fastmail"),
        ("a@yahoo.com", "yahoo"),
        ("a@aol.com", "aol"),
        ("a@contoso.com", None),
        ("a@office365.com", None),
        ("not-an-address", None),
        ("", None),
    ],
)
def test_guess_provider(address, expected):
    assert providers.guess_provider(address) == expected


def test_a_value_from_any_preset_counts_as_a_default():
    assert providers.is_a_default("token_url", f"{MS}/contoso.com/oauth2/v2.0/token")
    assert providers.is_a_default("scope", "https://mail.google.com/")
    assert providers.is_a_default("authorize_url", "")
    assert not providers.is_a_default("token_url", "https://idp.example.org/token")
    assert not providers.is_a_default("scope", "https://mail.google.com/ openid")


def test_editor_data_is_json_ready():
    import json

    data = json.loads(json.dumps(providers.editor_data()))
    assert data["microsoft365"]["has_tenant"] is True
    assert data["microsoft365"]["grants"]["client_credentials"]["scope"] == (
        "https://outlook.office365.com/.default"
    )
    assert data["other"]["custom"] is True
