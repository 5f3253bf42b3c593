"""First-run setup, signing in, throttling, invites and sessions."""

from __future__ import annotations

import time

from models import AuditEvent, User
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD, make_app
from tests.helpers.web import post_form


def test_first_visit_leads_to_setup(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response.location.endswith("/setup")
    assert "Create the administrator" in client.get("/setup").get_data(as_text=True)


def test_setup_creates_exactly_one_admin_and_then_closes(app, client, auth):
    auth.setup_admin()
    with app.app_context():
        assert User.select().count() == 1
        admin = User.get()
        assert admin.is_admin and admin.email == ADMIN_EMAIL
        assert admin.password_hash != ADMIN_PASSWORD
    assert client.get("/setup").status_code == 404
    other = app.test_client()
    assert other.get("/setup").status_code == 404
    with app.app_context():
        assert User.select().count() == 1


def test_setup_form_shows_errors_and_saves_nothing(app, client):
    response = post_form(
        client, "/setup", {"email": "not-an-email", "password": "short", "confirm": "other"}
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Enter an email address such as name@example.com." in page
    assert "Use at least 10 characters." in page
    assert "The passwords do not match." in page
    with app.app_context():
        assert User.select().count() == 0


def test_login_with_wrong_password_gives_one_generic_message(auth, client, app):
    auth.setup_admin()
    auth.logout()
    auth.create_user("bob@example.org")
    wrong_user = auth.login("nobody@example.org", "whatever-password")
    wrong_password = auth.login("bob@example.org", "not-the-password")
    assert wrong_user.status_code == wrong_password.status_code == 401
    for response in (wrong_user, wrong_password):
        assert "Invalid email or password." in response.get_data(as_text=True)
    assert auth.login("bob@example.org", USER_PASSWORD).status_code == 302
    with app.app_context():
        actions = [e.action for e in AuditEvent.select()]
    assert actions.count("login.failed") == 2 and "login.succeeded" in actions


def test_throttling_kicks_in_then_lifts(instance):
    app = make_app(instance, LOGIN_FAILURE_LIMIT=3, LOGIN_BLOCK_SECONDS=5)
    client = app.test_client()
    post_form(
        client,
        "/setup",
        {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "confirm": ADMIN_PASSWORD},
    )
    post_form(client, "/logout", {}, form_page="/settings/")
    for _ in range(3):
        post_form(client, "/login", {"email": ADMIN_EMAIL, "password": "wrong-password"})
    blocked = post_form(client, "/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert blocked.status_code == 401
    assert "Too many failed sign-ins. Try again in" in blocked.get_data(as_text=True)
    # a pause long enough for a loaded machine; then the block lifts (poll, do not guess)
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.5)
        allowed = post_form(client, "/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        if allowed.status_code == 302 or time.monotonic() > deadline:
            break
    assert allowed.status_code == 302


def test_next_is_followed_only_when_local(auth, client):
    auth.setup_admin()
    auth.logout()
    token_page = "/login?next=/settings/"
    local = post_form(client, token_page, {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert local.location.endswith("/settings/")
    auth.logout()
    for evil in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = post_form(
            client, f"/login?next={evil}", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        )
        assert "evil" not in response.location
        auth.logout()


def test_password_change_ends_other_sessions(app, auth, client):
    auth.setup_admin()
    other = app.test_client()
    post_form(other, "/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert other.get("/settings/").status_code == 200
    response = post_form(
        client,
        "/settings/password",
        {"current": ADMIN_PASSWORD, "password": "a-new-password-2", "confirm": "a-new-password-2"},
        form_page="/settings/",
    )
    assert response.status_code == 302
    assert client.get("/settings/").status_code == 200
    assert other.get("/settings/").status_code == 302


def test_password_change_needs_the_current_password(auth, client):
    auth.setup_admin()
    response = post_form(
        client,
        "/settings/password",
        {
            "current": "wrong-password",
            "password": "a-new-password-2",
            "confirm": "a-new-password-2",
        },
        form_page="/settings/",
    )
    assert response.status_code == 400
    assert "This is not your current password." in response.get_data(as_text=True)


def test_invite_link_works_once(app, auth, client):
    auth.setup_admin()
    response = post_form(
        client,
        "/admin/users",
        {"email": "carol@example.org", "password": ""},
        form_page="/admin/users",
    )
    assert response.status_code == 201
    page = response.get_data(as_text=True)
    link = page.split('id="invite-link" type="text" readonly value="')[1].split('"')[0]
    path = link.removeprefix("http://127.0.0.1:8080")
    visitor = app.test_client()
    response = post_form(
        visitor, path, {"password": "carols-password", "confirm": "carols-password"}
    )
    assert response.status_code == 302
    again = app.test_client().get(path)
    assert again.status_code == 404
    with app.app_context():
        assert User.by_email("carol@example.org") is not None


def test_tampered_session_cookie_signs_out(auth, client):
    auth.setup_admin()
    cookie = client.get_cookie("auth_email_session")
    assert cookie is not None
    client.set_cookie("auth_email_session", cookie.value[:-3] + "abc")
    assert client.get("/settings/").status_code == 302


def test_disabled_user_cannot_sign_in_and_is_signed_out(app, auth, client):
    auth.setup_admin()
    bob = auth.create_user("bob@example.org")
    bob_client = app.test_client()
    post_form(bob_client, "/login", {"email": "bob@example.org", "password": USER_PASSWORD})
    assert bob_client.get("/").status_code == 200
    post_form(client, f"/admin/users/{bob.id}/disable", {}, form_page="/admin/users")
    assert bob_client.get("/").status_code == 302
    response = post_form(
        bob_client, "/login", {"email": "bob@example.org", "password": USER_PASSWORD}
    )
    assert "disabled" in response.get_data(as_text=True)


def test_expired_invite_link_is_refused(app, auth):
    from people import users

    auth.setup_admin()
    with app.app_context():
        token = users.create_invite("late@example.org", User.by_email(ADMIN_EMAIL), False, hours=-1)
    visitor = app.test_client()
    assert visitor.get(f"/invite/{token}").status_code == 404
    response = visitor.post(f"/invite/{token}", data={"password": "x" * 12, "confirm": "x" * 12})
    assert response.status_code in (400, 404)
    with app.app_context():
        assert User.by_email("late@example.org") is None


def test_throttle_pauses_keep_doubling_after_a_block_ends(app):
    """A block that has just ended does not reset the count: the next failure blocks longer."""
    import datetime as dt

    from models import Throttle, utcnow
    from people import throttle

    key = throttle.Key("web:addr:x@example.org", throttle.Policy(limit=3, block_seconds=60))
    with app.app_context():
        for _ in range(3):
            assert throttle.reserve([key]) == 0  # an attempt not given back: a failure
        first = Throttle.get_by_id("web:addr:x@example.org")
        # The block ran out 20 minutes ago, and the last failure is older than the window.
        Throttle.update(
            last_failure_at=utcnow() - dt.timedelta(minutes=20),
            blocked_until=utcnow() - dt.timedelta(minutes=1),
        ).execute()
        assert throttle.reserve([key]) == 0
        second = Throttle.get_by_id("web:addr:x@example.org")
        assert second.failures == first.failures + 1
        assert second.blocked_until - utcnow() > dt.timedelta(seconds=100)
        # After a quiet window past the end of the block, the count starts over.
        Throttle.update(
            last_failure_at=utcnow() - dt.timedelta(hours=3),
            blocked_until=utcnow() - dt.timedelta(hours=2),
        ).execute()
        assert throttle.reserve([key]) == 0
        assert Throttle.get_by_id("web:addr:x@example.org").failures == 1
