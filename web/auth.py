"""Signing in and out, first-run setup, and invite links."""

from __future__ import annotations

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import LoginManager, current_user, login_required, login_user, logout_user
from werkzeug.wrappers import Response

from models import User, utcnow
from people import audit, throttle, users
from people.passwords import verify_password
from store.db import Prepared
from web.forms import InviteAcceptForm, LoginForm, SetupForm
from web.security import safe_next

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in to continue."
login_manager.session_protection = "strong"


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """Session ids carry the user's session version: a password change ends old sessions."""
    try:
        pk, version = (int(part) for part in user_id.split(":"))
    except ValueError:
        return None
    found = _user_by_id(pk)
    user = found[0] if found else None
    if user is None or user.session_version != version or not user.is_enabled:
        return None
    return user


_user_by_id = Prepared(lambda pk: User.select().where(User.id == pk))


# Pages that work before any user exists: machines poll health, metrics and autoconfig.
OPEN_BEFORE_SETUP = {"auth.setup", "static", "ops.healthz", "ops.metrics", "mailsetup.autoconfig"}


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    app.register_blueprint(bp)

    setup_done = False  # this app's; users are never all deleted: ask only until one exists

    @app.before_request
    def _first_run() -> Response | None:
        """Until an administrator exists, every page leads to the setup page."""
        nonlocal setup_done
        if request.endpoint in OPEN_BEFORE_SETUP or setup_done:
            return None
        if not User.select().exists():
            return redirect(url_for("auth.setup"))
        setup_done = True
        return None


def check_login(email: str, password: str, ip: str) -> tuple[User | None, str | None]:
    """The user for these credentials, or an error message for a person.

    The attempt is counted before the password is verified (see throttle.py), per (IP, address),
    per IP and per address; while one is blocked the answer says when to retry and the password
    is not even checked.
    """
    keys = throttle.login_keys("web", email, ip, current_app.config)
    wait = throttle.retry_after(keys) or throttle.reserve(keys)
    if wait:
        return None, f"Too many failed sign-ins. Try again in {throttle.describe_wait(wait)}."
    user = User.by_email(email)
    if not verify_password(user.password_hash if user else None, password) or user is None:
        audit.record("login.failed", ip=ip, target=email)
        return None, "Invalid email or password."
    throttle.succeeded(keys)
    if not user.is_enabled:
        audit.record("login.disabled", actor=user, ip=ip)
        return None, "This user is disabled. Ask your administrator."
    return user, None


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str | tuple[str, int]:
    if current_user.is_authenticated:
        return redirect(url_for("accounts.index"))
    form = LoginForm()
    if form.validate_on_submit():
        user, error = check_login(form.email.data, form.password.data, request.remote_addr or "")
        if user is None:
            flash(error or "Invalid email or password.", "error")
            return render_template("auth/login.html", form=form), 401
        login_user(user, remember=form.remember.data)
        user.last_login_at = utcnow()
        user.save()
        audit.record_request("login.succeeded")
        return redirect(safe_next(request.args.get("next")) or url_for("accounts.index"))
    return render_template("auth/login.html", form=form)


@bp.post("/logout")
@login_required
def logout() -> Response:
    audit.record_request("logout")
    users.end_sessions(current_user)
    logout_user()
    flash("You are signed out, on this and every other device.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/setup", methods=["GET", "POST"])
def setup() -> Response | str | tuple[str, int]:
    """One-time creation of the administrator; gone once a user exists."""
    if User.select().exists():
        abort(404)
    form = SetupForm()
    if form.validate_on_submit():
        try:
            admin = users.create_admin(form.email.data, form.password.data)
        except users.UserError:
            abort(404)
        login_user(admin)
        audit.record_request("user.setup_admin", target=admin.email)
        flash("Welcome. Your administrator account is ready.", "success")
        return redirect(url_for("accounts.index"))
    return render_template("auth/setup.html", form=form)


@bp.route("/invite/<token>", methods=["GET", "POST"])
def invite(token: str) -> Response | str | tuple[str, int]:
    found = users.find_invite(token)
    if found is None:
        return render_template("auth/invite_invalid.html"), 404
    form = InviteAcceptForm()
    if form.validate_on_submit():
        try:
            user = users.accept_invite(found, form.password.data)
        except users.UserError as error:
            flash(error.message, "error")
            return render_template("auth/invite_invalid.html"), 409
        audit.record("user.invite_accepted", actor=user, ip=request.remote_addr or "")
        login_user(user)
        flash("Your password is set. Welcome.", "success")
        return redirect(url_for("accounts.index"))
    return render_template("auth/invite.html", form=form, email=found.email)
