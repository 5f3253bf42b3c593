"""The custom OAuth client screens: the editor, sharing, deletion, and the admin's defaults.

The list lives on Account settings (``oauth.clients.overview``); the admin's per-provider default
clients are a section of the admin settings page (``web.default_clients``). The logic is in
``oauth_clients`` (plain functions that take no request).
"""

from __future__ import annotations

from typing import Any

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
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from models import OAuthClient, User
from oauth import authorize as oauth
from oauth import certificates as client_certificates
from oauth import clients as oauth_clients
from oauth import providers
from people import audit, instance_settings
from web.default_clients import defaults_form
from web.forms import ClientForm, DeleteClientForm, EmptyForm

bp = Blueprint("clients", __name__, url_prefix="/settings/clients")


def editable_or_404(user: User, client_id: int) -> OAuthClient:
    """The client if ``user`` may edit it; anyone else's is a 404, which confirms nothing."""
    client = oauth_clients.editable_client(user, client_id)
    if client is None or not oauth_clients.can_edit(user, client):
        abort(404)
    return client


# --- Views ----------------------------------------------------------------------------------


def _user() -> User:
    return current_user._get_current_object()


def _not_allowed() -> tuple[str, int]:
    return render_template("clients/not_allowed.html"), 403


@bp.get("/")
@login_required
def index() -> Response:
    return redirect(url_for("settings.index", _anchor="custom-clients"))


@bp.route("/new", methods=["GET", "POST"])
@login_required
def create() -> Response | tuple[str, int]:
    if not _user().may_use_custom_clients:
        return _not_allowed()
    return _editor(None)


@bp.route("/<int:client_id>/edit", methods=["GET", "POST"])
@login_required
def edit(client_id: int) -> Response | tuple[str, int]:
    return _editor(editable_or_404(_user(), client_id))


def _editor(client: OAuthClient | None) -> Response | tuple[str, int]:
    """Validate → save → flash → redirect; "Load defaults" re-renders without saving."""
    user = _user()
    kwargs: dict[str, Any] = {
        "owner": user,
        "existing": client,
        "ropc_allowed": instance_settings.ropc_allowed(current_app.config),
    }
    if request.method == "GET":
        form = ClientForm(data=initial_values(client, request.args.get("provider")), **kwargs)
        return _render_editor(form, client, 200)
    form = ClientForm(**kwargs)
    if form.load_defaults.data:
        follow_defaults(form, force=True)
        return _render_editor(form, client, 200)
    follow_defaults(form)
    clear_unused(form)
    if not form.validate():
        return _render_editor(form, client, 400)
    values = {name: getattr(form, name).data for name in oauth_clients.EDITABLE}
    try:
        saved = oauth_clients.save_client(
            client.owner if client else user,
            values,
            form.client_secret.data,
            client,
            clear_secret=bool(form.clear_secret.data),
        )
    except oauth_clients.ClientError as error:
        form.name.errors.append(error.message)
        return _render_editor(form, client, 400)
    detail = f"provider={saved.provider} grant={saved.grant}"
    audit.record_request(
        "client.updated" if client else "client.created", target=saved.name, detail=detail
    )
    flash(f"Client “{saved.name}” saved.", "success")
    return redirect(url_for("settings.index", _anchor="custom-clients"))


def initial_values(client: OAuthClient | None, provider: str | None = None) -> dict[str, Any]:
    """The editor's starting values: the client's (never its secret), or a preset's defaults."""
    if client is not None:
        return {name: getattr(client, name) for name in oauth_clients.EDITABLE}
    key = provider if provider and provider in providers.PRESETS else "microsoft365"
    preset = providers.get(key)
    grant = providers.AUTHORIZATION_CODE
    values: dict[str, Any] = {"provider": key, "grant": grant, "tenant": preset.default_tenant}
    values.update(providers.defaults_for(key, grant, preset.default_tenant))
    return values


def follow_defaults(form: ClientForm, force: bool = False) -> None:
    """URL and scope fields still holding some preset's default follow provider, grant, tenant.

    This is what the editor's script does as the choice changes; without script the server
    does it on save, and ``force`` ("Load defaults") resets all of them.
    """
    if form.provider.data not in providers.PRESETS:
        return
    preset = providers.get(form.provider.data)
    if preset.is_custom and not force:
        return  # a custom server may well use a big provider's endpoints on purpose
    defaults = providers.defaults_for(preset.key, form.grant.data or "", form.tenant.data or "")
    for name, value in defaults.items():
        current = getattr(form, name)
        typed = not providers.is_a_default(name, current.data or "")
        if typed and (preset.is_custom or not force):
            continue  # "Load defaults" on Other clears only what came from a preset
        current.data = value
        current.raw_data = [value]


def clear_unused(form: ClientForm) -> None:
    """Empty the fields the chosen provider and grant do not use (the editor hides them), so
    that nothing stale is saved: the Permission URL outside Authorization Code, the device URL
    outside Device Code, the tenant where the provider has none."""
    grant = form.grant.data
    unused = []
    if grant != providers.AUTHORIZATION_CODE:
        unused.append(form.authorize_url)
    if grant != providers.DEVICE_CODE:
        unused.append(form.device_url)
    if form.provider.data in providers.PRESETS and not form.preset.has_tenant:
        unused.append(form.tenant)
    for field in unused:
        field.data = ""
        field.raw_data = [""]


def _render_editor(form: ClientForm, client: OAuthClient | None, status: int) -> tuple[str, int]:
    return render_template(
        "clients/edit.html",
        form=form,
        client=client,
        presets=providers.editor_data(),
        preset=providers.PRESETS.get(form.provider.data or ""),
        grant=form.grant.data,
        grant_labels=providers.GRANT_LABELS,
        redirect_uri=oauth.redirect_uri(current_app.config["PUBLIC_URL"]),
        accounts=oauth_clients.accounts_using(client, _user()) if client else [],
        certificate=client_certificates.summary(client) if client else None,
        certificate_form=EmptyForm(),
    ), status


@bp.post("/<int:client_id>/certificate")
@login_required
def new_certificate(client_id: int) -> Response:
    """Generate a key pair and certificate: the client then signs assertions instead of a secret."""
    client = editable_or_404(_user(), client_id)
    if EmptyForm().validate_on_submit():
        certificate = client_certificates.generate(client)
        audit.record_request(
            "client.certificate_created",
            target=client.name,
            detail=f"sha1={client_certificates.thumbprint(certificate)}",
        )
        flash(
            "Certificate created. Upload it to the app registration; until then token requests "
            "are refused.",
            "success",
        )
    return redirect(url_for("clients.edit", client_id=client.id, _anchor="certificate"))


@bp.get("/<int:client_id>/certificate.pem")
@login_required
def download_certificate(client_id: int) -> Response:
    """The certificate (public) as a file for the provider's upload form."""
    client = editable_or_404(_user(), client_id)
    if not client.certificate:
        abort(404)
    name = "".join(c if c.isalnum() else "-" for c in client.name)[:60] or "client"
    return Response(
        client.certificate,
        mimetype="application/x-pem-file",
        headers={"Content-Disposition": f'attachment; filename="auth-email-{name}.pem"'},
    )


@bp.route("/<int:client_id>/delete", methods=["GET", "POST"])
@login_required
def delete(client_id: int) -> Response | tuple[str, int]:
    client = editable_or_404(_user(), client_id)
    form = DeleteClientForm()
    accounts = oauth_clients.accounts_using(client)
    if form.validate_on_submit():
        try:
            marked = oauth_clients.delete_client(client, reauth_accounts=bool(form.reauth.data))
        except oauth_clients.ClientInUse as error:
            accounts = error.accounts
            flash("Accounts use this client: cancel, or mark them for re-authorization.", "error")
        else:
            audit.record_request(
                "client.deleted", target=client.name, detail=f"accounts_marked={len(marked)}"
            )
            flash(f"Client “{client.name}” deleted.", "success")
            if marked:
                flash(f"{len(marked)} account(s) now need re-authorization.", "warning")
            return redirect(url_for("settings.index", _anchor="custom-clients"))
    status = 409 if form.is_submitted() else 200
    return render_template(
        "clients/delete.html", client=client, form=form, accounts=accounts
    ), status


@bp.post("/<int:client_id>/share")
@login_required
def share(client_id: int) -> Response:
    user = _user()
    if not user.is_admin:
        abort(404)
    client = editable_or_404(user, client_id)
    if EmptyForm().validate_on_submit():
        oauth_clients.set_shared(client, not client.shared)
        state = "shared" if client.shared else "unshared"
        audit.record_request(f"client.{state}", target=client.name)
        flash(
            f"“{client.name}” is "
            + ("now shared with the team." if client.shared else "no longer shared."),
            "success",
        )
    return redirect(url_for("settings.index", _anchor="custom-clients"))


# --- Admin: instance defaults ---------------------------------------------------------------


@bp.post("/defaults")
@login_required
def save_defaults() -> Response:
    if not _user().is_admin:
        abort(404)
    form, candidates = defaults_form()
    if not form.validate_on_submit():
        flash("The form expired; try again.", "error")
        return redirect(url_for("admin.instance_settings"))
    chosen: dict[str, OAuthClient | None] = {}
    for key, found in candidates.items():
        value = getattr(form, f"default_{key}").data or ""
        by_id = {str(c.id): c for c in found}
        if value and value not in by_id:
            abort(404)  # not a client that may serve: someone else's, or tampered with
        chosen[key] = by_id.get(value)
    for key, client in chosen.items():
        oauth_clients.set_default_client(key, client)
    summary = ", ".join(f"{k}={c.id}" for k, c in chosen.items() if c) or "none"
    audit.record_request("settings.default_clients", detail=summary)
    flash("Default clients saved.", "success")
    return redirect(url_for("admin.instance_settings"))
