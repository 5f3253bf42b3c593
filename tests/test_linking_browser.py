"""Linking a mailbox with real headless Chromium: our pages, the OAuth server's, and back.

The app is served over HTTP (``live_server``); its redirect URI ``<live_server.url>/authorize`` is
registered at the OAuth server like an admin would register it at Entra or Google.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from models import Account, MailPassword, User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD, make_app
from tests.helpers.linking import PeerInfo, mailbox, peer_client, register

pytestmark = [pytest.mark.peers, pytest.mark.browser]


@pytest.fixture
def app(instance: Path, peer: PeerInfo) -> Flask:
    """The served app trusts the peers' CA (UPSTREAM_CA_FILE), as its admin would set it."""
    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file)
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


def wait_for(driver: Any, condition: Any, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout).until(condition)


def sign_in_here(driver: Any, base: str, email: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(USER_PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit].primary").click()
    wait_for(driver, lambda d: d.current_url.rstrip("/") == base)


def sign_in_at_provider(driver: Any, address: str, approve: bool = True) -> None:
    wait_for(driver, lambda d: d.find_elements(By.ID, "login-form"))
    login = driver.find_element(By.ID, "login")
    login.clear()
    login.send_keys(address)
    driver.find_element(By.ID, "password").send_keys("pw-" + address.split("@")[0])
    driver.find_element(By.ID, "submit").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "allow"))
    driver.find_element(By.ID, "allow" if approve else "deny").click()


def setup_user(app: Flask, peer: PeerInfo, redirect: str, **meta: Any) -> tuple[User, Any]:
    with app.app_context():
        user = users.create_user("browser@example.org", USER_PASSWORD, True)
    client = peer_client(user, peer, register(peer, redirect=redirect, **meta))
    return user, client


def test_authorization_code_with_pkce_in_chromium(
    app: Flask,
    live_server: Any,
    browser: Any,
    peer: PeerInfo,
) -> None:
    base = live_server.url
    _, client = setup_user(app, peer, f"{base}/authorize")
    address = mailbox("chrome")
    sign_in_here(browser, base, "browser@example.org")

    browser.get(f"{base}/accounts/new?address={address}")
    browser.find_element(By.ID, f"authorize-client-{client.id}").click()
    wait_for(browser, lambda d: d.current_url.startswith(peer.issuer))
    sign_in_at_provider(browser, address)
    wait_for(browser, lambda d: "/accounts/" in d.current_url and d.current_url.startswith(base))

    account = Account.get(Account.address == address)
    assert browser.current_url == f"{base}/accounts/{account.id}"
    assert account.status == "active", account.status_detail
    assert "is linked and its sign-in works" in browser.page_source

    # First link: the page asks for the mail-client password (here one of their own, twice).
    browser.find_element(By.ID, "label").send_keys("Thunderbird")
    browser.find_element(By.ID, "choose-own").click()
    browser.find_element(By.ID, "password").send_keys("mail-client-password-1")
    browser.find_element(By.ID, "confirm").send_keys("mail-client-password-1")
    browser.find_element(By.ID, "save-own-password").click()
    wait_for(browser, lambda d: "The password is saved" in d.page_source)
    assert MailPassword.get().label == "Thunderbird"
    browser.get(base + "/")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-account="{account.id}"]').text
    assert address in row and "Active" in row


def test_declining_at_the_provider_shows_the_cause(
    app: Flask,
    live_server: Any,
    browser: Any,
    peer: PeerInfo,
) -> None:
    base = live_server.url
    _, client = setup_user(app, peer, f"{base}/authorize")
    address = mailbox("decline")
    sign_in_here(browser, base, "browser@example.org")

    browser.get(f"{base}/accounts/new?address={address}")
    browser.find_element(By.ID, f"authorize-client-{client.id}").click()
    sign_in_at_provider(browser, address, approve=False)
    wait_for(browser, lambda d: d.find_elements(By.ID, "problem"))

    assert "declined" in browser.find_element(By.ID, "problem").text
    assert Account.get_or_none(Account.address == address) is None


def test_device_code_page_completes_by_itself(
    app: Flask,
    live_server: Any,
    browser: Any,
    peer: PeerInfo,
) -> None:
    base = live_server.url
    _, client = setup_user(app, peer, f"{base}/authorize")
    client.grant = "device_code"
    client.save()
    address = mailbox("device")
    sign_in_here(browser, base, "browser@example.org")

    browser.get(f"{base}/accounts/new?address={address}")
    browser.find_element(By.ID, f"authorize-client-{client.id}").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "user-code"))
    code = browser.find_element(By.ID, "user-code").get_attribute("value")
    peer.approve_device(code, address)
    wait_for(browser, lambda d: "is linked" in d.page_source, timeout=40)

    assert Account.get(Account.address == address).status == "active"
