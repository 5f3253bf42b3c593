"""The serving entry point as an operator runs it: ``python serve.py`` in its own process.

Configured only through AUTH_EMAIL_* variables (a fresh instance folder, the web UI and every mail
listener on free loopback ports); stopped with SIGTERM as systemd stops it.
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mailproxy.settings import LISTENER_NAMES
from tests.helpers.serving import free_port, serve_env, start, start_limited, wait_healthy


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("web", *LISTENER_NAMES)}


@pytest.fixture
def served(tmp_path: Path, ports: dict[str, int]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    listeners = {f"{n.upper()}_LISTEN": f"127.0.0.1:{ports[n]}" for n in LISTENER_NAMES}
    env = serve_env(
        tmp_path / "instance",
        BIND=f"127.0.0.1:{ports['web']}",
        PUBLIC_URL=f"http://127.0.0.1:{ports['web']}",
        **listeners,
    )
    log = tmp_path / "serve.log"
    process = start(env, log)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()  # only if the test failed before stopping it
            process.wait(10)


def test_serve_runs_web_ui_and_mail_proxy_and_stops_cleanly_on_sigterm(
    served: tuple[subprocess.Popen[bytes], Path], ports: dict[str, int]
) -> None:
    process, log = served
    base = f"http://127.0.0.1:{ports['web']}"

    health = wait_healthy(base, process, log)
    # A second serving process on the same instance folder refuses to start (keys, rotate-key).
    others = {n: str(free_port()) for n in ("web", *LISTENER_NAMES)}
    second_log = log.with_name("second.log")
    second = start(
        serve_env(
            log.parent / "instance",
            BIND=f"127.0.0.1:{others['web']}",
            **{f"{n.upper()}_LISTEN": f"127.0.0.1:{others[n]}" for n in LISTENER_NAMES},
        ),
        second_log,
    )
    assert second.wait(timeout=120) == 2
    assert "another process is serving the instance" in second_log.read_text()
    first_visit = requests.get(base + "/", timeout=30)
    with socket.create_connection(("127.0.0.1", ports["imap"]), timeout=5) as imap:
        greeting = imap.makefile("rb").readline()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)

    assert health.json()["checks"] == {"database": True, **dict.fromkeys(LISTENER_NAMES, True)}
    assert first_visit.url == base + "/setup"  # a fresh instance leads to the setup page
    assert "Create the administrator" in first_visit.text
    assert greeting.startswith(b"* OK") and b"IMAP4rev1" in greeting
    assert code == 0, log.read_text()
    output = log.read_text()
    assert "shutting down" in output and "Traceback" not in output
    assert "mail proxy running on the uvloop event loop" in output  # the default
    # Every database connection was closed: SQLite moved its write-ahead log into the file.
    assert (log.parent / "instance" / "auth-email.db").exists()
    assert not (log.parent / "instance" / "auth-email.db-wal").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/healthz", timeout=2)


@pytest.mark.parametrize("busy", ["IMAP_LISTEN", "BIND"])
def test_busy_port_makes_serve_exit_with_the_bind_error(tmp_path: Path, busy: str) -> None:
    settings = {f"{n.upper()}_LISTEN": "127.0.0.1:0" for n in LISTENER_NAMES}
    settings["BIND"] = "127.0.0.1:0"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings[busy] = f"127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        process = start(serve_env(tmp_path / "instance", **settings), log)
        try:
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    output = log.read_text()
    assert code not in (0, None), output
    assert "cannot start" in output and str(port) in output and "in use" in output, output
    assert "Traceback" not in output
    if busy == "BIND":
        assert "listening on" not in output  # nothing else started before the web UI's port


@pytest.mark.parametrize("trusted", ["127.0.0.1", ""])
def test_client_address_comes_from_the_trusted_proxy_only(instance, trusted):
    """Behind the documented reverse proxy the audit log and throttling see the real client,
    /metrics stays closed to relayed requests, and without the setting the header is ignored."""
    import re
    import threading

    import requests

    from models import AuditEvent
    from serve import web_server
    from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app

    app = make_app(instance, TRUSTED_PROXY=trusted)
    server = web_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    try:
        with app.app_context():
            from people import users

            users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
        relayed = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
        web = requests.Session()
        page = web.get(f"{url}/login", headers=relayed, timeout=10).text
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        web.post(
            f"{url}/login",
            data={"csrf_token": token, "email": ADMIN_EMAIL, "password": "wrong-password"},
            headers=relayed,
            timeout=10,
        )
        assert requests.get(f"{url}/metrics", headers=relayed, timeout=10).status_code == 404
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 200
        with app.app_context():
            failed = AuditEvent.get(AuditEvent.action == "login.failed")
        assert failed.ip == ("203.0.113.7" if trusted else "127.0.0.1")
    finally:
        server.close()


def test_serve_raises_its_open_file_limit_and_keeps_mail_connections_within_it(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    """From a soft limit of 1024 to the hard 4096: mail connections fit in it, and the web UI
    still answers when they push its descriptors past 1023 (where select() stops working)."""
    listeners = {f"{n.upper()}_LISTEN": f"127.0.0.1:{ports[n]}" for n in LISTENER_NAMES}
    env = serve_env(tmp_path / "instance", BIND=f"127.0.0.1:{ports['web']}", **listeners)
    log = tmp_path / "serve.log"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.skip(f"the test holds 1,100 connections, the hard open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1500), hard))
    process = start_limited(env, log, (1024, 4096))
    held: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{ports['web']}"
        wait_healthy(base, process, log)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        for i in range(1100):  # 220 from each of 5 addresses: below the limit per address
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 5}", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", ports["imap"]))
            held.append(s)
        greeted = sum(s.makefile("rb").readline().startswith(b"* OK") for s in held)
        health = requests.get(base + "/healthz", timeout=5)
        for s in held:
            s.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if process.poll() is None:
            process.kill()
            process.wait(10)
    open_files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert open_files.split()[3:5] == ["4096", "4096"]
    output = log.read_text()
    assert "open-file limit: 4096" in output
    # two descriptors per connection, 320 kept for the web UI, database and token requests
    assert "mail connections limited to 1888 instead of 4096" in output
    assert greeted == 1100
    assert health.status_code == 200, output[-2000:]


def test_serve_refuses_a_listener_key_readable_by_others(tmp_path: Path) -> None:
    from mailproxy import ensure_self_signed

    tls = tmp_path / "instance" / "tls"
    tls.mkdir(parents=True)
    key = tls / "key.pem"
    ensure_self_signed(str(tls / "cert.pem"), str(key), ["localhost"])
    key.chmod(0o644)
    settings = {f"{n.upper()}_LISTEN": "127.0.0.1:0" for n in LISTENER_NAMES}
    log = tmp_path / "serve.log"
    process = start(serve_env(tmp_path / "instance", BIND="127.0.0.1:0", **settings), log)
    try:
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = log.read_text()
    assert code == 2, output
    assert f"cannot start: the TLS key {key} is readable by other users" in output
    assert f"chmod 600 {key}" in output and "Traceback" not in output


def test_serve_refuses_an_event_loop_it_does_not_know(tmp_path: Path) -> None:
    settings = {f"{n.upper()}_LISTEN": "127.0.0.1:0" for n in LISTENER_NAMES}
    log = tmp_path / "serve.log"
    env = serve_env(tmp_path / "instance", BIND="127.0.0.1:0", MAIL_EVENT_LOOP="tokio", **settings)
    process = start(env, log)
    try:
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = log.read_text()
    assert code == 2, output
    assert "cannot start: MAIL_EVENT_LOOP must be one of uvloop, asyncio, not 'tokio'" in output
    assert "listening on" not in output and "Traceback" not in output


def test_repeated_accept_failures_of_the_web_server_make_one_line_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from serve import RareAcceptErrors

    logger = logging.getLogger("waitress.test-accept")
    logger.addFilter(RareAcceptErrors())
    with caplog.at_level(logging.WARNING, logger="waitress.test-accept"):
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.warning("server accept() threw an exception", exc_info=True)
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == [
        "the web UI cannot accept connections: [Errno 24] Too many open files "
        "(and 0 more since the last)",
        "something else",
    ]
    assert "Traceback" not in caplog.text


def test_mail_limits_come_from_the_app_settings(instance: Path) -> None:
    from mailboxes.mailbackend import proxy_settings
    from tests.helpers.app import make_app

    app = make_app(
        instance, MAIL_HANDSHAKE_TIMEOUT=4, MAIL_PRELOGIN_SECONDS=90, MAIL_PRELOGIN_COMMANDS=12
    )
    settings = proxy_settings(app)
    assert (settings.handshake_timeout, settings.prelogin_lifetime) == (4, 90)
    assert settings.max_prelogin_commands == 12
    assert settings.tls_key_group_readable is False  # the generated key is ours alone
