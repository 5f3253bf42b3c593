"""The whole journey a person makes, in real headless Chromium, then real mail clients.

First visit → setup creates the administrator → sign out and in → Account settings → Add client
("Other (custom server)" with the OAuth server's URLs and Dovecot's servers, registered there with
``<live_server.url>/authorize``) → Accounts → Add account → the custom client (the only one, so
the authorization page's main button) → sign in and consent at the OAuth server → back through
``/authorize`` → set the mail-client password → the account is active. Then the serving process's
mail proxy runs on the same app, and stdlib IMAP, POP3 and SMTP clients use the address and that
password with the settings the "Mail client settings" page shows (ports, certificate fingerprint).
"""

from __future__ import annotations

import hashlib
import imaplib
import poplib
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailboxes.listeners import tls_files
from mailboxes.mailbackend import MailProxyService
from mailproxy.settings import LISTENER_NAMES
from models import Account, MailPassword, OAuthClient, PendingAuthorization
from tests.helpers.app import make_app
from tests.peerbed import op_password

pytestmark = [pytest.mark.peers, pytest.mark.browser]

ADMIN = "journey-admin@example.org"
ADMIN_PW = "journey-admin-password-1"
MAIL_PW = "journey-mail-" + secrets.token_hex(4)
CLIENT_NAME = "Team mail server"


@pytest.fixture
def app(instance: Path, peers: Any) -> Flask:
    """A fresh instance (no administrator yet) that trusts the peers' CA; proxy on free ports."""
    listeners = {f"{name.upper()}_LISTEN": "127.0.0.1:0" for name in LISTENER_NAMES}
    return make_app(instance, UPSTREAM_CA_FILE=peers.ca_file, **listeners)


@pytest.fixture
def proxy(app: Flask) -> Iterator[MailProxyService]:
    """The mail proxy as serve.py runs it; started by the test when the journey needs it."""
    service = MailProxyService(app)
    yield service
    service.stop()


def wait_for(driver: Any, condition: Any, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def fill(driver: Any, name: str, value: object) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(str(value))


def choose(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.NAME, name)).select_by_value(value)


def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def settings_table(page_text: str) -> dict[tuple[str, str], int]:
    """(protocol, security) -> port, as the mail-client settings page lists them."""
    found = re.findall(r"(IMAP|POP3|SMTP)(?: \(outgoing\))? (\d+) (SSL/TLS|STARTTLS)", page_text)
    return {(proto, security): int(port) for proto, port, security in found}


def test_the_whole_journey_from_first_visit_to_mail_through_the_proxy(
    app: Flask, live_server: Any, browser: Any, peers: Any, proxy: MailProxyService
) -> None:
    from selenium.webdriver.common.by import By

    base = live_server.url
    address, _ = peers.new_mailbox("journey", messages=2)
    client_id, secret = peers.register_client(redirect_uris=[f"{base}/authorize"])

    # First visit: the setup page creates the administrator (and signs them in).
    browser.get(base + "/")
    wait_for(browser, lambda d: d.current_url == f"{base}/setup")
    fill(browser, "email", ADMIN)
    fill(browser, "password", ADMIN_PW)
    fill(browser, "confirm", ADMIN_PW)
    click(browser, "main form button[type=submit]")
    wait_for(browser, lambda d: "Your administrator account is ready" in d.page_source)

    # Sign out, and back in.
    click(browser, "form.signout button")
    wait_for(browser, lambda d: d.current_url.startswith(f"{base}/login"))
    fill(browser, "email", ADMIN)
    fill(browser, "password", ADMIN_PW)
    click(browser, "main form button[type=submit].primary")
    wait_for(browser, lambda d: d.current_url.rstrip("/") == base)

    # Account settings → Add client: "Other (custom server)" with everything by hand.
    browser.find_element(By.LINK_TEXT, "Account settings").click()
    browser.find_element(By.LINK_TEXT, "Add client").click()
    wait_for(browser, lambda d: d.current_url.endswith("/settings/clients/new"))
    choose(browser, "provider", "other")
    choose(browser, "grant", "authorization_code")
    wait_for(browser, lambda d: d.find_element(By.NAME, "imap_host").is_displayed())
    fill(browser, "name", CLIENT_NAME)
    fill(browser, "authorize_url", peers.auth_url)
    fill(browser, "token_url", peers.token_url)
    fill(browser, "scope", "openid email mail")
    fill(browser, "client_id", client_id)
    fill(browser, "client_secret", secret)
    servers = {
        "imap": (peers.imap_port, "starttls"),
        "pop3": (peers.pop3s_port, "tls"),
        "smtp": (peers.submission_port, "starttls"),
    }
    for proto, (port, security) in servers.items():
        fill(browser, f"{proto}_host", peers.mail_host)
        fill(browser, f"{proto}_port", port)
        choose(browser, f"{proto}_security", security)
    fill(browser, "revocation_url", peers.revocation_url)
    browser.find_element(By.NAME, "submit").click()
    wait_for(browser, lambda d: d.current_url.endswith("/settings/#custom-clients"))
    assert CLIENT_NAME in browser.page_source and secret not in browser.page_source
    client = OAuthClient.get(OAuthClient.name == CLIENT_NAME)

    # Accounts → Add account → the custom client, the only usable one, is the main button.
    browser.find_element(By.LINK_TEXT, "Accounts").click()
    click(browser, "#add-account")
    fill(browser, "address", address)
    click(browser, "#address-form button[type=submit]")
    wait_for(browser, lambda d: d.find_elements(By.ID, "authorize-form"))
    buttons = browser.find_elements(By.CSS_SELECTOR, "#authorize-form button[type=submit]")
    assert buttons[-1].get_attribute("id") == f"authorize-client-{client.id}"
    assert buttons[-1].text == f"Authorize with {CLIENT_NAME}"
    buttons[-1].click()

    # Sign in and consent at the OAuth server's own pages.
    wait_for(browser, lambda d: d.current_url.startswith(peers.issuer))
    wait_for(browser, lambda d: d.find_elements(By.ID, "login-form"))
    fill(browser, "login", address)
    browser.find_element(By.ID, "password").send_keys(op_password(address))
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "allow"))
    browser.find_element(By.ID, "allow").click()

    # Back through /authorize to the account's page: linked, verified upstream.
    wait_for(browser, lambda d: d.current_url.startswith(f"{base}/accounts/"))
    account = Account.get(Account.address == address)
    assert browser.current_url == f"{base}/accounts/{account.id}"
    assert "is linked and its sign-in works" in browser.page_source
    taken = PendingAuthorization.get(PendingAuthorization.account == account)
    assert taken.consumed_at is not None  # the callback at /authorize consumed it

    # First link: set the password mail clients will use.
    assert "Set the password your mail clients will use" in browser.page_source
    fill(browser, "label", "Thunderbird")
    click(browser, "#choose-own")  # a generated password is the default; this one is typed
    fill(browser, "password", MAIL_PW)
    fill(browser, "confirm", MAIL_PW)
    click(browser, "#save-own-password")
    wait_for(browser, lambda d: "The password is saved" in d.page_source)
    assert MAIL_PW not in browser.page_source
    assert MailPassword.get(MailPassword.account == account).label == "Thunderbird"

    browser.find_element(By.LINK_TEXT, "Accounts").click()
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-account="{account.id}"]').text
    assert address in row and "Active" in row and CLIENT_NAME in row

    # The serving process's mail proxy starts; the person reads its settings page.
    proxy.start()
    browser.get(f"{base}/accounts/{account.id}")
    browser.find_element(By.LINK_TEXT, "Mail client settings").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "fingerprint"))
    click(browser, "#other-ports summary")  # the STARTTLS ports are folded away
    ports = settings_table(browser.find_element(By.TAG_NAME, "main").text)
    fingerprint = browser.find_element(By.ID, "fingerprint").text.strip()
    host = browser.find_element(By.ID, "mail-host").text.strip()
    assert host == "127.0.0.1"
    assert ports[("IMAP", "STARTTLS")] == proxy.controller.listening["imap"][1]
    trusted = ssl.create_default_context(cafile=tls_files(app)[0])

    # IMAP (STARTTLS listener): the certificate is the one whose fingerprint the page shows.
    imap = imaplib.IMAP4(host, ports[("IMAP", "STARTTLS")], timeout=20)
    imap.starttls(ssl_context=trusted)
    presented = imap.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert hashlib.sha256(presented).hexdigest() == fingerprint.replace(":", "").lower()
    imap.login(address, MAIL_PW)
    assert imap.select("INBOX", readonly=True)[0] == "OK"
    typ, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    part: Any = fetched[0]
    assert typ == "OK" and b"Seed message 1" in part[1]
    imap.logout()

    # POP3 (STLS listener).
    pop = poplib.POP3(host, ports[("POP3", "STARTTLS")], timeout=20)
    pop.stls(context=trusted)
    pop.user(address)
    pop.pass_(MAIL_PW)
    assert pop.stat()[0] == 2
    assert b"Subject: Seed message 2" in pop.retr(2)[1]
    pop.quit()

    # SMTP (submission, STARTTLS): the message arrives in the mailbox.
    subject = f"Hello from the journey {secrets.token_hex(4)}"
    msg = EmailMessage()
    msg["From"] = msg["To"] = address
    msg["Subject"] = subject
    msg.set_content("Sent by a mail client through Auth-Email.\n")
    smtp = smtplib.SMTP(host, ports[("SMTP", "STARTTLS")], timeout=20)
    smtp.starttls(context=trusted)
    smtp.login(address, MAIL_PW)
    smtp.send_message(msg)
    smtp.quit()
    assert peers.wait_for_message(address, subject)

    # The accounts page now shows the use.
    deadline = time.monotonic() + 10
    while Account.get_by_id(account.id).bytes_relayed == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    browser.find_element(By.LINK_TEXT, "Back to accounts").click()
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-account="{account.id}"]').text
    assert "from 127.0.0.1" in row and "0 bytes" not in row
