"""Every page of the dashboard at 390 px (a phone) and at 1280 px, in real headless Chromium.

Visited as a new administrator (nothing set up yet), as the administrator with linked mailboxes,
clients, invitations and a long audit log, and as an invited user without and with a linked
mailbox. On each page and width: no sideways scrolling and no link, button, field, select or
summary outside the viewport. Long values are used on purpose (addresses, client names, device
labels), since they are what broke the layout. Screenshots of the main pages at both widths (and
two in dark mode) land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from selenium.webdriver.common.by import By

from mailboxes import linking, notifychannels
from models import (
    Account,
    MailPassword,
    Notification,
    NotificationSettings,
    OAuthClient,
    PendingAuthorization,
    User,
    utcnow,
)
from oauth import clients as oauth_clients
from oauth import tokens
from people import audit, users
from tests.helpers.app import make_app
from tests.helpers.dashboard import (
    WIDTHS,
    choose,
    fill,
    layout_problems,
    screenshot,
    set_width,
    sign_out,
    wait_for,
)

pytestmark = [pytest.mark.browser]

ADMIN = "first.admin@example.test"  # a special-use domain: the setup page accepts it
ADMIN_PW = "admin-password-long-1"
USER = "invited.person.with.a.long.name@engineering.example.internal"
USER_PW = "user-password-long-1"
LONG_BOX = "shared-mailbox-for-the-accounting-department-2026@subsidiary.example.test"


@pytest.fixture
def app(instance: Path) -> Flask:
    return make_app(instance)


def make_client(owner: User, name: str, **over: Any) -> OAuthClient:
    values: dict[str, Any] = {
        "owner": owner,
        "name": name,
        "provider": "other",
        "grant": "authorization_code",
        "authorize_url": "https://login.example.test/authorize",
        "token_url": "https://login.example.test/token",
        "scope": "mail offline_access",
        "client_id": "client-" + secrets.token_hex(16),
        "client_secret": "secret-value",
        "imap_host": "imap.example.test",
        "imap_port": 993,
        "secret_set_at": utcnow(),
        **over,
    }
    return OAuthClient.create(**values)


def make_account(owner: User, address: str, client: OAuthClient, **over: Any) -> Account:
    account = Account.create(
        owner=owner, address=address, provider=client.provider, client=client, **over
    )
    tokens.store_tokens(account, {"access_token": "a-token", "refresh_token": "r-token"})
    return Account.get_by_id(account.id)


class Walk:
    """Visits pages at both widths and collects what is wrong; screenshots the main ones."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base
        self.problems: list[str] = []
        self.visited: list[str] = []

    def page(self, name: str, go: str | Callable[[Any], None], shot: bool = False) -> None:
        for width in WIDTHS:
            set_width(self.driver, width)
            if callable(go):
                go(self.driver)
            else:
                self.driver.get(self.base + go)
            self.driver.execute_script("return document.readyState")
            found = layout_problems(self.driver, width)
            self.problems.extend(f"{name} at {width} px: {p}" for p in found)
            self.visited.append(f"{name}@{width}")
            if shot:
                screenshot(self.driver, f"{name}-{width}")
        set_width(self.driver, WIDTHS[-1])

    def dark(self, name: str, path: str) -> None:
        for width in WIDTHS:
            set_width(self.driver, width, dark=True)
            self.driver.get(self.base + path)
            self.problems.extend(
                f"{name} (dark) at {width}: {p}" for p in layout_problems(self.driver, width)
            )
            screenshot(self.driver, f"{name}-dark-{width}")
        set_width(self.driver, WIDTHS[-1])


def test_every_page_fits_a_phone_and_a_desktop(app: Flask, live_server: Any, browser: Any) -> None:
    base = live_server.url
    walk = Walk(browser, base)

    # A new instance: the setup page, then the administrator's empty dashboard.
    walk.page("setup", "/setup", shot=True)
    set_width(browser, WIDTHS[0])
    browser.get(base + "/setup")
    fill(browser, "email", ADMIN)
    fill(browser, "password", ADMIN_PW)
    fill(browser, "confirm", ADMIN_PW)
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: "Your administrator account is ready" in d.page_source)
    admin = User.get(User.email == ADMIN)

    walk.page("accounts-first-run", "/", shot=True)
    walk.page("authorize-no-client", f"/accounts/new?address={LONG_BOX}", shot=True)
    walk.page("authorize-gmail-no-default", "/accounts/new?address=someone@gmail.com")
    walk.page("settings-empty", "/settings/")
    walk.page("admin-settings-no-client", "/admin/settings", shot=True)
    walk.page("client-editor-new", "/settings/clients/new", shot=True)

    def client_credentials(driver: Any) -> None:
        driver.get(base + "/settings/clients/new?provider=microsoft365")
        choose(driver, "grant", "client_credentials")

    walk.page("client-editor-client-credentials", client_credentials, shot=True)

    def other_server(driver: Any) -> None:
        driver.get(base + "/settings/clients/new")
        choose(driver, "provider", "other")

    walk.page("client-editor-other", other_server, shot=True)

    def editor_errors(driver: Any) -> None:
        driver.get(base + "/settings/clients/new")
        choose(driver, "provider", "other")
        driver.find_element(By.NAME, "submit").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "error-summary"))

    walk.page("client-editor-errors", editor_errors, shot=True)
    walk.page("not-found", "/no-such-page")

    # The administrator's instance in use: clients, defaults, mailboxes, invites, audit.
    team = make_client(
        admin, "Contoso Corporation Entra app registration (production)", shared=True
    )
    oauth_clients.set_default_client("other", team)
    make_client(
        admin,
        "Legacy device sign-in",
        provider="microsoft365",
        grant="device_code",
        tenant="contoso.onmicrosoft.com",
        client_id="00000000-0000-0000-0000-000000000001",
        secret_expires_on=dt.date.today() + dt.timedelta(days=5),
    )
    mine = make_account(
        admin, LONG_BOX, team, status="active", bytes_relayed=123456789, last_used_ip="203.0.113.77"
    )
    Account.update(last_refresh_at=utcnow() - dt.timedelta(minutes=2)).where(
        Account.id == mine.id
    ).execute()
    make_account(
        admin,
        "stale@example.test",
        team,
        status="needs_reauth",
        status_detail="The grant was revoked.",
    )
    linking.add_password(admin, mine, "Thunderbird on the office laptop in room 4.12", "p" * 16)
    scanner_label = "Scanner-on-the-second-floor-next-to-the-kitchen"
    linking.add_password(admin, mine, scanner_label, "s" * 16)
    password_id = mine.passwords.order_by(MailPassword.id.desc()).first().id
    other = users.create_user("colleague.with.a.rather.long.address@example.test", USER_PW, False)
    users.create_invite("new.colleague.arriving.next.month@example.test", admin, True, 72)
    for n in range(60):
        audit.record("mail.login_failed", ip="198.51.100.23", target=LONG_BOX, detail="imap")
        if n % 10 == 0:
            audit.record("login.succeeded", actor=admin, ip="127.0.0.1")
    pending = PendingAuthorization.create(
        state=secrets.token_hex(16),
        owner=admin,
        account=mine,
        client=team,
        user_code="WDJB-MJHT",
        verification_uri="https://microsoft.com/devicelogin",
        expires_at=utcnow() + dt.timedelta(minutes=15),
    )

    walk.page("accounts-admin", "/", shot=True)
    walk.page("account", f"/accounts/{mine.id}", shot=True)
    walk.page(
        "account-needs-reauth",
        "/accounts/{}".format(Account.get(Account.address == "stale@example.test").id),
    )

    def generated(driver: Any) -> None:
        driver.get(f"{base}/accounts/{mine.id}")
        fill(driver, "label", "Phone")
        driver.find_element(By.ID, "generate-password").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "shown-password"))

    walk.page("account-password-shown", generated, shot=True)

    def own_password_open(driver: Any) -> None:
        driver.get(f"{base}/accounts/{mine.id}")
        driver.find_element(By.ID, "choose-own").click()

    walk.page("account-own-password", own_password_open)
    walk.page("mail-client-settings", f"/accounts/{mine.id}/mail-client", shot=True)

    def other_ports(driver: Any) -> None:
        driver.get(f"{base}/accounts/{mine.id}/mail-client")
        driver.find_element(By.CSS_SELECTOR, "#other-ports summary").click()

    walk.page("mail-client-settings-other-ports", other_ports)
    walk.page("unlink-confirm", f"/accounts/{mine.id}/unlink", shot=True)
    walk.page("revoke-confirm", f"/accounts/{mine.id}/passwords/{password_id}/revoke")
    walk.page("device-code", f"/accounts/{mine.id}/device/{pending.state}", shot=True)
    walk.page("authorize-with-default", f"/accounts/new?address={LONG_BOX}", shot=True)
    walk.page("authorize-problem", "/authorize?state=unknown&code=x", shot=True)
    walk.page("settings-with-clients", "/settings/", shot=True)
    walk.page("client-editor-edit", f"/settings/clients/{team.id}/edit")
    walk.page("client-delete", f"/settings/clients/{team.id}/delete")
    walk.page("activity", "/settings/activity")
    walk.page("admin-users", "/admin/users", shot=True)
    walk.page("admin-disable-confirm", f"/admin/users/{other.id}/disable")
    walk.page("admin-reset-password", f"/admin/users/{other.id}/password")
    walk.page("admin-settings", "/admin/settings", shot=True)
    walk.page("admin-audit", "/admin/audit", shot=True)
    walk.page("admin-health", "/admin/health", shot=True)
    walk.page("admin-audit-page-2", "/admin/audit?page=2&kind=mail")

    # Notifications: the admin's sender, a person's settings with what was sent and what failed.
    walk.page("admin-notifications-empty", "/admin/notifications")
    notifychannels.save_sender(
        "relay",
        relay=notifychannels.Relay(
            host="smtp-relay.internal.contoso-corporation.example", port=587,
            username="auth-email-notifications@contoso-corporation.example",
            from_address="auth-email-notifications@contoso-corporation.example",
        ),
        password="relay-password",
    )  # fmt: skip
    prefs = NotificationSettings.of(admin.id)
    prefs.webhook_enabled, prefs.webhook_secret = True, "whsec_layout"
    prefs.webhook_url = "https://hooks.contoso-corporation.example/services/auth-email/" + "a" * 40
    prefs.save()
    for channel, status, error in [
        ("email", "sent", ""),
        ("webhook", "failed", "The webhook at hooks.contoso-corporation.example answered 500 "
         "Internal Server Error: {\"error\":\"upstream-service-temporarily-unavailable\"}"),
    ]:  # fmt: skip
        Notification.create(
            user=admin, account=mine, kind="reauth", subject=LONG_BOX, dedup=f"x|{channel}",
            channel=channel, title=f"{LONG_BOX} needs re-authorization", status=status,
            attempts=1 if status == "sent" else 5, last_error=error,
        )  # fmt: skip
    walk.page("admin-notifications", "/admin/notifications", shot=True)
    walk.page("notifications", "/settings/notifications", shot=True)

    def notification_errors(driver: Any) -> None:
        driver.get(base + "/settings/notifications")
        fill(driver, "webhook_url", "http://hooks.example.org/plain-http")
        driver.find_element(By.CSS_SELECTOR, "#notification-settings button[type=submit]").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "error-summary"))

    walk.page("notifications-errors", notification_errors, shot=True)

    def new_secret(driver: Any) -> None:
        driver.get(base + "/settings/notifications")
        driver.find_element(By.ID, "new-secret-button").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "shown-secret"))

    walk.page("notifications-secret-shown", new_secret, shot=True)

    def invite_link(driver: Any) -> None:
        driver.get(base + "/admin/users")
        driver.find_element(By.CSS_SELECTOR, "[id^=renew-invite-]").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "invite-link"))

    walk.page("admin-invite-link", invite_link, shot=True)

    def expired_form(driver: Any) -> None:
        driver.get(base + "/settings/")
        driver.execute_script(
            "const form = document.querySelector('#your-password form');"
            "form.querySelector('[name=csrf_token]').value = 'stale'; form.submit();"
        )
        wait_for(driver, lambda d: d.find_elements(By.ID, "bad-request"))

    walk.page("form-expired", expired_form, shot=True)
    walk.dark("accounts-admin", "/")
    walk.dark("account", f"/accounts/{mine.id}")

    # An invited user: the invitation, their empty dashboard, then with a linked mailbox.
    token = users.create_invite(USER, admin, False, 72)
    sign_out(browser)
    walk.page("login", "/login", shot=True)
    walk.page("invite-invalid", "/invite/not-a-real-token")
    walk.page("invite", f"/invite/{token}", shot=True)
    fill(browser, "password", USER_PW)
    fill(browser, "confirm", USER_PW)
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: "Your password is set" in d.page_source)
    user = User.get(User.email == USER)
    walk.page("accounts-invited-empty", "/", shot=True)
    walk.page("authorize-invited", "/accounts/new?address=" + USER, shot=True)
    walk.page("settings-invited", "/settings/", shot=True)
    walk.page("clients-not-allowed", "/settings/clients/new")
    walk.page("activity-invited", "/settings/activity")
    theirs = make_account(user, USER, team, status="active")
    walk.page("accounts-invited-linked", "/", shot=True)
    walk.page("account-invited", f"/accounts/{theirs.id}", shot=True)
    walk.page("mail-client-settings-invited", f"/accounts/{theirs.id}/mail-client")

    assert len(walk.visited) >= 90
    assert not walk.problems, "\n".join(walk.problems)
    # The whole-page rule on a phone held because things wrap, not because they are missing.
    set_width(browser, WIDTHS[0])
    browser.get(f"{base}/accounts/{theirs.id}/mail-client")
    fingerprint = browser.find_element(By.ID, "fingerprint")
    assert fingerprint.is_displayed() and fingerprint.size["height"] > 20  # wrapped lines
