"""Account settings: the user's own password, their custom OAuth clients, their audit trail."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user
from werkzeug.wrappers import Response

from oauth import clients as oauth_clients
from people import audit, users
from people.passwords import verify_password
from web import audit_view
from web.forms import EmptyForm, PasswordChangeForm

bp = Blueprint("settings", __name__, url_prefix="/settings")


def render_settings(password_form: PasswordChangeForm | None = None, status: int = 200):
    return render_template(
        "settings/index.html",
        password_form=password_form or PasswordChangeForm(),
        clients={**oauth_clients.overview(current_user), "action": EmptyForm()},
    ), status


@bp.get("/")
@login_required
def index():
    return render_settings()


@bp.post("/password")
@login_required
def change_password() -> Response | tuple[str, int]:
    form = PasswordChangeForm()
    if form.validate_on_submit():
        if not verify_password(current_user.password_hash, form.current.data):
            form.current.errors.append("This is not your current password.")
            return render_settings(form, 400)
        user = current_user._get_current_object()
        users.set_password(user, form.password.data)
        login_user(user)  # keep this session; the others end
        audit.record_request("user.password_changed")
        flash("Your password is changed. Other sessions have been signed out.", "success")
        return redirect(url_for("settings.index"))
    return render_settings(form, 400)


@bp.get("/activity")
@login_required
def activity() -> str:
    context = audit_view.page_context(request.args, actor=current_user.id)
    return render_template("admin/audit.html", **context)
