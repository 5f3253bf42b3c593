"""The product against the Entra + Exchange simulators: link a mailbox with Authorization Code
through the web routes (the simulator's sign-in form over HTTP), then read and send through the
mail proxy with the mail-client password.

The product is pointed at the simulators only through its settings, as an operator would point
it at another cloud: ``PROVIDER_HOSTS`` moves the Microsoft 365 and Google presets' hosts,
``GRAPH_URL`` Graph's, ``UPSTREAM_CA_FILE`` trusts the test bed's CA; or an "Other (custom
server)" OAuth client with the simulator's URLs and mail servers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailboxes import linking
from mailboxes.mailbackend import MailProxyService
from models import Account, User
from oauth import clients as oauth_clients
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.linking import path_and_query
from tests.helpers.mail import EVERY_LISTENER_ON_A_FREE_PORT, MailClients
from tests.helpers.sims import PUBLIC, REDIRECT, link_through_the_web, preset_client
from tests.helpers.web import AuthActions, post_form
from tests.providers.plugin import ProviderSims

pytestmark = pytest.mark.peers

PASSWORD = "laptop-" + secrets.token_hex(6)
SCOPE = (
    "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/POP.AccessAsUser.All"
    " https://outlook.office.com/SMTP.Send offline_access openid email"
)


@pytest.fixture
def app(instance: Path, sim_settings: dict[str, Any]) -> Flask:
    app = make_app(
        instance,
        **sim_settings,
        PUBLIC_URL=PUBLIC,
        LOGIN_FAILURE_LIMIT_PER_IP=1000,
        **EVERY_LISTENER_ON_A_FREE_PORT,
    )
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


@pytest.fixture
def mail(app: Flask) -> Iterator[MailClients]:
    proxy = MailProxyService(app)
    proxy.start()
    yield MailClients(app, proxy)
    proxy.stop()
    assert proxy.controller.errors == 0, "an unexpected exception reached the proxy"


def entra_client(owner: User, sims: ProviderSims, client_id: str, secret: str) -> Any:
    """A custom client with the Entra simulator's URLs and the Exchange simulator's servers."""
    tenant = sims.entra.tenant.id
    values = {
        "name": f"entra-sim {secrets.token_hex(3)}",
        "provider": "other",
        "grant": "authorization_code",
        "tenant": "",
        "authorize_url": sims.entra.endpoint(tenant, "authorize"),
        "token_url": sims.entra.endpoint(tenant, "token"),
        "device_url": "",
        "scope": SCOPE,
        "revocation_url": "",
        "client_id": client_id,
        "secret_expires_on": None,
        "imap_host": "127.0.0.1",
        "imap_port": sims.exchange.imap.port,
        "imap_security": "tls",
        "pop3_host": "127.0.0.1",
        "pop3_port": sims.exchange.pop3.port,
        "pop3_security": "tls",
        "smtp_host": "127.0.0.1",
        "smtp_port": sims.exchange.smtp.port,
        "smtp_security": "starttls",
        "sasl_mechanism": "XOAUTH2",
    }
    return oauth_clients.save_client(owner, values, secret)


def test_a_mailbox_linked_at_the_entra_simulator_works_through_the_proxy(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    entra_app = sims.entra.add_app(redirect_uris=[REDIRECT])
    user = sims.entra_user("e2e", seed=2)
    web = app.test_client()
    AuthActions(app, web).login()
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        client = entra_client(owner, sims, entra_app.client_id, str(entra_app.secret))

    # the product's real /authorize flow: start, sign in at the simulator, come back
    start = post_form(
        web,
        "/accounts/new",
        {"address": user.email, "provider": "other", "client": str(client.id)},
        form_page=f"/accounts/new?address={user.email}",
    )
    assert start.status_code == 302, start.get_data(as_text=True)
    assert start.headers["Location"].startswith(
        sims.entra.endpoint(sims.entra.tenant.id, "authorize")
    )
    back = sims.entra_sign_in(start.headers["Location"], user.email)
    assert back.startswith(REDIRECT + "?")
    done = web.get(path_and_query(back))
    assert done.status_code == 302, done.get_data(as_text=True)
    assert (
        sims.entra.requests.count(client_id=entra_app.client_id, grant_type="authorization_code")
        == 1
    )

    with app.app_context():
        account = Account.get(Account.address == user.email)
        assert account.status == "active", account.status_detail
        linking.add_password(owner, account, "Laptop", PASSWORD)

    conn = mail.imap(user.email, PASSWORD, "imaps")
    typ, data = conn.select("INBOX", readonly=True)
    assert typ == "OK" and data == [b"2"]
    typ, fetched = conn.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Seed message 2" in bytes(fetched[0][1])  # type: ignore[index]
    conn.logout()

    subject = f"through-the-proxy-{time.time_ns()}"
    msg = EmailMessage()
    msg["From"] = msg["To"] = user.email
    msg["Subject"] = subject
    msg.set_content("Sent through Auth-Email to the Exchange simulator.\n")
    smtp = mail.smtp(user.email, PASSWORD)
    smtp.send_message(msg)
    smtp.quit()
    assert sims.peers.wait_for_message(user.email, subject)
    assert sims.exchange.sent[-1] == (user.email, user.email, [user.email])


def test_the_microsoft_365_preset_against_the_simulators(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    entra_app = sims.entra.add_app(redirect_uris=[REDIRECT])
    user = sims.entra_user("m365", seed=1)
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        client = preset_client(
            owner, "microsoft365", entra_app.client_id, str(entra_app.secret), sims.entra.tenant.id
        )
        assert client.token_url == sims.entra.endpoint(sims.entra.tenant.id, "token")
        account = link_through_the_web(
            app,
            "microsoft365",
            client,
            user.email,
            lambda url: sims.entra_sign_in(url, user.email),
        )
        linking.add_password(owner, account, "Laptop", PASSWORD)

    conn = mail.imap(user.email, PASSWORD, "imaps")
    assert conn.select("INBOX", readonly=True) == ("OK", [b"1"])
    conn.logout()
    pop = mail.pop3(user.email, PASSWORD, "pop3s")
    assert pop.stat()[0] == 1
    pop.quit()


def test_the_google_preset_against_the_simulators(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    google_app = sims.google.add_app(redirect_uris=[REDIRECT])
    account = sims.google_account("gmail", seed=1)
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        client = preset_client(owner, "google", google_app.client_id, google_app.secret)
        linked = link_through_the_web(
            app, "google", client, account.email, lambda url: sims.google_sign_in(url, account)
        )
        linking.add_password(owner, linked, "Laptop", PASSWORD)
    assert sims.google.authorize_requests[-1]["access_type"] == "offline"

    conn = mail.imap(account.email, PASSWORD, "imaps")
    assert conn.select("INBOX", readonly=True) == ("OK", [b"1"])
    conn.logout()
    pop = mail.pop3(account.email, PASSWORD, "pop3s")
    assert pop.stat()[0] == 1
    pop.quit()
    subject = f"gmail-proxy-{time.time_ns()}"
    msg = EmailMessage()
    msg["From"] = msg["To"] = account.email
    msg["Subject"] = subject
    msg.set_content("Sent through Auth-Email to the Gmail simulator.\n")
    smtp = mail.smtp(account.email, PASSWORD)
    smtp.send_message(msg)
    smtp.quit()
    assert sims.peers.wait_for_message(account.email, subject)


def test_client_credentials_with_the_microsoft_365_preset(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    """App-only: without Add-MailboxPermission Exchange says NO AUTHENTICATE failed and the
    product explains the Exchange steps; with it the mailbox links and works over IMAP."""
    from oauth import providers

    entra_app = sims.entra.add_app()
    user = sims.entra_user("apponly", seed=1)
    tenant = sims.entra.tenant.id
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        grant = "client_credentials"
        values = {
            "name": f"app-only {secrets.token_hex(3)}",
            "provider": "microsoft365",
            "grant": grant,
            "tenant": tenant,
            **providers.defaults_for("microsoft365", grant, tenant),
            "revocation_url": "",
            "client_id": entra_app.client_id,
            "secret_expires_on": None,
            "sasl_mechanism": "XOAUTH2",
        }
        client = oauth_clients.save_client(owner, values, str(entra_app.secret))

        refused = linking.start(owner, user.email, client, REDIRECT)
        assert refused.done is not None and not refused.done.ok
        assert "Add-MailboxPermission" in Account.get(Account.address == user.email).status_detail

        sims.entra.grant_full_access(user.email, entra_app.client_id)
        linked = linking.start(owner, user.email, client, REDIRECT)
        assert linked.done is not None and linked.done.ok, linked.done
        account = Account.get(Account.address == user.email)
        linking.add_password(owner, account, "Scanner", PASSWORD)
    assert sims.entra.requests.count(client_id=entra_app.client_id, grant_type=grant) >= 2

    conn = mail.imap(user.email, PASSWORD, "imaps")
    assert conn.select("INBOX", readonly=True) == ("OK", [b"1"])
    conn.logout()
