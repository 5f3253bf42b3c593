"""Operations endpoints: ``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

import hmac
import socket

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config import is_loopback_host
from mailboxes import listeners as mail_listeners
from mailproxy.settings import parse_hostport
from store.db import database

bp = Blueprint("ops", __name__)


def listener_checks(app: Flask) -> dict[str, bool]:
    """Whether each configured mail listener accepts a TCP connection right now."""
    results = {}
    for name, value in mail_listeners.addresses(app).items():
        host, port = parse_hostport(value)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        try:
            with socket.create_connection((host, port), timeout=1.0):
                results[name] = True
        except OSError:
            results[name] = False
    return results


def database_ok() -> bool:
    try:
        database.execute_sql("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    checks = {"database": database_ok(), **listener_checks(current_app)}
    healthy = all(checks.values())
    return jsonify(status="ok" if healthy else "unhealthy", checks=checks), 200 if healthy else 503


@bp.get("/metrics")
def metrics() -> Response:
    """Counters only: no address and no secret is ever a label value."""
    access = current_app.config["METRICS_ACCESS"]
    if access == "loopback":
        # A request relayed by a reverse proxy is not local, even if the proxy itself is.
        relayed = "X-Forwarded-For" in request.headers or "Forwarded" in request.headers
        if relayed or not is_loopback_host(request.remote_addr):
            abort(404)
    elif access != "open":
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), access.encode()):
            abort(404)
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
