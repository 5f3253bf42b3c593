"""Linking the shipped presets against the provider simulators through the web routes."""

from __future__ import annotations

import secrets
from typing import Any

from flask import Flask

from models import Account, User
from oauth import clients as oauth_clients
from tests.helpers.linking import path_and_query
from tests.helpers.web import AuthActions, post_form

PUBLIC = "http://127.0.0.1:8080"


REDIRECT = PUBLIC + "/authorize"


def preset_client(owner: User, provider: str, client_id: str, secret: str, tenant: str = "") -> Any:
    """A client of a shipped preset (moved to the simulators by ``PROVIDER_HOSTS``)."""
    from oauth import providers

    grant = "authorization_code"
    values = {
        "name": f"{provider} {secrets.token_hex(3)}",
        "provider": provider,
        "grant": grant,
        "tenant": tenant,
        **providers.defaults_for(provider, grant, tenant),
        "revocation_url": "",
        "client_id": client_id,
        "secret_expires_on": None,
        "sasl_mechanism": "XOAUTH2",
    }
    return oauth_clients.save_client(owner, values, secret)


def link_through_the_web(app: Flask, provider: str, client: Any, address: str, sign_in: Any) -> Any:
    """Start linking on /accounts/new, sign in at the simulator, follow the callback."""
    web = app.test_client()
    AuthActions(app, web).login()
    start = post_form(
        web,
        "/accounts/new",
        {"address": address, "provider": provider, "client": str(client.id)},
        form_page=f"/accounts/new?address={address}",
    )
    assert start.status_code == 302, start.get_data(as_text=True)
    back = sign_in(start.headers["Location"])
    assert back.startswith(REDIRECT + "?")
    done = web.get(path_and_query(back))
    assert done.status_code == 302, done.get_data(as_text=True)
    account = Account.get(Account.address == address)
    assert account.status == "active", account.status_detail
    return account
