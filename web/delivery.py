"""The account page's "Sending" card: how mail from devices goes out (SMTP AUTH, Microsoft
Graph, automatic), the choice per account, and a Graph check that sends nothing."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, request, url_for
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from mailboxes import graphsend, smtpdelivery
from mailproxy.backend import DeliveryRefused
from models import Account
from people import audit
from store.db import database
from web.forms import EmptyForm

bp = Blueprint("delivery", __name__)


@bp.app_template_global()
def smtp_delivery(account: Account) -> dict[str, object]:
    """What the account page shows about sending (``supported`` False: nothing)."""
    return {
        "supported": smtpdelivery.supported(account.client),
        "mode": account.smtp_delivery,
        "effective": smtpdelivery.mode_of(account),
        "describe": smtpdelivery.describe(account),
        "modes": smtpdelivery.MODES,
        "client_mode": account.client.smtp_delivery if account.client else "",
    }


def _own(account_id: int) -> Account:
    account = Account.get_or_none(Account.id == account_id, Account.owner == current_user.id)
    if account is None:
        abort(404)
    return account


@bp.post("/accounts/<int:account_id>/delivery")
@login_required
def choose(account_id: int) -> Response:
    account = _own(account_id)
    mode = request.form.get("mode", "")
    if not EmptyForm().validate_on_submit() or (mode and mode not in smtpdelivery.MODES):
        abort(400)
    with database.atomic():
        Account.update(smtp_delivery=mode).where(Account.id == account.id).execute()
        audit.record_request("account.smtp_delivery", target=account.address, detail=mode or "-")
    flash("Saved how mail from devices goes out.", "success")
    return redirect(url_for("accounts.detail", account_id=account.id) + "#sending")


@bp.post("/accounts/<int:account_id>/delivery/test")
@login_required
def test(account_id: int) -> Response:
    account = _own(account_id)
    if not EmptyForm().validate_on_submit():
        abort(400)
    try:
        flash(graphsend.check(account) + " Sending through it is possible.", "success")
    except DeliveryRefused as refused:
        flash(f"Microsoft Graph check failed: {refused.text}", "error")
    return redirect(url_for("accounts.detail", account_id=account.id) + "#sending")
