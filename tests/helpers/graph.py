"""A Microsoft 365 mailbox at the simulators whose client sends through Graph or SMTP."""

from __future__ import annotations

import secrets
from typing import Any

from flask import Flask

from mailboxes import linking
from models import OAuthClient, User
from tests.helpers.app import ADMIN_EMAIL
from tests.helpers.sims import PUBLIC, link_through_the_web, preset_client
from tests.providers.plugin import ProviderSims

PASSWORD = "scanner-" + secrets.token_hex(6)


def mailbox(
    app: Flask, sims: ProviderSims, mode: str, situation: str = "", **app_options: Any
) -> Any:
    """A Microsoft 365 mailbox linked with Authorization Code, its client set to ``mode``."""
    entra_app = sims.entra.add_app(redirect_uris=[PUBLIC + "/authorize"], **app_options)
    user = sims.entra_user("scan", seed=1)
    if situation:
        sims.entra.situation(user.email, situation)
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        client = preset_client(
            owner, "microsoft365", entra_app.client_id, str(entra_app.secret), sims.entra.tenant.id
        )
        OAuthClient.update(smtp_delivery=mode).where(OAuthClient.id == client.id).execute()
        account = link_through_the_web(
            app, "microsoft365", client, user.email, lambda url: sims.entra_sign_in(url, user.email)
        )
        linking.add_password(owner, account, "Scanner", PASSWORD)
    return user
