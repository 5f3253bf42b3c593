"""The web security baseline: CSRF, response headers, safe redirects and error pages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, render_template, request
from flask_login import current_user, login_required
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.routing import BaseConverter, ValidationError

from store.db import parse_id

csrf = CSRFProtect()

# No inline script or style anywhere; OAuth codes travel in URLs, so no Referer leaves.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class IdConverter(BaseConverter):
    """``<int:...>`` in every route: a row id that fits 64 bits, else the route does not match
    (404) before any query runs."""

    regex = r"\d+"
    part_isolating = True

    def to_python(self, value: str) -> int:
        number = parse_id(value)
        if number is None:
            raise ValidationError()
        return number

    def to_url(self, value: object) -> str:
        return str(int(value))  # type: ignore[call-overload]


def init_app(app: Flask) -> None:
    """Before any blueprint: the routes' ``int`` converter is the 64-bit id one."""
    app.url_map.converters["int"] = IdConverter
    csrf.init_app(app)

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        if request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(CSRFError)
    def _csrf(error: CSRFError) -> tuple[str, int]:
        return render_template("errors/400.html", expired=True), 400

    @app.errorhandler(400)
    def _bad(error: Exception) -> tuple[str, int]:
        return render_template("errors/400.html", reason="The request was not understood."), 400

    @app.before_request
    def _no_files() -> tuple[str, int] | None:
        """No form here takes a file: one sent anyway (say, as the login email) is a 400, not a
        FileStorage reaching a string field."""
        if request.method == "POST" and request.files:
            return render_template("errors/400.html", reason="This form takes no files."), 400
        return None

    @app.errorhandler(413)
    def _too_large(error: Exception) -> tuple[str, int]:
        return render_template("errors/400.html", reason="The request is too large."), 413

    @app.errorhandler(404)
    def _missing(error: Exception) -> tuple[str, int]:
        return render_template("errors/404.html"), 404

    @app.errorhandler(405)
    def _method(error: Exception) -> tuple[str, int]:
        return render_template("errors/404.html"), 405

    @app.errorhandler(500)
    def _broken(error: Exception) -> tuple[str, int]:
        return render_template("errors/500.html"), 500


def safe_next(target: str | None) -> str | None:
    """Accept a ``next`` URL only when it stays on this site (no scheme, no host)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target:
        return None
    return target


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Signed in and admin; anyone else gets a 404, which confirms nothing."""

    @wraps(view)
    @login_required
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_admin:
            abort(404)
        return view(*args, **kwargs)

    return wrapped
