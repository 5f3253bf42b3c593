"""The container image, built and run as an operator would: Containerfile → podman → volume.

The image is built from a Debian bookworm base bootstrapped here (tests/containerbed.py), started
with every setting given as AUTH_EMAIL_* variables, used (setup page, sign-in, mail greetings,
HEALTHCHECK), stopped with SIGTERM, and its instance data is then found on the volume.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mailproxy.settings import LISTENER_NAMES
from tests import containerbed
from tests.helpers.serving import free_port
from tests.peerbed import unavailable

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
GREETINGS = {
    "imap": b"* OK",
    "pop3": b"+OK",
    "submission": b"220 ",
}
TLS_GREETINGS = {"imaps": b"* OK", "pop3s": b"+OK", "smtps": b"220 "}


@pytest.fixture(scope="module")
def image() -> str:
    reason = containerbed.why_cannot_run()
    if reason:
        unavailable(reason)
    base = containerbed.base_image()
    # A fixed tag: its layers (the pip install above all) stay cached for the next run.
    tag = "localhost/auth-email:test"
    containerbed.build_image(ROOT, base, tag, containerbed.host_ca_bundle())
    return tag


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"auth-email-test-{uuid.uuid4().hex[:8]}"
    containerbed.podman("volume", "create", name)
    yield name
    containerbed.podman("volume", "rm", "--force", name, check=False)


def greeting(port: int, tls: bool) -> bytes:
    import ssl

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if not tls:
            return raw.recv(200)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the instance's generated self-signed certificate
        with context.wrap_socket(raw) as wrapped:
            return wrapped.recv(200)


def csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


def test_image_serves_and_keeps_its_instance_on_the_volume(image: str, volume: str) -> None:
    ports = {name: free_port() for name in ("web", *LISTENER_NAMES)}
    base = f"http://127.0.0.1:{ports['web']}"
    env = {
        "AUTH_EMAIL_BIND": f"127.0.0.1:{ports['web']}",
        "AUTH_EMAIL_PUBLIC_URL": base,
        **{f"AUTH_EMAIL_{n.upper()}_LISTEN": f"127.0.0.1:{ports[n]}" for n in LISTENER_NAMES},
    }
    name = f"auth-email-test-{uuid.uuid4().hex[:8]}"
    run = ["run", "--detach", "--name", name, *containerbed.RUN_OPTIONS]
    # The HEALTHCHECK's timer needs systemd; the test runs the check itself instead.
    run += ["--health-interval", "disable", "--volume", f"{volume}:/srv/auth-email/instance"]
    for key, value in env.items():
        run += ["--env", f"{key}={value}"]
    containerbed.podman(*run, image)
    try:
        _use_and_stop(name, base, ports)
    finally:
        shown = containerbed.podman("logs", name, check=False)
        logs = shown.stdout + shown.stderr
        containerbed.podman("rm", "--force", name, check=False)
    assert "shutting down" in logs

    # The instance data outlives the container, owned by the image's unprivileged user.
    mountpoint = containerbed.podman("volume", "inspect", volume, "--format", "{{.Mountpoint}}")
    instance = Path(mountpoint.stdout.strip())
    for file in ("auth-email.db", "vault.key", "secret_key"):
        stat = (instance / file).stat()
        assert stat.st_uid == 10001, file
        assert stat.st_mode & 0o077 == 0, file
    assert b"admin@example.org" in (instance / "auth-email.db").read_bytes()


def _use_and_stop(name: str, base: str, ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the container's web UI never became healthy"
        time.sleep(0.5)

    # The image's own HEALTHCHECK (python, no curl) agrees.
    assert containerbed.podman("healthcheck", "run", name, check=False).returncode == 0
    inspect = containerbed.podman("inspect", name, "--format", "{{.Config.User}}")
    assert inspect.stdout.strip() == "auth-email"

    # First run: every page leads to the setup page, which creates the administrator.
    web = requests.Session()
    page = web.get(base + "/", timeout=10)
    assert page.url.endswith("/setup")
    password = "container-admin-password-1"
    form = {"email": "admin@example.org", "password": password, "confirm": password}
    done = web.post(
        base + "/setup", data={"csrf_token": csrf(page.text), **form}, allow_redirects=False
    )
    assert done.status_code == 302, done.text[:500]
    web = requests.Session()
    login = web.get(base + "/login", timeout=10)
    signed_in = web.post(
        base + "/login",
        data={"csrf_token": csrf(login.text), "email": "admin@example.org", "password": password},
        timeout=10,
    )
    assert "Sign out" in signed_in.text or "/logout" in signed_in.text

    for listener, expected in GREETINGS.items():
        assert greeting(ports[listener], tls=False).startswith(expected), listener
    for listener, expected in TLS_GREETINGS.items():
        assert greeting(ports[listener], tls=True).startswith(expected), listener

    # podman stop sends the image's STOPSIGNAL (SIGTERM); a clean stop exits 0 well within 20 s.
    started = time.monotonic()
    containerbed.podman("stop", "--time", "20", name)
    assert time.monotonic() - started < 15
    state = containerbed.podman("inspect", name, "--format", "{{.State.ExitCode}}")
    assert state.stdout.strip() == "0"
