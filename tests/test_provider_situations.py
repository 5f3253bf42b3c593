"""The product against the Microsoft and Google simulators, one situation each (issue 11).

Each test links a mailbox through the web routes with the shipped Microsoft 365 or Google
preset (moved to the simulators by ``PROVIDER_HOSTS``), makes the simulator play a situation,
then drives the served mail proxy with stdlib clients and reads the dashboard: what the mail
client gets (the protocol's own error, with a reason a person can act on) and what the account
page and the accounts list show (never "Active" for a mailbox that does not work; "Needs
re-authorization" only where re-authorizing helps; the account is never deleted).
The last two tests look at the served web UI in headless Chromium, at phone and desktop width.
The situation → test table is in tests/providers/README.md.
"""

from __future__ import annotations

import html
import imaplib
import re
import secrets
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import linking
from mailboxes.mailbackend import MailProxyService
from models import Account, User, utcnow
from oauth import clients as oauth_clients
from oauth import providers
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.dashboard import (
    WIDTHS,
    fill,
    layout_problems,
    screenshot,
    set_width,
    sign_in,
    wait_for,
)
from tests.helpers.linking import path_and_query
from tests.helpers.mail import EVERY_LISTENER_ON_A_FREE_PORT, MailClients
from tests.helpers.web import AuthActions, LiveServer, post_form
from tests.providers.plugin import ProviderSims

pytestmark = pytest.mark.peers

PUBLIC = "http://127.0.0.1:8080"
REDIRECT = PUBLIC + "/authorize"
PASSWORD = "device-" + secrets.token_hex(6)


@pytest.fixture
def app(instance: Path, sim_settings: dict[str, Any]) -> Flask:
    app = make_app(
        instance,
        **sim_settings,
        PUBLIC_URL=PUBLIC,
        LOGIN_FAILURE_LIMIT_PER_IP=1000,
        TOKEN_HTTP_TIMEOUT=2,
        TOKEN_ATTEMPTS=1,
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


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    client = app.test_client()
    AuthActions(app, client).login()
    return client


# ------------------------------------------------------------------------------ linking


def preset_client(app: Flask, provider: str, client_id: str, secret: str, tenant: str = "") -> Any:
    grant = providers.AUTHORIZATION_CODE
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
        "smtp_delivery": "smtp",  # SMTP AUTH, so that Exchange's own SMTP refusals show
    }
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        return oauth_clients.save_client(owner, values, secret)


def link(web: FlaskClient, provider: str, client: Any, address: str, sign_in: Callable) -> None:
    """/accounts/new → the simulator's sign-in page → /authorize, as a browser does."""
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


class Linked:
    """A linked mailbox: its address, the account's id, the simulator app's client id."""

    def __init__(self, app: Flask, address: str, client_id: str) -> None:
        self.app, self.address, self.client_id = app, address, client_id
        with app.app_context():
            account = Account.get(Account.address == address)
            self.id = account.id
            linking.add_password(account.owner, account, "Device", PASSWORD)

    def account(self) -> Account:
        with self.app.app_context():
            return Account.get_by_id(self.id)

    def token_runs_out(self) -> None:
        """The stored access token is past its expiry: the next login renews it."""
        with self.app.app_context():
            Account.update(token_expires_at=utcnow()).where(Account.id == self.id).execute()


def microsoft(
    app: Flask, web: FlaskClient, sims: ProviderSims, app_options: dict | None = None, **user: Any
) -> Linked:
    entra_app = sims.entra.add_app(redirect_uris=[REDIRECT], **(app_options or {}))
    person = sims.entra_user("ms", seed=1, **user)
    client = preset_client(
        app, "microsoft365", entra_app.client_id, str(entra_app.secret), sims.entra.tenant.id
    )
    link(web, "microsoft365", client, person.email, lambda u: sims.entra_sign_in(u, person.email))
    return Linked(app, person.email, entra_app.client_id)


def google(app: Flask, web: FlaskClient, sims: ProviderSims, **options: Any) -> Linked:
    google_app = sims.google.add_app(redirect_uris=[REDIRECT], **options)
    person = sims.google_account("gm", seed=1)
    client = preset_client(app, "google", google_app.client_id, google_app.secret)
    link(web, "google", client, person.email, lambda u: sims.google_sign_in(u, person))
    return Linked(app, person.email, google_app.client_id)


LINK = {"microsoft": microsoft, "google": google}


# ------------------------------------------------------------------------------ what people see


def text(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def badge(web: FlaskClient, linked: Linked) -> str:
    """The account's status badge on its page, checked to be the same on the accounts list."""
    page = web.get(f"/accounts/{linked.id}").get_data(as_text=True)
    found = re.search(r'<span class="badge status-[^"]*">([^<]*)</span>', page)
    assert found, page
    listing = text(web.get("/").get_data(as_text=True)).replace(" ", "")
    assert linked.address in listing and found.group(1).replace(" ", "") in listing
    return html.unescape(found.group(1))


def account_page(web: FlaskClient, linked: Linked) -> str:
    return text(web.get(f"/accounts/{linked.id}").get_data(as_text=True))


def works(mail: MailClients, linked: Linked, protocol: str) -> None:
    """The protocol works through the proxy: INBOX opens, STAT counts, a message goes."""
    if protocol == "imap":
        conn = mail.imap(linked.address, PASSWORD, "imaps")
        assert conn.select("INBOX", readonly=True)[0] == "OK"
        conn.logout()
    elif protocol == "pop3":
        pop = mail.pop3(linked.address, PASSWORD, "pop3s")
        assert pop.stat()[0] >= 1
        pop.quit()
    else:
        smtp = mail.smtp(linked.address, PASSWORD)
        smtp.send_message(message(linked.address, linked.address, f"works-{time.time_ns()}"))
        smtp.quit()


def refused(mail: MailClients, linked: Linked, protocol: str) -> str:
    """What the mail client is told when ``protocol`` does not work (login or first command)."""
    if protocol == "imap":
        try:
            conn = mail.imap(linked.address, PASSWORD, "imaps")
            typ, data = conn.select("INBOX", readonly=True)
            conn.logout()
        except (imaplib.IMAP4.error, imaplib.IMAP4.abort) as exc:
            return str(exc)
        raise AssertionError(f"IMAP worked: {typ} {data}")
    return mail.refusal(protocol, linked.address, PASSWORD)


def message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("Through Auth-Email.\n")
    return msg


# ------------------------------------------------------------------ the mail server says no


MAIL_SERVER_REFUSALS = [
    # provider, situation, protocol refused, words the mail client and the account page show
    (
        "microsoft",
        "smtp_auth_disabled",
        "smtp",
        "SMTP AUTH is disabled for this mailbox",
        "535 5.7.139",
    ),  # fmt: skip
    (
        "microsoft",
        "smtp_auth_disabled_tenant",
        "smtp",
        "Set-TransportConfig",
        "SmtpClientAuthentication is disabled for the Tenant",
    ),  # fmt: skip
    (
        "microsoft",
        "security_defaults",
        "smtp",
        "Security defaults block SMTP AUTH",
        "security defaults",
    ),  # fmt: skip
    ("microsoft", "imap_disabled", "imap", "-ImapEnabled $true", "not connected"),
    ("microsoft", "pop_disabled", "pop3", "-PopEnabled $true", "Authentication failure"),
    ("google", "imap_disabled", "imap", "Enable IMAP", "not enabled for IMAP use"),
    ("google", "pop_disabled", "pop3", "Enable POP", "not enabled for POP access"),
]


@pytest.mark.parametrize(
    ("provider", "situation", "protocol", "client_words", "page_words"),
    MAIL_SERVER_REFUSALS,
    ids=[f"{p}-{s}" for p, s, *_ in MAIL_SERVER_REFUSALS],
)
def test_a_protocol_the_mail_server_refuses_is_refused_alone_with_the_fix(
    app: Flask,
    web: FlaskClient,
    sims: ProviderSims,
    mail: MailClients,
    provider: str,
    situation: str,
    protocol: str,
    client_words: str,
    page_words: str,
) -> None:
    linked = LINK[provider](app, web, sims)
    assert badge(web, linked) == "Active"
    if provider == "microsoft":
        sims.entra.situation(linked.address, situation)
    else:
        sims.google.situation(linked.address, situation)

    said = refused(mail, linked, protocol)
    assert client_words.lower() in said.lower(), said
    mail.flush()
    for other in {"imap", "pop3", "smtp"} - {protocol}:
        works(mail, linked, other)
    name = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}[protocol]
    assert badge(web, linked) == f"Active, {name} refused"
    page = account_page(web, linked)
    assert f"{name} Refused by the mail server" in page
    assert page_words.lower() in page.lower(), page
    assert linked.account().status == "active"  # nothing to re-authorize


# ------------------------------------------------------------------ the token endpoint says no


def _microsoft_user(name: str) -> Callable[[ProviderSims, Linked], None]:
    def play(sims: ProviderSims, linked: Linked) -> None:
        if name == "password_changed":
            sims.entra.change_password(linked.address, "new-" + secrets.token_hex(4))
        else:
            sims.entra.situation(linked.address, name)

    return play


def _google_user(name: str) -> Callable[[ProviderSims, Linked], None]:
    return lambda sims, linked: sims.google.situation(linked.address, name)


def _fault(provider: str, kind: str) -> Callable[[ProviderSims, Linked], None]:
    def play(sims: ProviderSims, linked: Linked) -> None:
        sim = sims.entra if provider == "microsoft" else sims.google
        sim.token_fault(kind, client_id=linked.client_id, retry_after=120, hang=5)

    return play


def _secret_expired(sims: ProviderSims, linked: Linked) -> None:
    sims.entra.app_situation(linked.client_id, "secret_expired")


def _google_testing_app(sims: ProviderSims, linked: Linked) -> None:
    sims.google.clock.advance(8 * 86400)  # a Testing app's refresh token dies after 7 days


def _google_client_deleted(sims: ProviderSims, linked: Linked) -> None:
    sims.google.delete_app(linked.client_id)


REAUTH = "Needs re-authorization"
CANNOT_RENEW = "Cannot renew token"
TOKEN_REFUSALS: list[tuple[str, str, Any, str, str, dict[str, Any]]] = [
    # provider, id, what happens, badge, words on the account page, link options
    ("microsoft", "consent_revoked", _microsoft_user("consent_revoked"), REAUTH, "65001", {}),
    ("microsoft", "password_changed", _microsoft_user("password_changed"), REAUTH, "50173", {}),
    ("microsoft", "mfa_required", _microsoft_user("mfa_required"), REAUTH, "50076", {}),
    ("microsoft", "conditional_access", _microsoft_user("conditional_access"), REAUTH, "53003", {}),
    ("microsoft", "request_loop", _microsoft_user("throttled"), CANNOT_RENEW, "50196", {}),
    ("microsoft", "secret_expired", _secret_expired, CANNOT_RENEW, "7000222", {}),
    ("microsoft", "unavailable_503", _fault("microsoft", "unavailable"), CANNOT_RENEW, "503", {}),
    ("microsoft", "html_answer", _fault("microsoft", "html"), CANNOT_RENEW, "token", {}),
    ("microsoft", "truncated_json", _fault("microsoft", "truncated"), CANNOT_RENEW, "token", {}),
    (
        "microsoft",
        "no_access_token",
        _fault("microsoft", "no_access_token"),
        CANNOT_RENEW,
        "access token",
        {},
    ),  # fmt: skip
    ("microsoft", "hangs", _fault("microsoft", "hang"), CANNOT_RENEW, "time", {}),
    ("google", "revoked", _google_user("revoked"), REAUTH, "expired or revoked", {}),
    ("google", "password_changed", _google_user("password_changed"), REAUTH, "revoked", {}),
    ("google", "testing_app_7_days", _google_testing_app, REAUTH, "Testing", {"testing": True}),
    ("google", "client_deleted", _google_client_deleted, CANNOT_RENEW, "deleted", {}),
    ("google", "throttled_429", _fault("google", "throttled"), CANNOT_RENEW, "429", {}),
    ("google", "html_answer", _fault("google", "html"), CANNOT_RENEW, "token", {}),
    ("google", "hangs", _fault("google", "hang"), CANNOT_RENEW, "time", {}),
]


@pytest.mark.parametrize(
    ("provider", "play", "label", "page_words", "options"),
    [row[:1] + row[2:] for row in TOKEN_REFUSALS],
    ids=[f"{r[0]}-{r[1]}" for r in TOKEN_REFUSALS],
)
def test_a_renewal_the_provider_refuses_shows_the_reason_and_keeps_the_account(
    app: Flask,
    web: FlaskClient,
    sims: ProviderSims,
    mail: MailClients,
    provider: str,
    play: Callable[[ProviderSims, Linked], None],
    label: str,
    page_words: str,
    options: dict[str, Any],
) -> None:
    linked = LINK[provider](app, web, sims, **options)
    play(sims, linked)
    linked.token_runs_out()
    requests_log = sims.entra.requests if provider == "microsoft" else sims.google.requests
    before = requests_log.count(client_id=linked.client_id, grant_type="refresh_token")

    said = {p: refused(mail, linked, p) for p in ("imap", "pop3", "smtp")}
    words = {
        REAUTH: {"imap": "[AUTHORIZATIONFAILED]", "pop3": "-ERR [AUTH]", "smtp": "535 5.7.8"},
        CANNOT_RENEW: {"imap": "[UNAVAILABLE]", "pop3": "-ERR [SYS/TEMP]", "smtp": "454 4.7.0"},
    }[label]
    for protocol, reply in said.items():
        assert words[protocol] in reply, (protocol, reply)
    if label == REAUTH:
        assert all(f"{PUBLIC}/accounts/{linked.id}" in reply for reply in said.values()), repr(said)
    # three logins, one refused renewal: the others got the recorded reason at once
    after = requests_log.count(client_id=linked.client_id, grant_type="refresh_token")
    assert after - before == 1, (before, after)

    mail.flush()
    shown = badge(web, linked)
    assert shown == label and shown != "Active"
    page = account_page(web, linked)
    assert page_words.lower() in page.lower(), page
    account = linked.account()  # kept, with its passwords
    assert account.passwords.count() == 1
    assert account.status == ("needs_reauth" if label == REAUTH else "active")


def test_a_renewal_answer_with_expires_in_as_text_still_serves_the_mailbox(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    """Entra's JSON with ``"expires_in": "one hour"``: the access token is used (its lifetime
    assumed), nothing is lost, the mailbox keeps working and says so."""
    linked = microsoft(app, web, sims)
    sims.entra.token_fault("expires_in_text", client_id=linked.client_id, times=1)
    linked.token_runs_out()
    works(mail, linked, "imap")
    assert sims.entra.requests.count(client_id=linked.client_id, grant_type="refresh_token") == 1
    works(mail, linked, "pop3")
    assert badge(web, linked) == "Active"
    assert linked.account().token_expires_at > utcnow()


# ------------------------------------------------------------------ shared mailboxes (SMTP)


def shared_mailbox(
    app: Flask, web: FlaskClient, sims: ProviderSims, send_as: bool
) -> tuple[Linked, str]:
    """A shared mailbox linked by its delegate (FullAccess; SendAs when ``send_as``)."""
    entra_app = sims.entra.add_app(redirect_uris=[REDIRECT])
    delegate = sims.entra_user("delegate", seed=0)
    shared = sims.entra_user("team", seed=1, shared=True)
    sims.entra.grant_full_access(shared.email, delegate.email)
    if send_as:
        sims.entra.grant_send_as(shared.email, delegate.email)
    client = preset_client(
        app, "microsoft365", entra_app.client_id, str(entra_app.secret), sims.entra.tenant.id
    )
    link(web, "microsoft365", client, shared.email, lambda u: sims.entra_sign_in(u, delegate.email))
    return Linked(app, shared.email, entra_app.client_id), delegate.email


def test_a_shared_mailbox_sends_as_itself_logged_in_as_its_delegate(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    linked, delegate = shared_mailbox(app, web, sims, send_as=True)
    account = linked.account()
    assert account.status == "active" and account.signed_in_as == delegate  # the token's upn
    page = account_page(web, linked)
    assert f"Signed in as {delegate} (shared or delegated mailbox)" in page
    assert "SMTP Refused" not in page  # the link check logged in to SMTP as the delegate
    assert badge(web, linked) == "Active"

    subject = f"from-the-team-{time.time_ns()}"
    smtp = mail.smtp(linked.address, PASSWORD)  # the device knows only the shared address
    assert smtp.send_message(message(linked.address, linked.address, subject)) == {}
    smtp.quit()
    assert sims.peers.wait_for_message(linked.address, subject)
    # Exchange saw the delegate's SMTP login, and the shared address in From
    assert sims.exchange.sent[-1] == (delegate, linked.address, [linked.address])
    works(mail, linked, "imap")  # IMAP and POP3 open the shared mailbox itself
    works(mail, linked, "pop3")


def test_a_shared_mailbox_without_send_as_gets_exchanges_refusal_after_data(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    linked, delegate = shared_mailbox(app, web, sims, send_as=False)
    smtp = mail.smtp(linked.address, PASSWORD)  # the login works: it is the delegate's
    with pytest.raises(smtplib.SMTPDataError) as refused_data:
        smtp.send_message(message(linked.address, linked.address, "not allowed"))
    smtp.quit()
    assert refused_data.value.smtp_code == 554
    said = refused_data.value.smtp_error.decode()
    assert said.startswith("5.2.252 SendAsDenied;") and f"{delegate} not allowed" in said
    assert not any(sent[1] == linked.address for sent in sims.exchange.sent)
    assert linked.account().status == "active"


def test_the_delegate_typed_on_the_account_page_signs_in_and_sends(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    """A token that names nobody (no openid, an opaque access token): the person types who
    authorizes the shared mailbox; bad input is refused next to the field, nothing saved."""
    linked, delegate = shared_mailbox(app, web, sims, send_as=True)
    with app.app_context():
        Account.update(signed_in_as="").where(Account.id == linked.id).execute()
    page = f"/accounts/{linked.id}"
    for typed, error in [
        ("not an address", "Enter an email address such as name@example.com."),
        (linked.address.upper(), "That is this mailbox's own address"),
        ("x" * 250 + "@example.test", "Field cannot be longer than 254 characters."),
    ]:
        answer = post_form(web, f"{page}/delegate", {"delegate": typed}, form_page=page)
        assert answer.status_code == 400
        shown = answer.get_data(as_text=True)
        assert 'aria-invalid="true"' in shown and error in html.unescape(shown), typed
        assert linked.account().signed_in_as == ""
    saved = post_form(web, f"{page}/delegate", {"delegate": f" {delegate.upper()} "}, page)
    assert saved.status_code == 302
    assert linked.account().signed_in_as == delegate
    assert f"mail is sent logged in as {delegate}" in html.unescape(
        web.get(page).get_data(as_text=True)
    )

    # re-authorizing prefills the provider's sign-in page with the delegate, never the mailbox
    start = post_form(web, f"{page}/reauthorize", {}, form_page=page)
    assert start.status_code == 302
    location = start.headers["Location"]
    assert location.startswith(sims.entra.url)
    assert parse_qs(urlsplit(location).query)["login_hint"] == [delegate]

    subject = f"typed-delegate-{time.time_ns()}"
    smtp = mail.smtp(linked.address, PASSWORD)
    smtp.send_message(message(linked.address, linked.address, subject))
    smtp.quit()
    assert sims.exchange.sent[-1][:2] == (delegate, linked.address)

    cleared = post_form(web, f"{page}/delegate", {"delegate": ""}, form_page=page)
    assert cleared.status_code == 302 and linked.account().signed_in_as == ""


# ------------------------------------------------------------------ renewal figures, live


@pytest.mark.parametrize(("provider", "burst"), [("microsoft", 20), ("google", 10)])
def test_a_burst_of_logins_on_a_run_out_token_renews_it_once(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients, provider: str, burst: int
) -> None:
    """The refresh herd stays at one request; the renewal asks for the scope the provider
    granted (Entra's differs from the one requested) and every login gets in. Google's burst
    stays below Gmail's 15 simultaneous IMAP connections."""
    linked = LINK[provider](app, web, sims)
    requests_log = sims.entra.requests if provider == "microsoft" else sims.google.requests
    linked.token_runs_out()
    results: list[str] = []

    def login() -> None:
        try:
            works(mail, linked, "imap")
            results.append("ok")
        except Exception as exc:  # noqa: BLE001 - collected and shown below
            results.append(repr(exc))

    threads = [threading.Thread(target=login) for _ in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["ok"] * burst, results
    assert requests_log.count(client_id=linked.client_id, grant_type="refresh_token") == 1
    account = linked.account()
    assert account.token_expires_at > utcnow() and account.refresh_failures == 0
    if provider == "microsoft":  # Entra grants the resource's scopes, without offline_access
        assert "offline_access" not in account.granted_scope
        assert "https://outlook.office.com/IMAP.AccessAsUser.All" in account.granted_scope


def test_a_session_whose_token_runs_out_is_ended_by_exchange_and_the_next_login_renews(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    """Exchange ends an IMAP session when its token expires (``* BYE Session invalidated -
    AccessTokenExpired``); the mail client sees that line, and its next login gets a new token."""
    linked = microsoft(app, web, sims, app_options={"token_lifetime": 5})
    conn = mail.imap(linked.address, PASSWORD, "imaps")
    assert conn.select("INBOX")[0] == "OK"
    before = sims.entra.requests.count(client_id=linked.client_id, grant_type="refresh_token")
    with pytest.raises(imaplib.IMAP4.abort) as ended:  # within the token's 5 seconds
        for _ in range(40):
            conn.noop()
            time.sleep(0.25)
    assert "Session invalidated - AccessTokenExpired" in str(ended.value)
    works(mail, linked, "imap")
    after = sims.entra.requests.count(client_id=linked.client_id, grant_type="refresh_token")
    assert after == before + 1
    assert badge(web, linked) == "Active"


# ------------------------------------------------------------------ what a person sees (Chromium)


@pytest.fixture
def served(app: Flask) -> Iterator[list[LiveServer]]:
    """Started by the test after linking (it moves PUBLIC_URL, the simulators' redirect URI)."""
    servers: list[LiveServer] = []
    yield servers
    for server in servers:
        server.close()


def badge_of(browser: Any, address: str) -> str:
    from selenium.webdriver.common.by import By

    row = browser.find_element(By.XPATH, f"//tr[contains(normalize-space(.), '{address}')]")
    return str(row.find_element(By.CSS_SELECTOR, ".badge").text)


@pytest.mark.browser
def test_the_dashboard_shows_what_each_provider_refused_at_every_width(
    app: Flask,
    web: FlaskClient,
    sims: ProviderSims,
    mail: MailClients,
    browser: Any,
    served: list[LiveServer],
) -> None:
    from selenium.webdriver.common.by import By

    revoked = microsoft(app, web, sims)
    sims.entra.situation(revoked.address, "consent_revoked")
    revoked.token_runs_out()
    no_imap = microsoft(app, web, sims)
    sims.entra.situation(no_imap.address, "imap_disabled")
    throttled = google(app, web, sims)
    sims.google.token_fault("throttled", client_id=throttled.client_id, retry_after=600)
    throttled.token_runs_out()
    for linked, protocol in ((revoked, "pop3"), (no_imap, "imap"), (throttled, "smtp")):
        refused(mail, linked, protocol)
    mail.flush()

    served.append(LiveServer(app))
    base = served[0].url
    sign_in(browser, base, ADMIN_EMAIL, ADMIN_PASSWORD)
    expected = {
        revoked.address: "Needs re-authorization",
        no_imap.address: "Active, IMAP refused",
        throttled.address: "Cannot renew token",
    }
    for width in WIDTHS:
        set_width(browser, width)
        browser.get(base + "/")
        for address, label in expected.items():
            assert badge_of(browser, address) == label, (width, address)
        assert layout_problems(browser, width) == []
        screenshot(browser, f"sims-accounts-{width}")

        browser.get(f"{base}/accounts/{revoked.id}")
        status = browser.find_element(By.ID, "account-status").text
        assert "authorize it again" in status and "65001" in status
        assert browser.find_element(By.ID, "reauthorize").is_displayed()
        assert layout_problems(browser, width) == []
        screenshot(browser, f"sims-revoked-{width}")

        browser.get(f"{base}/accounts/{no_imap.id}")
        imap_row = browser.find_element(By.CSS_SELECTOR, "tr[data-protocol='IMAP']").text
        assert "Refused by the mail server" in imap_row and "-ImapEnabled $true" in imap_row
        assert (
            "No refusal recorded"
            in browser.find_element(By.CSS_SELECTOR, "tr[data-protocol='POP3']").text
        )
        assert layout_problems(browser, width) == []

        browser.get(f"{base}/accounts/{throttled.id}")
        renewal = browser.find_element(By.ID, "renewal").text
        assert "cannot be renewed" in renewal and "next try" in renewal
        assert layout_problems(browser, width) == []
        screenshot(browser, f"sims-renewal-failing-{width}")


@pytest.mark.browser
def test_the_shared_mailbox_field_refuses_bad_input_beside_it_on_a_phone(
    app: Flask,
    web: FlaskClient,
    sims: ProviderSims,
    browser: Any,
    served: list[LiveServer],
) -> None:
    from selenium.webdriver.common.by import By

    linked: Linked = microsoft(app, web, sims)
    served.append(LiveServer(app))
    base = served[0].url
    sign_in(browser, base, ADMIN_EMAIL, ADMIN_PASSWORD)
    set_width(browser, 390)
    browser.get(f"{base}/accounts/{linked.id}")
    fill(browser, "delegate", linked.address)
    browser.find_element(By.ID, "save-delegate").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#shared-mailbox .error"))
    field = browser.find_element(By.ID, "delegate")
    assert field.get_attribute("aria-invalid") == "true"
    assert field.get_attribute("value") == linked.address  # what was typed stays
    error = browser.find_element(By.CSS_SELECTOR, "#shared-mailbox .error").text
    assert "this mailbox's own address" in error
    assert layout_problems(browser, 390) == []
    screenshot(browser, "account-delegate-error-390")

    delegate = sims.entra_user("boss", seed=0).email
    fill(browser, "delegate", delegate)
    browser.find_element(By.ID, "save-delegate").click()
    wait_for(browser, lambda d: "mail is sent logged in as" in d.page_source)
    assert browser.find_element(By.ID, "delegate").get_attribute("value") == delegate
    assert linked.account().signed_in_as == delegate
    for width in WIDTHS:
        set_width(browser, width)
        browser.get(f"{base}/accounts/{linked.id}")
        assert layout_problems(browser, width) == []
        screenshot(browser, f"account-delegate-saved-{width}")


def test_a_fourth_smtp_session_of_a_mailbox_is_told_to_come_back_and_nothing_is_marked(
    app: Flask, web: FlaskClient, sims: ProviderSims, mail: MailClients
) -> None:
    """Exchange allows 3 SMTP sessions per mailbox at once (432 4.3.2 for the next): a scanner
    that opens a fourth is told to try again later, the mailbox stays Active, and once one of
    the three is closed the next login works."""
    linked = microsoft(app, web, sims)
    open_sessions = [mail.smtp(linked.address, PASSWORD) for _ in range(3)]
    try:
        with pytest.raises(smtplib.SMTPResponseException) as fourth:
            mail.smtp(linked.address, PASSWORD)
        assert 400 <= fourth.value.smtp_code < 500, fourth.value  # temporary: retry later
        assert b"4.3.2" in fourth.value.smtp_error, fourth.value
        assert badge(web, linked) == "Active"
        assert "SMTP Refused" not in account_page(web, linked)
    finally:
        open_sessions.pop().quit()
    works(mail, linked, "smtp")
    for smtp in open_sessions:
        smtp.quit()
