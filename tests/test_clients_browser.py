"""The client editor in real headless Chromium: defaults follow provider, grant and tenant."""

from __future__ import annotations

import pytest

from models import OAuthClient
from oauth import providers
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD

pytestmark = pytest.mark.browser

TENANT = "11111111-2222-3333-4444-555555555555"
APP_ID = "00000000-aaaa-bbbb-cccc-000000000001"
SECRET = "browser-secret-value-0815"


def _sign_in(browser, base: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base + "/login")
    browser.find_element(By.NAME, "email").send_keys(ADMIN_EMAIL)
    browser.find_element(By.NAME, "password").send_keys(ADMIN_PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit].primary").click()
    _wait(browser, lambda d: "/login" not in d.current_url)


def _wait(browser, condition, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def _value(browser, name: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.NAME, name).get_attribute("value")


def test_add_microsoft_client_in_the_editor(app, auth, live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    auth.setup_admin()
    base = live_server.url
    _sign_in(browser, base)

    browser.get(base + "/settings/")
    browser.find_element(By.LINK_TEXT, "Add client").click()
    _wait(browser, lambda d: d.current_url.endswith("/settings/clients/new"))

    Select(browser.find_element(By.NAME, "provider")).select_by_value("google")
    _wait(browser, lambda d: _value(d, "token_url") == "https://oauth2.googleapis.com/token")
    tenant_field = browser.find_element(By.NAME, "tenant")
    assert not tenant_field.is_displayed()
    grant = Select(browser.find_element(By.NAME, "grant"))
    disabled = {o.get_attribute("value") for o in grant.options if not o.is_enabled()}
    assert disabled == {"client_credentials", "device_code", "password"}

    Select(browser.find_element(By.NAME, "provider")).select_by_value("microsoft365")
    code = providers.defaults_for("microsoft365", "authorization_code")
    _wait(browser, lambda d: _value(d, "authorize_url") == code["authorize_url"])
    assert _value(browser, "token_url") == code["token_url"]
    assert _value(browser, "scope") == code["scope"]
    assert tenant_field.is_displayed()

    tenant_field.clear()
    tenant_field.send_keys(TENANT)
    with_tenant = providers.defaults_for("microsoft365", "authorization_code", TENANT)
    _wait(browser, lambda d: _value(d, "token_url") == with_tenant["token_url"])
    assert _value(browser, "authorize_url") == with_tenant["authorize_url"]

    Select(browser.find_element(By.NAME, "grant")).select_by_value("client_credentials")
    cc = providers.defaults_for("microsoft365", "client_credentials", TENANT)
    _wait(browser, lambda d: _value(d, "scope") == "https://outlook.office365.com/.default")
    assert _value(browser, "token_url") == cc["token_url"]
    assert f"/{TENANT}/oauth2/v2.0/token" in cc["token_url"]
    assert not browser.find_element(By.NAME, "authorize_url").is_displayed()
    guide = browser.find_element(By.CSS_SELECTOR, '[data-guide="microsoft365:client_credentials"]')
    assert guide.is_displayed() and "New-ServicePrincipal" in guide.text

    scope = browser.find_element(By.NAME, "scope")
    scope.clear()
    scope.send_keys("something else")
    browser.find_element(By.CSS_SELECTOR, 'button[data-restore="scope"]').click()
    assert _value(browser, "scope") == cc["scope"]

    browser.find_element(By.NAME, "name").send_keys("Contoso app-only")
    browser.find_element(By.NAME, "client_id").send_keys(APP_ID)
    browser.find_element(By.NAME, "client_secret").send_keys(SECRET)
    browser.find_element(By.NAME, "submit").click()
    _wait(browser, lambda d: d.current_url.endswith("/settings/#custom-clients"))
    assert "Contoso app-only" in browser.page_source
    assert SECRET not in browser.page_source

    with app.app_context():
        saved = OAuthClient.get(OAuthClient.name == "Contoso app-only")
        assert (saved.provider, saved.grant, saved.tenant) == (
            "microsoft365",
            "client_credentials",
            TENANT,
        )
        assert saved.authorize_url == cc["authorize_url"] == ""
        assert saved.token_url == cc["token_url"]
        assert saved.scope == cc["scope"]
        assert saved.device_url == ""
        assert saved.client_id == APP_ID
        assert saved.client_secret == SECRET
