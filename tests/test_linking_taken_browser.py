"""The refusal of an address another user has linked, in real Chromium at 390 and 1280 px:
the Device Code page as for any address, then the refusal page once the device is approved.
Screenshots land in test-artifacts/screenshots/linking-taken-*.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from selenium.webdriver.common.by import By

from mailboxes import linking
from models import Account
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD, make_app
from tests.helpers.dashboard import (
    WIDTHS,
    layout_problems,
    screenshot,
    set_width,
    sign_in,
    wait_for,
)
from tests.helpers.linking import REDIRECT, PeerInfo, mailbox, peer_client, register

pytestmark = [pytest.mark.peers, pytest.mark.browser]

HOLDER, PROBER = "holder@example.org", "prober@example.org"


@pytest.fixture
def bed(peers: Any) -> PeerInfo:
    return PeerInfo(peers)


@pytest.fixture
def app(instance: Path, bed: PeerInfo) -> Flask:
    app = make_app(instance, UPSTREAM_CA_FILE=bed.ca_file)
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


def test_a_taken_address_is_refused_on_a_page_that_fits_a_phone(
    app: Flask, live_server: Any, browser: Any, bed: PeerInfo
) -> None:
    base = live_server.url
    with app.app_context():
        holder = users.create_user(HOLDER, USER_PASSWORD, True)
        prober = users.create_user(PROBER, USER_PASSWORD, True)
    address = mailbox("held")
    cc = peer_client(holder, bed, register(bed, mailbox=address), grant="client_credentials")
    assert linking.start(holder, address, cc, REDIRECT).done.ok  # type: ignore[union-attr]
    held = Account.get(Account.address == address)
    device = peer_client(prober, bed, register(bed), grant="device_code", name="My app")
    sign_in(browser, base, PROBER, USER_PASSWORD)
    problems: list[str] = []

    for width in WIDTHS:
        set_width(browser, width)
        browser.get(f"{base}/accounts/new?address={address}")
        browser.find_element(By.ID, f"authorize-client-{device.id}").click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "user-code"))
        assert f"/accounts/{held.id}/" not in browser.current_url
        problems += [f"device page at {width}: {p}" for p in layout_problems(browser, width)]
        screenshot(browser, f"linking-taken-device-{width}")
        code = browser.find_element(By.ID, "user-code").get_attribute("value")
        bed.approve_device(str(code), address)
        browser.find_element(By.CSS_SELECTOR, "#device-check button").click()
        wait_for(browser, lambda d: "already linked" in d.page_source)
        problems += [f"refusal at {width}: {p}" for p in layout_problems(browser, width)]
        screenshot(browser, f"linking-taken-refused-{width}")
        page = browser.page_source
        assert "already linked in this instance" in page and HOLDER not in page

    assert problems == []
    after = Account.get_by_id(held.id)
    assert (after.owner_id, after.status) == (holder.id, "active")
    assert Account.select().where(Account.owner == prober).count() == 0
