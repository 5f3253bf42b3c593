"""The OAuth client editor driven by form posts, and reading what it saved and explained."""

from __future__ import annotations

import html
import re
from typing import Any

from models import OAuthClient
from oauth import providers
from tests.helpers.web import post_form

TENANT = "11111111-2222-3333-4444-555555555555"
APP_ID = "00000000-aaaa-bbbb-cccc-000000000001"
SECRET = "Sup3r-Secret-Value~never-rendered-4711"
M365 = providers.defaults_for("microsoft365", "authorization_code", TENANT)
NEW = "/settings/clients/new"


MICROSOFT_FORM: dict[str, Any] = {
    "name": "Contoso Entra",
    "provider": "microsoft365",
    "grant": "authorization_code",
    "tenant": TENANT,
    **M365,
    "client_id": APP_ID,
    "client_secret": SECRET,
    "secret_expires_on": "",
    "submit": "Save client",
}


OTHER_FORM: dict[str, Any] = {
    "name": "Local IdP",
    "provider": "other",
    "grant": "authorization_code",
    "tenant": "",
    "authorize_url": "http://127.0.0.1:9000/authorize",
    "token_url": "http://127.0.0.1:9000/token",
    "device_url": "",
    "scope": "mail offline_access",
    "client_id": "local-client",
    "client_secret": SECRET,
    "imap_host": "127.0.0.1",
    "imap_port": "1430",
    "imap_security": "plain",
    "pop3_host": "localhost",
    "pop3_port": "1100",
    "pop3_security": "plain",
    "smtp_host": "mail.example.org",
    "smtp_port": "587",
    "smtp_security": "starttls",
    "sasl_mechanism": "OAUTHBEARER",
    "revocation_url": "",
    "submit": "Save client",
}


def add(browser, **overrides: Any):
    base = OTHER_FORM if overrides.get("provider") == "other" else MICROSOFT_FORM
    return post_form(browser, NEW, {**base, **overrides})


def field_help(page: str, name: str) -> str:
    """The text beside field ``name`` (its hint and errors)."""
    found = re.search(rf'<div id="{name}-help">(.*?)</div>', page, re.S)
    assert found, f"no help block for {name}"
    return html.unescape(found.group(1))


def one_client(app, **where: Any) -> OAuthClient:
    with app.app_context():
        return OAuthClient.get(*[getattr(OAuthClient, k) == v for k, v in where.items()])
