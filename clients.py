"""Custom OAuth clients: the editor, sharing, deletion, secret expiry and instance defaults.

The list lives on Account settings (``settings_context``); the admin's per-provider default
clients are a section of the admin settings page (``init_app``). The logic is in plain functions
(``save_client``, ``delete_client``, ``default_client`` ...) that take no request.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import peewee as pw
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
from flask_login import current_user, login_required
from markupsafe import Markup
from werkzeug.wrappers import Response

import audit
import providers
from db import database
from forms import ClientForm, DefaultClientsForm, DeleteClientForm, EmptyForm
from models import Account, OAuthClient, Setting, User, utcnow

bp = Blueprint("clients", __name__, url_prefix="/settings/clients")

WARN_DAYS = (30, 7)
DEFAULT_KEY = "default_client.{}"
# Columns the editor writes; the secret goes separately, as it is write-only.
EDITABLE = (
    "name",
    "provider",
    "grant",
    "tenant",
    *providers.DEFAULT_FIELDS,
    "revocation_url",
    "client_id",
    "secret_expires_on",
    *(f"{p}_{a}" for p in ("imap", "pop3", "smtp") for a in ("host", "port", "security")),
    "sasl_mechanism",
)
SERVER_DEFAULTS = {"host": "", "port": None}


class ClientError(Exception):
    """A change that cannot be made; the message says why."""


class ClientInUse(ClientError):
    """Accounts use the client: deleting it needs the choice to mark them for re-authorization."""

    def __init__(self, accounts: list[Account]) -> None:
        super().__init__(f"{len(accounts)} account(s) use this client.")
        self.accounts = accounts


# --- Queries ------------------------------------------------------------------------------


def can_edit(user: User, client: OAuthClient) -> bool:
    """Owners edit their own clients; a shared client only the admin edits."""
    if user.is_admin:
        return client.owner_id == user.id or bool(client.shared)
    return client.owner_id == user.id and not client.shared and user.may_use_custom_clients


def editable_or_404(user: User, client_id: int) -> OAuthClient:
    """The client if ``user`` may edit it; anyone else's is a 404, which confirms nothing."""
    client = OAuthClient.editable_by(user).where(OAuthClient.id == client_id).first()
    if client is None or not can_edit(user, client):
        abort(404)
    return client


def visible_clients(user: User) -> list[OAuthClient]:
    """The user's own clients; the admin also sees every shared one."""
    query = OAuthClient.select().where(OAuthClient.owner == user)
    if user.is_admin:
        query = OAuthClient.select().where(
            (OAuthClient.owner == user) | (OAuthClient.shared == True)  # noqa: E712
        )
    return list(query.order_by(OAuthClient.name))


def accounts_using(client: OAuthClient, viewer: User | None = None) -> list[Account]:
    """Accounts that depend on ``client``; a viewer who is not the admin sees only their own."""
    query = Account.select().where(Account.client == client)
    if viewer is not None and not viewer.is_admin:
        query = query.where(Account.owner == viewer)
    return list(query.order_by(Account.address))


# --- Changes --------------------------------------------------------------------------------


def save_client(
    owner: User,
    values: dict[str, Any],
    secret: str | None = None,
    client: OAuthClient | None = None,
) -> OAuthClient:
    """Create (``client`` None) or update a client from validated ``values``.

    A blank ``secret`` keeps the stored one. Fields the preset supplies are cleared so that the
    preset stays the single source; fields the grant does not use are cleared too.
    """
    values = normalized(values)
    if client is None:
        if not secret:
            raise ClientError("A new client needs its secret.")
        client = OAuthClient(owner=owner)
    for name, value in values.items():
        setattr(client, name, value)
    if secret:
        client.client_secret = secret
        client.secret_set_at = utcnow()
    client.updated_at = utcnow()
    try:
        with database.atomic():
            client.save()
    except pw.IntegrityError:
        raise ClientError(f"There is already a client named “{values['name']}”.") from None
    return client


def normalized(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` restricted to editable columns and made consistent with preset and grant."""
    values = {k: v for k, v in values.items() if k in EDITABLE}
    preset = providers.get(values["provider"])
    grant = values["grant"]
    if not preset.has_tenant:
        values["tenant"] = ""
    if grant != providers.AUTHORIZATION_CODE:
        values["authorize_url"] = ""
    if grant != providers.DEVICE_CODE:
        values["device_url"] = ""
    if not preset.is_custom:
        for proto in ("imap", "pop3", "smtp"):
            values[f"{proto}_host"], values[f"{proto}_port"] = "", None
            values[f"{proto}_security"] = getattr(OAuthClient, f"{proto}_security").default
        values["sasl_mechanism"] = preset.sasl_mechanism
        values["revocation_url"] = ""
    return {k: ("" if v is None and k not in _NULLABLE else v) for k, v in values.items()}


_NULLABLE = {"imap_port", "pop3_port", "smtp_port", "secret_expires_on"}


def delete_client(client: OAuthClient, *, reauth_accounts: bool = False) -> list[Account]:
    """Delete ``client``; returns the accounts that used it, now marked for re-authorization.

    Raises ``ClientInUse`` when accounts use it and ``reauth_accounts`` is not set.
    """
    with database.atomic():
        accounts = accounts_using(client)
        if accounts and not reauth_accounts:
            raise ClientInUse(accounts)
        detail = f"The OAuth client “{client.name}” was deleted; authorize this account again."
        Account.update(status="needs_reauth", status_detail=detail, client=None).where(
            Account.client == client
        ).execute()
        Setting.delete().where(
            (Setting.key == DEFAULT_KEY.format(client.provider)) & (Setting.value == str(client.id))
        ).execute()
        client.delete_instance()
    return accounts


def set_shared(client: OAuthClient, shared: bool) -> None:
    """Shared clients appear on everyone's authorization page; only the admin edits them."""
    OAuthClient.update(shared=shared, updated_at=utcnow()).where(
        OAuthClient.id == client.id
    ).execute()
    client.shared = shared


# --- Instance defaults ----------------------------------------------------------------------


def default_candidates(provider: str) -> list[OAuthClient]:
    """Clients that may serve as the instance default for ``provider``: shared or an admin's."""
    return list(
        OAuthClient.select()
        .join(User)
        .where(
            (OAuthClient.provider == provider)
            & ((OAuthClient.shared == True) | (User.is_admin == True))  # noqa: E712
        )
        .order_by(OAuthClient.name)
    )


def default_client(provider: str) -> OAuthClient | None:
    """The client behind the authorization page's main button for ``provider``, if any."""
    value = Setting.read(DEFAULT_KEY.format(provider))
    if not value or not value.isdigit():
        return None
    client = OAuthClient.get_or_none(OAuthClient.id == int(value))
    if client is None or client.provider != provider:
        return None
    if not (client.shared or client.owner.is_admin):
        return None
    return client


def set_default_client(provider: str, client: OAuthClient | None) -> None:
    """Pick (or clear, with None) the default client of ``provider``."""
    providers.get(provider)
    if client is not None and client.id not in {c.id for c in default_candidates(provider)}:
        raise ClientError("This client cannot be the default for that provider.")
    Setting.write(DEFAULT_KEY.format(provider), str(client.id) if client else None)


# --- Secret expiry --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiryWarning:
    """A client whose secret expires within 30 or 7 days, or has expired."""

    client: OAuthClient
    level: str  # "expired", "7" or "30"
    days_left: int
    accounts: list[Account] = field(default_factory=list)

    @property
    def message(self) -> str:
        date = self.client.secret_expires_on.isoformat()
        name = self.client.name
        if self.level == "expired":
            return f"The secret of “{name}” expired on {date}; set a new one."
        if self.days_left == 0:
            return f"The secret of “{name}” expires today ({date})."
        days = "1 day" if self.days_left == 1 else f"{self.days_left} days"
        return f"The secret of “{name}” expires in {days}, on {date}."


def expiry_level(expires_on: dt.date | None, today: dt.date) -> tuple[str, int] | None:
    """("expired" | "7" | "30", days left) or None when no warning is due."""
    if expires_on is None:
        return None
    days = (expires_on - today).days
    if days < 0:
        return "expired", days
    for limit in sorted(WARN_DAYS):
        if days <= limit:
            return str(limit), days
    return None


def secret_expiry_warnings(user: User, today: dt.date | None = None) -> list[ExpiryWarning]:
    """Warnings for the clients the user manages or whose accounts depend on, soonest first."""
    today = today or dt.date.today()
    seen = {c.id: c for c in visible_clients(user)}
    for account in Account.owned_by(user).where(Account.client.is_null(False)):
        seen.setdefault(account.client_id, account.client)
    warnings = []
    for client in seen.values():
        level = expiry_level(client.secret_expires_on, today)
        if level:
            accounts = accounts_using(client, user)
            warnings.append(ExpiryWarning(client, level[0], level[1], accounts))
    return sorted(warnings, key=lambda w: (w.days_left, w.client.name))


# --- Views ----------------------------------------------------------------------------------


def settings_context(user: User) -> dict[str, Any]:
    """What the Account settings page shows in its custom clients section."""
    rows = [
        {
            "client": c,
            "preset": providers.PRESETS.get(c.provider),
            "grant": providers.GRANT_LABELS.get(c.grant, c.grant),
            "accounts": accounts_using(c, user),
            "editable": can_edit(user, c),
            "expiry": expiry_level(c.secret_expires_on, dt.date.today()),
        }
        for c in visible_clients(user)
    ]
    return {
        "allowed": user.may_use_custom_clients,
        "is_admin": user.is_admin,
        "items": rows,
        "warnings": secret_expiry_warnings(user),
        "action": EmptyForm(),
    }


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
    import admin

    user = _user()
    kwargs: dict[str, Any] = {
        "owner": user,
        "existing": client,
        "ropc_allowed": admin.ropc_allowed(),
    }
    if request.method == "GET":
        form = ClientForm(data=initial_values(client, request.args.get("provider")), **kwargs)
        return _render_editor(form, client, 200)
    form = ClientForm(**kwargs)
    if form.load_defaults.data:
        follow_defaults(form, force=True)
        return _render_editor(form, client, 200)
    follow_defaults(form)
    if not form.validate():
        return _render_editor(form, client, 400)
    values = {name: getattr(form, name).data for name in EDITABLE}
    try:
        saved = save_client(
            client.owner if client else user, values, form.client_secret.data, client
        )
    except ClientError as error:
        form.name.errors.append(str(error))
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
        return {name: getattr(client, name) for name in EDITABLE}
    key = provider if provider in providers.PRESETS else "microsoft365"
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


def _render_editor(form: ClientForm, client: OAuthClient | None, status: int) -> tuple[str, int]:
    return render_template(
        "clients/edit.html",
        form=form,
        client=client,
        presets=providers.editor_data(),
        preset=providers.PRESETS.get(form.provider.data or ""),
        grant=form.grant.data,
        grant_labels=providers.GRANT_LABELS,
        redirect_uri=current_app.config["PUBLIC_URL"] + "/authorize",
        accounts=accounts_using(client, _user()) if client else [],
    ), status


@bp.route("/<int:client_id>/delete", methods=["GET", "POST"])
@login_required
def delete(client_id: int) -> Response | tuple[str, int]:
    client = editable_or_404(_user(), client_id)
    form = DeleteClientForm()
    accounts = accounts_using(client)
    if form.validate_on_submit():
        try:
            marked = delete_client(client, reauth_accounts=bool(form.reauth.data))
        except ClientInUse as error:
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
        set_shared(client, not client.shared)
        state = "shared" if client.shared else "unshared"
        audit.record_request(f"client.{state}", target=client.name)
        flash(
            f"“{client.name}” is "
            + ("now shared with the team." if client.shared else "no longer shared."),
            "success",
        )
    return redirect(url_for("settings.index", _anchor="custom-clients"))


# --- Admin: instance defaults ---------------------------------------------------------------


def _defaults_form(**kwargs: Any) -> tuple[DefaultClientsForm, dict[str, list[OAuthClient]]]:
    candidates = {key: default_candidates(key) for key in providers.PRESETS}
    options = {
        key: [(str(c.id), f"{c.name} ({c.client_id})") for c in found]
        for key, found in candidates.items()
    }
    return DefaultClientsForm.build(options, **kwargs), candidates


def default_clients_section() -> Markup:
    """The admin settings page's section: per provider, the default client."""
    form, candidates = _defaults_form()
    for key in providers.PRESETS:
        chosen = default_client(key)
        getattr(form, f"default_{key}").data = str(chosen.id) if chosen else ""
    return Markup(render_template("admin/_default_clients.html", form=form, candidates=candidates))


@bp.post("/defaults")
@login_required
def save_defaults() -> Response:
    if not _user().is_admin:
        abort(404)
    form, candidates = _defaults_form()
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
        set_default_client(key, client)
    summary = ", ".join(f"{k}={c.id}" for k, c in chosen.items() if c) or "none"
    audit.record_request("settings.default_clients", detail=summary)
    flash("Default clients saved.", "success")
    return redirect(url_for("admin.instance_settings"))


def init_app(app: Flask) -> None:
    """Add the default clients section to the admin settings page."""
    sections = app.extensions.setdefault("admin_settings_sections", [])
    if default_clients_section not in sections:
        sections.append(default_clients_section)
