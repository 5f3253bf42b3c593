"""Helpers of the dashboard's browser tests: viewport widths, the layout check, screenshots.

The layout check is what a person on a phone notices: the page must not scroll sideways
(``scrollWidth <= innerWidth``) and nothing they can act on (a link, button, field, select or
summary) may lie outside the viewport horizontally, nor outside the card that holds it.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.peerbed import ARTIFACTS

PHONE, DESKTOP = 390, 1280
WIDTHS = (PHONE, DESKTOP)
SCREENSHOTS = ARTIFACTS / "screenshots"

_LAYOUT = """
const width = window.innerWidth;
const outside = [];
const actions = document.querySelectorAll(
  "a[href], button, input:not([type=hidden]), select, textarea, summary");
for (const el of actions) {
  if (el.classList.contains("skip-link")) continue;  // off-screen upwards until focused
  const box = el.getBoundingClientRect();
  if (box.width === 0 && box.height === 0) continue;  // not rendered (hidden, closed details)
  if (getComputedStyle(el).visibility === "hidden") continue;
  const span = `${Math.round(box.left)}..${Math.round(box.right)}`;
  if (box.left < -1 || box.right > width + 1) {
    outside.push(`${el.outerHTML.slice(0, 140)} spans ${span}`);
    continue;
  }
  // Nor may it stick out of its card (as a cell that left its table would).
  const card = el.closest(".card");
  const edge = card && card.getBoundingClientRect();
  if (edge && (box.left < edge.left - 1 || box.right > edge.right + 1)) {
    outside.push(`${el.outerHTML.slice(0, 140)} spans ${span}, out of its card`);
  }
}
return {scrollWidth: document.documentElement.scrollWidth, innerWidth: width, outside: outside};
"""


def wait_for(driver: Any, condition: Any, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout).until(condition)


def set_width(driver: Any, width: int, height: int = 900, dark: bool = False) -> None:
    """A viewport exactly ``width`` CSS pixels wide (as on a phone at 390), light or dark."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]},
    )


def layout_problems(driver: Any, width: int) -> list[str]:
    """What is wrong with the current page at ``width``: sideways scrolling, actions outside."""
    found = driver.execute_script(_LAYOUT)
    problems = []
    if found["innerWidth"] != width:
        problems.append(f"viewport is {found['innerWidth']} px, expected {width}")
    if found["scrollWidth"] > found["innerWidth"]:
        problems.append(f"scrolls sideways: {found['scrollWidth']} > {found['innerWidth']} px")
    problems.extend(f"action out of place: {text}" for text in found["outside"])
    return problems


def screenshot(driver: Any, name: str) -> Path:
    """The whole page (not only the viewport) as test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    width = driver.execute_script("return window.innerWidth")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "captureBeyondViewport": True,
            "clip": {
                "x": 0,
                "y": 0,
                "width": width,
                "height": min(size["height"], 8000),
                "scale": 1,
            },
        },
    )
    path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def sign_in(driver: Any, base: str, email: str, password: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit].primary").click()
    wait_for(driver, lambda d: d.current_url.rstrip("/") == base)


def sign_out(driver: Any) -> None:
    driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait_for(driver, lambda d: "/login" in d.current_url)


def fill(driver: Any, name: str, value: object) -> None:
    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(str(value))


def choose(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.NAME, name)).select_by_value(value)
