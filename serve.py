"""The serving process: the web UI under waitress and the mail proxy's event loop in one process.

``python serve.py`` (what ``make run`` calls). SIGINT and SIGTERM stop both cleanly.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from flask import Flask
from waitress import create_server

from app import create_app
from config import web_server_limits
from mailboxes.mailbackend import MailProxyService
from mailboxes.notifications import Notifier
from mailboxes.upkeep import Upkeep
from mailproxy.settings import parse_hostport
from store.db import close_database
from store.vault import KeyFileError, lock_instance

log = logging.getLogger("auth_email.serve")


class Service(Protocol):
    """Something that runs beside the web UI (the mail proxy, upkeep)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


def services(app: Flask) -> list[Service]:
    """What runs beside the web UI, for ``app``: the mail proxy, upkeep and notifications."""
    return [
        MailProxyService(app),
        Upkeep(interval=app.config["UPKEEP_INTERVAL_SECONDS"], app=app),
        Notifier(app),
    ]


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one (None: unlimited). Every mail connection
    needs up to two descriptors, and the proxy sizes its connection limit by this one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # an unlimited hard limit may be refused
            log.warning("cannot raise the open-file limit from %s to %s: %s", soft, hard, error)
    return None if soft == resource.RLIM_INFINITY else soft


class RareAcceptErrors(logging.Filter):
    """waitress logs a traceback for each failed accept() and tries again at once: a process out
    of file descriptors wrote hundreds of thousands of them. One line a minute says as much."""

    MESSAGE = "server accept() threw an exception"

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.last = -interval
        self.left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.left_out += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "the web UI cannot accept connections: %s (and %d more since the last)"
        record.args = (error, self.left_out)
        record.exc_info = record.exc_text = None
        self.last, self.left_out = now, 0
        return True


def web_server(app: Flask, host: str, port: int) -> Any:
    """The waitress server for the web UI; behind a reverse proxy, it takes the client's address
    from the proxy's X-Forwarded-* headers, and from no one else."""
    # Without a trusted proxy the headers stay visible but unused, so that /metrics can still
    # tell a relayed request from a local one.
    options: dict[str, Any] = {
        "threads": 8,
        "ident": "auth-email",
        "clear_untrusted_proxy_headers": False,
        # select() cannot watch descriptors above 1023, which the mail proxy's connections
        # push the web UI's past once the open-file limit is raised (raise_open_file_limit).
        "asyncore_use_poll": True,
        **web_server_limits(app.config),
    }
    if app.config["TRUSTED_PROXY"]:
        options.update(
            trusted_proxy=app.config["TRUSTED_PROXY"],
            trusted_proxy_count=1,
            trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"},
            clear_untrusted_proxy_headers=True,
        )
    return create_server(app, host=host, port=port, **options)


def main() -> int:
    try:
        app = create_app()
    except (KeyFileError, ValueError) as error:  # a key file, or a setting that cannot be used
        print(f"auth-email: cannot start: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=app.config["LOG_LEVEL"],
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("waitress").addFilter(RareAcceptErrors())
    log.info("open-file limit: %s", raise_open_file_limit() or "unlimited")
    if lock_instance(Path(app.instance_path)) is None:
        log.error("cannot start: another process is serving the instance %s", app.instance_path)
        return 2
    # The web UI's port first: a busy port is reported before anything else has started.
    host, port = parse_hostport(app.config["BIND"])
    try:
        server = web_server(app, host, port)
    except OSError as error:
        log.error(
            "cannot start: the web UI cannot listen on %s (BIND): %s", app.config["BIND"], error
        )
        return 2
    running: list[Service] = []
    try:
        for service in services(app):
            service.start()
            running.append(service)
    except (OSError, ValueError) as error:  # a port in use, a setting that cannot be used
        log.error("cannot start: %s", error)
        for service in reversed(running):
            service.stop()
        server.close()
        return 2

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("web UI on http://%s:%s/ (public URL %s)", host, port, app.config["PUBLIC_URL"])
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        log.info("shutting down")
        server.close()
        for service in reversed(running):
            service.stop()
        close_database(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
