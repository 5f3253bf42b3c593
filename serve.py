"""The serving process: the web UI under waitress and the mail proxy's event loop in one process.

``python serve.py`` (what ``make run`` calls). SIGINT and SIGTERM stop both cleanly.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from flask import Flask
from waitress import create_server

from app import create_app
from vault import KeyFileError, lock_instance

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


def web_server(app: Flask, host: str, port: int) -> Any:
    """The waitress server for the web UI; behind a reverse proxy, it takes the client's address
    from the proxy's X-Forwarded-* headers, and from no one else."""
    # Without a trusted proxy the headers stay visible but unused, so that /metrics can still
    # tell a relayed request from a local one.
    options: dict[str, Any] = {
        "threads": 8,
        "ident": "auth-email",
        "clear_untrusted_proxy_headers": False,
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
    except KeyFileError as error:
        print(f"auth-email: cannot start: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=app.config["LOG_LEVEL"],
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    if lock_instance(Path(app.instance_path)) is None:
        log.error("cannot start: another process is serving the instance %s", app.instance_path)
        return 2
    # The web UI's port first: a busy port is reported before anything else has started.
    host, port = split_bind(app.config["BIND"])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
