"""The accounts screens: linked mailboxes (home), the authorization page, and one mailbox's page.

Thin views over ``linking``: parse the form, call the function, flash, redirect. Every account
route looks the account up with the signed-in user as owner; someone else's account is a 404.
"""

from __future__ import annotations

import re
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
from markupsafe import Markup, escape
from werkzeug.wrappers import Response

from mailboxes import linking, mailbackend, onboarding, verification
from mailboxes import refusals as mailrefusals
from mailboxes.account_health import Health, health
from models import Account, AccountStatus, MailPassword, User, utcnow
from oauth import authorize as oauth
from oauth import clients as oauth_clients
from oauth import errors as oauth_errors
from oauth import providers
from people import instance_settings
from web import timefmt
from web.account_forms import (
    AddressForm,
    AuthorizeForm,
    DelegateForm,
    MailPasswordForm,
    UnlinkForm,
)
from web.forms import EmptyForm

bp = Blueprint("accounts", __name__)

View = Response | str | tuple[str, int]


def _user() -> User:
    return current_user._get_current_object()  # type: ignore[no-any-return]


def _ip() -> str:
    return request.remote_addr or ""


def _redirect_uri() -> str:
    return oauth.redirect_uri(current_app.config["PUBLIC_URL"])


def _own(account_id: int) -> Account:
    account = linking.owned_account(_user(), account_id)
    if account is None:
        abort(404)
    return account


def _device_account(account_id: int, state: str) -> Account:
    account = linking.device_account(_user(), account_id, state)
    if account is None:
        abort(404)
    return account


def dashboard(user: User) -> dict[str, Any]:
    """What the home page shows: the accounts, and what needs the user's attention."""
    accounts = Account.list_owned_with_clients(user)
    defaults = oauth_clients.default_clients()  # asked about by three of the parts below
    steps = onboarding.first_run_steps(user, defaults) if user.is_admin else []
    return {
        "accounts": accounts,
        "attention": [
            a for a in accounts if a.state is not AccountStatus.PENDING and not health(a).ok
        ],
        "secret_warnings": oauth_clients.secret_expiry_warnings(user),
        "provider_names": dict(providers.choices()),
        "steps": steps if not all(step.done for step in steps) else [],
        "missing_defaults": onboarding.missing_defaults(defaults) if user.is_admin else None,
        "options": onboarding.authorization_options(user, "", defaults),
    }


def authorization_choices(user: User, provider: str) -> dict[str, Any]:
    """The page's one primary client, the others below it, and who to ask when none is usable."""
    return {
        "options": onboarding.authorization_options(user, provider),
        "provider_name": dict(providers.choices()).get(provider, ""),
        "grant_labels": dict(providers.GRANT_LABELS),
        "provider_names": dict(providers.choices()),
    }


@bp.get("/")
@login_required
def index() -> str:
    shown = dashboard(_user())
    # the re-authorize buttons' form, only where there are such buttons (its CSRF field costs)
    empty = EmptyForm() if shown["attention"] else None
    return render_template("accounts/index.html", empty=empty, **shown)


def _authorize_page(form: AuthorizeForm, status: int = 200, error: str = "") -> tuple[str, int]:
    address = form.address.data or ""
    provider = form.provider.data or providers.guess_provider(address) or ""
    form.provider.data = provider
    return render_template(
        "accounts/new.html",
        form=form,
        error=error,
        provider=provider,
        ropc_allowed=_ropc_allowed(),
        **authorization_choices(_user(), provider),
    ), status


def _ropc_allowed() -> bool:
    return instance_settings.ropc_allowed(current_app.config)


@bp.app_template_global()
def account_health(account: Account) -> Health:
    """The account's state in plain words (renewal failures, refused protocols)."""
    return health(account)


@bp.app_template_global()
def account_protocols(account: Account) -> list[tuple[str, Any]]:
    """(protocol name, its recorded refusal or None) for the protocols the client serves."""
    if account.client is None:
        return []
    refused = {r.protocol: r for r in health(account).refusals}
    served = providers.endpoints_for(account.client)
    return [(mailrefusals.PROTOCOL_NAMES[p], refused.get(p)) for p in ("imap", "pop3", "smtp")
            if p in served]  # fmt: skip


@bp.app_template_global()
def when(value: Any, empty: str = "never") -> Markup:
    """A stored time as "2 minutes ago", with the absolute UTC time on hover (every page)."""
    return timefmt.time_tag(value, utcnow(), empty)


@bp.app_template_filter("breakable")
def breakable(text: str) -> Markup:
    """An address or host that may wrap after "@", "." and "-" (a long one fits a table cell)."""
    return Markup(re.sub(r"([@.\-])", r"\1<wbr>", str(escape(text or ""))))


@bp.app_template_global()
def sessions_open(account_id: int) -> int | None:
    """Mail sessions this serving process holds open for the account (None: no proxy here)."""
    service = mailbackend.running(current_app)
    return service.backend.sessions_open(account_id) if service is not None else None


@bp.get("/accounts/new")
@login_required
def new() -> tuple[str, int]:
    """The account authorization page for one address (provider guessed, changeable)."""
    lookup = AddressForm(request.args)
    form = AuthorizeForm(
        formdata=None,
        address=(lookup.address.data or "").strip().lower(),
        provider=lookup.provider.data or "",
    )
    return _authorize_page(form)


@bp.post("/accounts/new")
@login_required
def authorize_start() -> View:
    form = AuthorizeForm()
    if not form.validate_on_submit():
        return _authorize_page(form, 400)
    user = _user()
    provider = form.provider.data or providers.guess_provider(form.address.data) or ""
    try:
        client = linking.choose_client(user, provider, form.client.data)
        if client.grant == providers.PASSWORD and not _ropc_allowed():
            raise linking.LinkError("The legacy password grant is turned off on this server.")
        started = linking.start(
            user,
            form.address.data,
            client,
            _redirect_uri(),
            ip=_ip(),
            username=form.username.data or "",
            password=form.password.data or "",
        )
    except linking.LinkError as exc:
        return _authorize_page(form, 400, exc.message)
    except oauth_errors.AuthorizationProblem as exc:
        return _problem(exc, form.address.data)
    return _after_start(started)


def _after_start(started: linking.Started) -> Response:
    account = started.account
    if started.url:
        return redirect(started.url)
    if started.pending is not None:
        return redirect(
            url_for("accounts.device", account_id=account.id, state=started.pending.state)
        )
    return _after_link(account, started.done)


def _after_link(account: Account, result: verification.Verification | None) -> Response:
    if result is not None and result.ok:
        flash(f"{account.address} is linked and its sign-in works. {result.message}", "success")
    elif result is not None:
        flash(f"{account.address} was authorized, but signing in failed: {result.message}", "error")
    return redirect(url_for("accounts.detail", account_id=account.id))


def _problem(exc: oauth_errors.AuthorizationProblem, address: str = "") -> tuple[str, int]:
    return render_template(
        "accounts/problem.html", problem=exc.explanation, address=address
    ), exc.status


@bp.get("/authorize")
@login_required
def callback() -> View:
    """Where the provider sends the browser back (the redirect URI is exactly this path)."""
    try:
        account, result = linking.complete_callback(
            _user(), request.args.to_dict(), _redirect_uri(), ip=_ip()
        )
    except oauth_errors.AuthorizationProblem as exc:
        return _problem(exc)
    return _after_link(account, result)


@bp.get("/accounts/<int:account_id>/device/<state>")
@login_required
def device(account_id: int, state: str) -> View:
    """The Device Code page (read-only): the code, and a "Check now" form that device.js
    submits every ``interval`` seconds (without script, the person presses it)."""
    account = _device_account(account_id, state)
    pending = oauth.device_pending(_user(), account, state)
    if pending is None:
        abort(404)
    if pending.consumed_at is not None:
        return redirect(url_for("accounts.detail", account_id=account.id))
    if pending.expires_at < utcnow():
        return _problem(oauth_errors.AuthorizationProblem(oauth.EXPIRED), account.address)
    return render_template(
        "accounts/device.html", account=account, pending=pending, form=EmptyForm()
    )


@bp.post("/accounts/<int:account_id>/device/<state>")
@login_required
def device_check(account_id: int, state: str) -> View:
    """Ask the token endpoint once whether the person finished signing in; link if so."""
    account = _device_account(account_id, state)
    if not EmptyForm().validate_on_submit():
        abort(400)
    try:
        result = linking.poll_device(_user(), account, state, ip=_ip())
    except oauth_errors.AuthorizationProblem as exc:
        if exc.status == 404:
            abort(404)
        return _problem(exc, account.address)
    if result is not None:
        return _after_link(account, result)
    return redirect(url_for("accounts.device", account_id=account.id, state=state))


def _detail(
    account: Account,
    password_form: MailPasswordForm | None = None,
    shown: str = "",
    status=200,
    delegate_form: DelegateForm | None = None,
) -> tuple[str, int]:
    preset = providers.PRESETS.get(account.provider)
    if delegate_form is None:
        delegate_form = DelegateForm(formdata=None, delegate=account.signed_in_as)
    return render_template(
        "accounts/detail.html",
        account=account,
        password_form=password_form or MailPasswordForm(),
        delegate_form=delegate_form,
        # Shared mailboxes with a delegate's SMTP login are Exchange's (and a custom server's)
        shows_delegate=preset is None or preset.is_custom or preset.is_microsoft,
        passwords=MailPassword.of_account(account.id),
        shown_password=shown,
        just_saved=request.args.get("saved") == "1",
        empty=EmptyForm(),
        provider_name=dict(providers.choices()).get(account.provider, account.provider),
        choices=authorization_choices(_user(), account.provider),
        has_setup="mailsetup.client_setup" in current_app.view_functions,
    ), status


@bp.get("/accounts/<int:account_id>")
@login_required
def detail(account_id: int) -> tuple[str, int]:
    return _detail(_own(account_id))


@bp.post("/accounts/<int:account_id>/reauthorize")
@login_required
def reauthorize(account_id: int) -> View:
    account = _own(account_id)
    form = EmptyForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        choice = request.form.get("client", "")
        if choice:
            client = linking.choose_client(_user(), account.provider, choice)
            started = linking.start(_user(), account.address, client, _redirect_uri(), ip=_ip())
        else:
            started = linking.reauthorize(_user(), account, _redirect_uri(), ip=_ip())
    except linking.LinkError as exc:
        flash(exc.message, "error")
        return redirect(url_for("accounts.detail", account_id=account.id))
    except oauth_errors.AuthorizationProblem as exc:
        return _problem(exc, account.address)
    return _after_start(started)


@bp.post("/accounts/<int:account_id>/delegate")
@login_required
def delegate(account_id: int) -> View:
    """Who signs in for a shared mailbox; a bad address re-renders the page with the error."""
    account = _own(account_id)
    form = DelegateForm()
    form.mailbox = account.address
    if not form.validate_on_submit():
        return _detail(account, status=400, delegate_form=form)
    saved = linking.set_delegate(_user(), account, form.delegate.data or "", ip=_ip())
    if saved:
        flash(
            f"Saved: {account.address} is authorized by {saved}, and mail is sent logged in as "
            f"{saved} from {account.address}. Re-authorize signing in as {saved} if you have "
            "not yet.",
            "success",
        )
    else:
        flash(f"Saved: you sign in to {account.address} itself.", "success")
    return redirect(url_for("accounts.detail", account_id=account.id))


@bp.post("/accounts/<int:account_id>/test")
@login_required
def test(account_id: int) -> Response:
    account = _own(account_id)
    if not EmptyForm().validate_on_submit():
        abort(400)
    result = verification.recheck(_user(), account, ip=_ip())
    flash(result.message, "success" if result.ok else "error")
    return redirect(url_for("accounts.detail", account_id=account.id))


@bp.get("/accounts/<int:account_id>/unlink")
@login_required
def unlink_confirm(account_id: int) -> str:
    """Unlinking also revokes at the provider: the person types the address to confirm."""
    account = _own(account_id)
    return render_template("accounts/unlink.html", account=account, form=UnlinkForm())


@bp.post("/accounts/<int:account_id>/unlink")
@login_required
def unlink(account_id: int) -> View:
    account = _own(account_id)
    form = UnlinkForm()
    if not form.validate_on_submit():
        return render_template("accounts/unlink.html", account=account, form=form), 400
    if (form.address.data or "").strip().lower() != account.address:
        form.address.errors.append(f"Type {account.address} exactly to unlink it.")
        return render_template("accounts/unlink.html", account=account, form=form), 400
    address = account.address
    revoked = linking.unlink(_user(), account, ip=_ip())
    note = " Its authorization was revoked at the provider." if revoked else ""
    flash(f"{address} is unlinked; its tokens and passwords are deleted.{note}", "success")
    return redirect(url_for("accounts.index"))


@bp.post("/accounts/<int:account_id>/passwords")
@login_required
def add_password(account_id: int) -> View:
    account = _own(account_id)
    form = MailPasswordForm()
    if not form.validate_on_submit():
        return _detail(account, form, status=400)
    own = form.chooses_own
    plain = linking.add_password(
        _user(), account, form.label.data or "", form.password.data if own else None, ip=_ip()
    )
    if not own:
        # Shown once, in this response only (never stored in plain text, never in a redirect).
        return _detail(account, MailPasswordForm(formdata=None), shown=plain)
    flash("The password is saved. Use it with the address in your mail client.", "success")
    return redirect(url_for("accounts.detail", account_id=account.id, saved=1))


@bp.get("/accounts/<int:account_id>/passwords/<int:password_id>/revoke")
@login_required
def revoke_confirm(account_id: int, password_id: int) -> str:
    account = _own(account_id)
    found = account.passwords.where(MailPassword.id == password_id).first()
    if found is None:
        abort(404)
    return render_template(
        "accounts/revoke.html", account=account, password=found, form=EmptyForm()
    )


@bp.post("/accounts/<int:account_id>/passwords/<int:password_id>/revoke")
@login_required
def revoke_password(account_id: int, password_id: int) -> Response:
    account = _own(account_id)
    if not EmptyForm().validate_on_submit():
        abort(400)
    if not linking.revoke_password(_user(), account, password_id, ip=_ip()):
        abort(404)
    flash("The password is revoked; mail clients using it can no longer sign in.", "success")
    return redirect(url_for("accounts.detail", account_id=account.id))
