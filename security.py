"""The web security baseline: CSRF, response headers, safe redirects and error pages."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect

csrf = CSRFProtect()

# No inline script or style anywhere; OAuth codes travel in URLs, so no Referer leaves.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def init_app(app: Flask) -> None:
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
