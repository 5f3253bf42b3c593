"""The web baseline: CSRF, headers, 404s, admin-only pages."""

from __future__ import annotations

from tests.helpers.app import USER_PASSWORD
from tests.helpers.web import post_form


def test_post_without_csrf_token_is_rejected(auth, client, app):
    auth.setup_admin()
    response = client.post(
        "/admin/users", data={"email": "x@example.org", "password": "abcdefghijk"}
    )
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert "This form expired" in page and "reload the page" in page.lower()
    assert "CSRF" not in page
    from models import User

    with app.app_context():
        assert User.by_email("x@example.org") is None


def test_wrong_csrf_token_is_rejected(auth, client):
    auth.setup_admin()
    response = client.post("/logout", data={"csrf_token": "forged"})
    assert response.status_code == 400
    assert client.get("/settings/").status_code == 200


def test_security_headers(client):
    response = client.get("/setup")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["Referrer-Policy"] == "no-referrer"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if "auth_email_session" in c)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_session_cookie_is_secure_when_public_url_is_https(instance):
    from tests.helpers.app import make_app

    app = make_app(instance, PUBLIC_URL="https://mail-bridge.example.org")
    assert app.config["SESSION_COOKIE_SECURE"] is True


def test_unknown_route_is_404_without_traceback(admin_client):
    response = admin_client.get("/no/such/page")
    assert response.status_code == 404
    assert "Traceback" not in response.get_data(as_text=True)


def test_server_error_page_has_no_traceback(instance):
    from tests.helpers.app import make_app

    app = make_app(instance, PROPAGATE_EXCEPTIONS=False)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret-detail-xyz")

    client = app.test_client()
    post_form(
        client,
        "/setup",
        {"email": "a@example.org", "password": "0123456789", "confirm": "0123456789"},
    )
    response = client.get("/boom")
    assert response.status_code == 500
    body = response.get_data(as_text=True)
    assert "secret-detail-xyz" not in body and "Traceback" not in body


def test_non_admin_cannot_reach_admin_pages(app, auth):
    auth.setup_admin()
    auth.create_user("bob@example.org")
    bob = app.test_client()
    post_form(bob, "/login", {"email": "bob@example.org", "password": USER_PASSWORD})
    for path in ("/admin/users", "/admin/settings", "/admin/audit", "/admin/users/1/password"):
        assert bob.get(path).status_code == 404, path
    token = post_form.__globals__["csrf_token"](bob, "/settings/")
    response = bob.post("/admin/users", data={"csrf_token": token, "email": "e@example.org"})
    assert response.status_code == 404


def test_pages_render_on_every_screen_for_admin(admin_client):
    for path in (
        "/",
        "/settings/",
        "/settings/activity",
        "/admin/users",
        "/admin/settings",
        "/admin/audit",
    ):
        response = admin_client.get(path)
        assert response.status_code == 200, path
        assert '<script src="/static/app.js"' in response.get_data(as_text=True)
