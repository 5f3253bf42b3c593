"""The dashboard's paths as people walk them, in real headless Chromium.

- An invited user without permission for custom clients reaches a linked mailbox with no dead
  end, once the administrator shared a client and made it the default: the first-run checklist
  leads the administrator there, and the invited user meets one primary button at every step
  (linking against the test bed's OAuth server, as the journey test does).
- The mail password flow: a label, a generated password by default shown large in monospace
  groups with Copy, "choose my own" behind a button, "Next: configure your mail client" beside it.
- Confirmations before Unlink (typing the address), Revoke and Disable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from selenium.webdriver.common.by import By

from mailboxes import linking
from models import Account, MailPassword, OAuthClient, User
from people import users
from people.passwords import verify_password
from tests.helpers.app import make_app
from tests.helpers.dashboard import (
    PHONE,
    choose,
    fill,
    screenshot,
    set_width,
    sign_in,
    sign_out,
    wait_for,
)
from tests.peerbed import op_password

ADMIN = "admin@example.test"
ADMIN_PW = "admin-password-long-1"
USER_PW = "user-password-long-1"
CLIENT_NAME = "Team mail server"


def primary_buttons(driver: Any) -> list[Any]:
    """The visible primary actions in the page's content."""
    found = driver.find_elements(By.CSS_SELECTOR, "main .primary")
    return [b for b in found if b.is_displayed()]


def checklist(driver: Any) -> dict[str, bool]:
    """The first-run checklist as shown: step key -> ticked."""
    items = driver.find_elements(By.CSS_SELECTOR, "#first-run li[data-step]")
    return {i.get_attribute("data-step"): "done" in i.get_attribute("class") for i in items}


@pytest.mark.peers
def test_invited_user_reaches_a_linked_mailbox_once_the_admin_shared_a_default(
    instance: Path, peers: Any, browser: Any
) -> None:
    from tests.helpers.web import LiveServer

    app = make_app(instance, UPSTREAM_CA_FILE=peers.ca_file)
    server = LiveServer(app)
    try:
        _first_run(app, server.url, peers, browser)
    finally:
        server.close()


def _first_run(app: Flask, base: str, peers: Any, browser: Any) -> None:
    with app.app_context():
        users.create_admin(ADMIN, ADMIN_PW)  # an internal domain, as create-admin allows
    client_id, secret = peers.register_client(redirect_uris=[f"{base}/authorize"])
    set_width(browser, PHONE)  # the whole path on a phone

    # The administrator's checklist: nothing done yet, and a warning that nobody can link.
    sign_in(browser, base, ADMIN, ADMIN_PW)
    assert checklist(browser) == dict.fromkeys(
        ("share", "default", "link", "password", "mailclient"), False
    )
    assert (
        "No provider has a default client yet"
        in browser.find_element(By.ID, "no-default-warning").text
    )

    # Step 1: add the team's client and share it (the checklist's link leads there).
    browser.find_element(By.LINK_TEXT, "Account settings").click()
    browser.find_element(By.LINK_TEXT, "Add client").click()
    choose(browser, "provider", "other")
    wait_for(browser, lambda d: d.find_element(By.NAME, "imap_host").is_displayed())
    fill(browser, "name", CLIENT_NAME)
    fill(browser, "authorize_url", peers.auth_url)
    fill(browser, "token_url", peers.token_url)
    fill(browser, "scope", "openid email mail")
    fill(browser, "client_id", client_id)
    fill(browser, "client_secret", secret)
    for proto, port, security in (
        ("imap", peers.imap_port, "starttls"),
        ("pop3", peers.pop3s_port, "tls"),
        ("smtp", peers.submission_port, "starttls"),
    ):
        fill(browser, f"{proto}_host", peers.mail_host)
        fill(browser, f"{proto}_port", port)
        choose(browser, f"{proto}_security", security)
    browser.find_element(By.NAME, "submit").click()
    wait_for(browser, lambda d: d.current_url.endswith("/settings/#custom-clients"))
    client = OAuthClient.get(OAuthClient.name == CLIENT_NAME)
    browser.find_element(By.CSS_SELECTOR, f"#client-{client.id} .actions button").click()
    wait_for(browser, lambda d: "now shared with the team" in d.page_source)

    # Step 2: the checklist ticks it, and leads to the default client.
    browser.find_element(By.LINK_TEXT, "Accounts").click()
    assert checklist(browser)["share"] and not checklist(browser)["default"]
    browser.find_element(By.LINK_TEXT, "Choose a default client").click()
    choose(browser, "default_other", str(client.id))
    browser.find_element(By.CSS_SELECTOR, "#default-clients button[type=submit]").click()
    wait_for(browser, lambda d: "Default clients saved" in d.page_source)
    browser.find_element(By.LINK_TEXT, "Accounts").click()
    assert checklist(browser)["default"]
    assert not browser.find_elements(By.ID, "no-default-warning")

    # The administrator invites someone without the custom-client permission.
    browser.find_element(By.LINK_TEXT, "Admin").click()
    invitee = "new.person@example.test"
    fill(browser, "email", invitee)
    browser.find_element(By.CSS_SELECTOR, "#add-user button[type=submit]").click()
    link = wait_for(browser, lambda d: d.find_element(By.ID, "invite-link")).get_attribute("value")
    browser.find_element(By.LINK_TEXT, "Back to users").click()
    assert invitee in browser.find_element(By.ID, "invites").text
    sign_out(browser)

    # The invited user: set a password, then the accounts page offers one way forward.
    browser.get(link)
    fill(browser, "password", USER_PW)
    fill(browser, "confirm", USER_PW)
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: "Your password is set" in d.page_source)
    assert not User.get(User.email == invitee).can_custom_clients
    assert not browser.find_elements(By.ID, "first-run")  # the checklist is the admin's
    assert not browser.find_elements(By.ID, "nothing-to-authorize")
    assert [b.text for b in primary_buttons(browser)] == ["Add account"]
    browser.find_element(By.ID, "add-account").click()

    # The authorization page: exactly one primary action, the shared default; nothing twice.
    address, _ = peers.new_mailbox("firstrun", messages=1)
    fill(browser, "address", address)
    browser.find_element(By.CSS_SELECTOR, "#address-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "authorize-form"))
    screenshot(browser, "flow-authorize-invited-390")
    primary = primary_buttons(browser)
    assert [b.text for b in primary] == [f"Authorize with {CLIENT_NAME}"]
    names = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#authorize-form button")]
    assert names.count(f"Authorize with {CLIENT_NAME}") == 1
    primary[0].click()

    # Sign in and consent at the OAuth server, back to the mailbox's page.
    wait_for(browser, lambda d: d.current_url.startswith(peers.issuer))
    wait_for(browser, lambda d: d.find_elements(By.ID, "login-form"))
    fill(browser, "login", address)
    browser.find_element(By.ID, "password").send_keys(op_password(address))
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "allow"))
    browser.find_element(By.ID, "allow").click()
    wait_for(browser, lambda d: d.current_url.startswith(f"{base}/accounts/"))
    account = Account.get(Account.address == address)
    assert account.status == "active" and account.owner.email == invitee
    assert "is linked and its sign-in works" in browser.page_source

    # The password: generated by default, then the next step right beside it.
    assert [b.text for b in primary_buttons(browser)] == ["Generate password"]
    fill(browser, "label", "Phone")
    browser.find_element(By.ID, "generate-password").click()
    shown = wait_for(browser, lambda d: d.find_element(By.ID, "shown-password")).text
    assert verify_password(MailPassword.get(MailPassword.account == account).password_hash, shown)
    screenshot(browser, "flow-password-shown-390")
    browser.find_element(By.ID, "next-mail-client").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "recommended-ports"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Mail client settings"
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommended-ports tbody tr")
    assert [r.text.split()[0] for r in rows] == ["IMAP", "POP3", "SMTP"]
    assert not browser.find_element(By.ID, "other-ports").get_attribute("open")


@pytest.mark.browser
def test_mail_password_flow_generated_by_default_own_behind_a_button(
    app: Flask, live_server: Any, browser: Any
) -> None:
    base = live_server.url
    user, account = _user_with_account("flow@example.test")
    sign_in(browser, base, "flow@example.test", USER_PW)
    browser.get(f"{base}/accounts/{account.id}")

    # The own password is folded away; the label is asked for; Generate is the main action.
    own = browser.find_element(By.ID, "own-password")
    assert not own.get_attribute("open")
    assert not browser.find_element(By.ID, "password").is_displayed()
    browser.find_element(By.ID, "generate-password").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))
    assert "Give the password a name." in browser.find_element(By.ID, "password-form").text
    assert MailPassword.select().count() == 0

    fill(browser, "label", "Laptop")
    browser.find_element(By.ID, "generate-password").click()
    box = wait_for(browser, lambda d: d.find_element(By.ID, "shown-password"))
    shown = box.text
    groups = box.find_elements(By.CSS_SELECTOR, ".group")
    assert len(groups) == 5 and all(len(g.text) == 4 for g in groups)
    style = browser.execute_script(
        "const s = getComputedStyle(arguments[0]); return [s.fontFamily, s.fontSize];", box
    )
    assert "mono" in style[0].lower() and float(style[1].removesuffix("px")) >= 24
    assert verify_password(MailPassword.get().password_hash, shown)
    # Copy puts exactly the password on the clipboard; the next step sits beside it.
    browser.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    browser.find_element(By.ID, "copy-password").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "copy-password").text == "Copied")
    pasted = browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], () => arguments[0](null));"
    )
    assert pasted == shown
    copy = browser.find_element(By.ID, "copy-password").rect
    nxt = browser.find_element(By.ID, "next-mail-client")
    assert nxt.text == "Next: configure your mail client"
    assert abs(nxt.rect["y"] - copy["y"]) < 10  # same row at 1280 px
    browser.get(f"{base}/accounts/{account.id}")
    assert shown not in browser.page_source  # shown once

    # "Choose my own password instead": the fields appear; a mismatch keeps them open.
    browser.find_element(By.ID, "choose-own").click()
    fill(browser, "label", "Scanner")
    fill(browser, "password", "scanner-password-1")
    fill(browser, "confirm", "scanner-password-2")
    browser.find_element(By.ID, "save-own-password").click()
    wait_for(browser, lambda d: "The passwords do not match." in d.page_source)
    assert browser.find_element(By.ID, "own-password").get_attribute("open")
    fill(browser, "password", "scanner-password-1")
    fill(browser, "confirm", "scanner-password-1")
    browser.find_element(By.ID, "save-own-password").click()
    wait_for(browser, lambda d: "The password is saved" in d.page_source)
    assert browser.find_element(By.ID, "next-mail-client").is_displayed()
    scanner = MailPassword.get(MailPassword.label == "Scanner")
    assert verify_password(scanner.password_hash, "scanner-password-1")


@pytest.mark.browser
def test_unlink_revoke_and_disable_ask_first(app: Flask, live_server: Any, browser: Any) -> None:
    base = live_server.url
    with app.app_context():
        users.create_admin(ADMIN, ADMIN_PW)
    user, account = _user_with_account("confirm@example.test")
    linking.add_password(user, account, "Laptop", "laptop-password-1")
    linking.add_password(user, account, "Scanner", "scanner-password-1")
    sign_in(browser, base, "confirm@example.test", USER_PW)

    # Revoke: a page that asks; Cancel keeps the password, Revoke removes it.
    browser.get(f"{base}/accounts/{account.id}")
    row = browser.find_element(By.XPATH, "//tr[td[normalize-space()='Scanner']]")
    row.find_element(By.LINK_TEXT, "Revoke").click()
    assert "Revoke “Scanner”?" in browser.find_element(By.TAG_NAME, "h1").text
    browser.find_element(By.LINK_TEXT, "Cancel").click()
    assert MailPassword.select().count() == 2
    row = browser.find_element(By.XPATH, "//tr[td[normalize-space()='Scanner']]")
    row.find_element(By.LINK_TEXT, "Revoke").click()
    browser.find_element(By.ID, "confirm-revoke-button").click()
    wait_for(browser, lambda d: "The password is revoked" in d.page_source)
    assert [p.label for p in MailPassword.select()] == ["Laptop"]

    # Unlink: the button works only once the address is typed.
    browser.find_element(By.ID, "unlink-start").click()
    button = browser.find_element(By.ID, "confirm-unlink-button")
    assert not button.is_enabled()
    fill(browser, "address", "other@example.test")
    assert not button.is_enabled()
    browser.execute_script("arguments[0].disabled = false", button)  # the server checks too
    button.click()
    wait_for(browser, lambda d: "exactly to unlink it" in d.page_source)
    assert Account.get_or_none(Account.id == account.id) is not None
    fill(browser, "address", "Confirm@Example.test")
    browser.find_element(By.ID, "confirm-unlink-button").click()
    wait_for(browser, lambda d: "is unlinked" in d.page_source)
    assert Account.get_or_none(Account.id == account.id) is None
    assert MailPassword.select().count() == 0
    sign_out(browser)

    # Disable: the administrator confirms on a page that says what happens.
    sign_in(browser, base, ADMIN, ADMIN_PW)
    browser.get(f"{base}/admin/users")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-user="{user.id}"]')
    row.find_element(By.LINK_TEXT, "Disable").click()
    assert "Disable confirm@example.test?" in browser.find_element(By.TAG_NAME, "h1").text
    assert User.get_by_id(user.id).is_enabled
    browser.find_element(By.ID, "confirm-disable-button").click()
    wait_for(browser, lambda d: "is disabled" in d.page_source)
    assert not User.get_by_id(user.id).is_enabled


def _user_with_account(email: str) -> tuple[User, Account]:
    from oauth import tokens

    owner = users.create_user(email, USER_PW, False)
    client = OAuthClient.create(
        owner=owner,
        name="Team app",
        provider="other",
        authorize_url="https://login.example.test/authorize",
        token_url="https://login.example.test/token",
        scope="mail",
        client_id="cid",
        client_secret="client-secret",
    )
    account = Account.create(
        owner=owner, address=email, provider="other", client=client, status="active"
    )
    tokens.store_tokens(account, {"access_token": "a", "refresh_token": "r"})
    return owner, Account.get_by_id(account.id)
