"""The serving process: the web UI under waitress and the mail proxy's event loop in one process.

``python serve.py`` (what ``make run`` calls). SIGINT and SIGTERM stop both cleanly.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Protocol

from flask import Flask
from waitress import create_server

from app import create_app
from vault import KeyFileError

log = logging.getLogger("auth_email.serve")


class Service(Protocol):
    """Something that runs beside the web UI (the mail proxy, upkeep)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


def services(app: Flask) -> list[Service]:
    """What runs beside the web UI; each module that has one offers ``service(app)``."""
    found: list[Service] = []
    for factory in app.extensions.get("services", []):
        found.append(factory(app))
    return found


def split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main() -> int:
    try:
        app = create_app()
    except KeyFileError as error:
        print(f"auth-email: cannot start: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=app.config["LOG_LEVEL"],
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    # The web UI's port first: a busy port is reported before anything else has started.
    host, port = split_bind(app.config["BIND"])
    try:
        server = create_server(app, host=host, port=port, threads=8, ident="auth-email")
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
    except OSError as error:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
