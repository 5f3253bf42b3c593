"""The admin's screens: users, invites, instance settings and the whole audit log."""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user
from werkzeug.wrappers import Response

from models import User, utcnow
from people import audit, invites, users
from people import instance_settings as stored_settings
from web import audit_view
from web.default_clients import default_clients_section
from web.forms import EmptyForm, InstanceSettingsForm, NewUserForm, ResetPasswordForm
from web.security import admin_required

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _user_or_404(user_id: int) -> User:
    user = User.get_or_none(User.id == user_id)
    if user is None:
        abort(404)
    return user


def _users_page(form: NewUserForm) -> str:
    return render_template(
        "admin/users.html",
        users=User.select().order_by(User.email),
        invites=invites.pending(),
        now=utcnow(),
        form=form,
        action=EmptyForm(),
    )


@bp.get("/users")
@admin_required
def user_list() -> str:
    return _users_page(NewUserForm(can_custom_clients=_new_user_default()))


def _new_user_default() -> bool:
    return stored_settings.new_users_custom_clients(current_app.config)


@bp.post("/users")
@admin_required
def user_create() -> Response | tuple[str, int]:
    form = NewUserForm()
    if not form.validate_on_submit():
        return _users_page(form), 400
    if form.password.data:
        user = users.create_user(form.email.data, form.password.data, form.can_custom_clients.data)
        audit.record_request("user.created", target=user.email)
        flash(f"User {user.email} created.", "success")
        return redirect(url_for("admin.user_list"))
    token = users.create_invite(
        form.email.data,
        current_user,
        form.can_custom_clients.data,
        current_app.config["INVITE_HOURS"],
    )
    audit.record_request("user.invited", target=form.email.data)
    return _invite_page(form.email.data, token)


def _invite_page(email: str, token: str) -> tuple[str, int]:
    link = current_app.config["PUBLIC_URL"] + url_for("auth.invite", token=token)
    hours = current_app.config["INVITE_HOURS"]
    return render_template("admin/invite_created.html", link=link, email=email, hours=hours), 201


@bp.post("/invites/<int:invite_id>/renew")
@admin_required
def invite_renew(invite_id: int) -> Response | tuple[str, int]:
    """A new link for a pending invitation (the old one stops working)."""
    invite = invites.get_pending(invite_id)
    if invite is None:
        abort(404)
    if not EmptyForm().validate_on_submit():
        abort(400)
    token = invites.renew(invite, current_app.config["INVITE_HOURS"])
    audit.record_request("user.invite_renewed", target=invite.email)
    return _invite_page(invite.email, token)


@bp.post("/invites/<int:invite_id>/revoke")
@admin_required
def invite_revoke(invite_id: int) -> Response:
    invite = invites.get_pending(invite_id)
    if invite is None:
        abort(404)
    if EmptyForm().validate_on_submit():
        invites.revoke(invite)
        audit.record_request("user.invite_revoked", target=invite.email)
        flash(f"The invitation for {invite.email} is revoked; its link no longer works.", "success")
    return redirect(url_for("admin.user_list"))


@bp.get("/users/<int:user_id>/disable")
@admin_required
def user_disable_confirm(user_id: int) -> str:
    user = _user_or_404(user_id)
    return render_template("admin/user_disable.html", user=user, form=EmptyForm())


@bp.post("/users/<int:user_id>/enable")
@admin_required
def user_enable(user_id: int) -> Response:
    return _set_enabled(user_id, True)


@bp.post("/users/<int:user_id>/disable")
@admin_required
def user_disable(user_id: int) -> Response:
    return _set_enabled(user_id, False)


def _set_enabled(user_id: int, enabled: bool) -> Response:
    user = _user_or_404(user_id)
    if EmptyForm().validate_on_submit():
        try:
            users.set_enabled(user, enabled)
        except users.UserError as error:
            flash(error.message, "error")
        else:
            audit.record_request("user.enabled" if enabled else "user.disabled", target=user.email)
            flash(f"{user.email} is {'enabled' if enabled else 'disabled'}.", "success")
    return redirect(url_for("admin.user_list"))


@bp.post("/users/<int:user_id>/custom-clients")
@admin_required
def user_toggle_clients(user_id: int) -> Response:
    user = _user_or_404(user_id)
    if EmptyForm().validate_on_submit() and not user.is_admin:
        user.can_custom_clients = not user.can_custom_clients
        user.save()
        state = "granted" if user.can_custom_clients else "withdrawn"
        audit.record_request(f"user.custom_clients_{state}", target=user.email)
        flash(f"Custom OAuth clients {state} for {user.email}.", "success")
    return redirect(url_for("admin.user_list"))


@bp.route("/users/<int:user_id>/password", methods=["GET", "POST"])
@admin_required
def user_password(user_id: int) -> Response | str | tuple[str, int]:
    user = _user_or_404(user_id)
    form = ResetPasswordForm()
    if form.validate_on_submit():
        users.set_password(user, form.password.data)
        audit.record_request("user.password_reset", target=user.email)
        flash(f"Password of {user.email} reset; their sessions have ended.", "success")
        return redirect(url_for("admin.user_list"))
    status = 400 if form.is_submitted() else 200
    return render_template("admin/user_password.html", form=form, user=user), status


@bp.route("/settings", methods=["GET", "POST"])
@admin_required
def instance_settings() -> Response | str | tuple[str, int]:
    form = InstanceSettingsForm()
    if form.validate_on_submit():
        stored_settings.save(
            allow_ropc=form.allow_ropc.data,
            new_users_custom_clients=form.new_users_custom_clients.data,
        )
        audit.record_request("settings.changed")
        flash("Settings saved.", "success")
        return redirect(url_for("admin.instance_settings"))
    if not form.is_submitted():
        form.new_users_custom_clients.data = _new_user_default()
        form.allow_ropc.data = stored_settings.ropc_allowed(current_app.config)
    return render_template(
        "admin/settings.html", form=form, extra_sections=[default_clients_section]
    )


@bp.get("/audit")
@admin_required
def audit_log() -> str:
    return render_template("admin/audit.html", **audit_view.page_context(request.args))
