"""The accounts page: the user's linked mailboxes (home after login)."""

from __future__ import annotations

from flask import Blueprint, render_template
from flask_login import current_user, login_required

from models import Account

bp = Blueprint("accounts", __name__)


@bp.get("/")
@login_required
def index() -> str:
    accounts = Account.owned_by(current_user).order_by(Account.address)
    return render_template("accounts/index.html", accounts=accounts)
