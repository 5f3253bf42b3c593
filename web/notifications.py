"""Notifications: each person's events and channels, and the admin's email sender.

Saving, a new signing secret and the test buttons only write rows; the ``Notifier`` sends.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, url_for
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from mailboxes import notifications, notifychannels
from models import (
    FAILING_MINUTES_KEY,
    Account,
    AccountStatus,
    Notification,
    NotificationSettings,
    Setting,
    User,
    utcnow,
)
from people import audit
from store.db import Prepared
from web.forms import EmptyForm, _choices
from web.notification_forms import NotificationSettingsForm, SenderForm, kind_fields
from web.security import admin_required

_ID: Any = Notification._meta.primary_key
bp = Blueprint("notifications", __name__)


def _prefs() -> NotificationSettings:
    return NotificationSettings.of(current_user.id)


def _wake() -> None:
    notifications.wake()


def _page(
    form: NotificationSettingsForm | None = None, status: int = 200, new_secret: str = ""
) -> tuple[str, int, dict[str, str]]:
    prefs = _prefs()
    if form is None:
        form = NotificationSettingsForm(
            formdata=None,  # what is stored, also after a POST that carried only its token
            email_enabled=prefs.email_enabled,
            webhook_enabled=prefs.webhook_enabled,
            webhook_url=prefs.webhook_url,
            **{f"kind_{k}": prefs.wants(k) for k in notifications.KINDS},
        )
    recent = notifications.recent(current_user)
    html = render_template(
        "settings/notifications.html",
        form=form,
        kinds=kind_fields(form),
        prefs=prefs,
        sender=notifychannels.sender(),
        recent=recent,
        pending=any(n.status == "pending" for n in recent),
        action=EmptyForm(),
        new_secret=new_secret,
        channels=notifications.CHANNELS,
    )
    # a page that shows a signing secret is never kept by a cache
    return html, status, {"Cache-Control": "no-store"}


@bp.get("/settings/notifications")
@login_required
def settings() -> Any:
    return _page()


def _save_secret(prefs: NotificationSettings) -> str:
    secret = notifychannels.new_webhook_secret()
    prefs.webhook_secret = secret
    prefs.updated_at = utcnow()
    prefs.save()
    return secret


@bp.post("/settings/notifications")
@login_required
def save() -> Any:
    form = NotificationSettingsForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    prefs = _prefs()
    prefs.kinds = " ".join(k for k in notifications.KINDS if getattr(form, f"kind_{k}").data)
    prefs.email_enabled = bool(form.email_enabled.data)
    prefs.webhook_enabled = bool(form.webhook_enabled.data)
    prefs.webhook_url = form.webhook_url.data or ""
    prefs.updated_at = utcnow()
    prefs.save()
    audit.record_request("notifications.saved", detail=prefs.kinds)
    if prefs.webhook_url and not prefs.has_secret("webhook_secret"):
        secret = _save_secret(prefs)
        flash("Saved. Copy the webhook's signing secret now: it is not shown again.", "success")
        return _page(new_secret=secret)
    flash("Your notification settings are saved.", "success")
    return redirect(url_for("notifications.settings"))


@bp.post("/settings/notifications/secret")
@login_required
def new_secret() -> Any:
    if not EmptyForm().validate_on_submit():
        return redirect(url_for("notifications.settings"))
    secret = _save_secret(_prefs())
    audit.record_request("notifications.webhook_secret_replaced")
    flash("A new signing secret: copy it now, it is not shown again. The old one stops.", "success")
    return _page(new_secret=secret)


@bp.post("/settings/notifications/test/<channel>")
@login_required
def test(channel: str) -> Response:
    if channel not in notifications.CHANNELS:
        return redirect(url_for("notifications.settings"))
    if EmptyForm().validate_on_submit():
        prefs = _prefs()
        if channel == "webhook" and not (prefs.webhook_url and prefs.has_secret("webhook_secret")):
            flash("Save a webhook URL first.", "error")
        elif channel == "email" and not notifychannels.sender().configured:
            flash("The administrator has not set up an email sender yet.", "error")
        else:
            notifications.queue_test(current_user, channel)
            _wake()
            flash(
                f"A test notification is on its way ({notifications.CHANNELS[channel]}); its "
                "result shows below.",
                "success",
            )
    return redirect(url_for("notifications.settings") + "#recent")


# ---------------------------------------------------------------------------------- admin


def _mailboxes() -> list[Any]:
    rows = _active_accounts(current_user.id, AccountStatus.ACTIVE.value)
    return _choices([(str(a.id), a.address) for a in rows])


# Built once (store.db.Prepared): the admin's notifications page runs both.
_active_accounts = Prepared(
    lambda owner, status: (
        Account.select(Account.id, Account.address)
        .where(Account.owner == owner)
        .where(Account.status == status)
        .order_by(Account.address)
    )
)
_failed = Prepared(
    lambda status, limit: (
        Notification.select(Notification, User)
        .join(User)
        .where(Notification.status == status)
        .order_by(_ID.desc())
        .limit(limit)
    )
)


def _admin_page(form: SenderForm | None = None, status: int = 200) -> tuple[str, int]:
    chosen = notifychannels.sender()
    if form is None:
        relay = chosen.relay
        form = SenderForm(
            mode=chosen.mode,
            host=relay.host,
            port=relay.port,
            security=relay.security,
            username=relay.username,
            from_address=relay.from_address,
            account=str(chosen.account_id or ""),
            failing_minutes=Notification.failing_minutes(),
        )
    form.account.choices = _mailboxes()
    failed = _failed("failed", 10)
    return render_template(
        "admin/notifications.html", form=form, sender=chosen, failed=failed
    ), status


@bp.get("/admin/notifications")
@admin_required
def admin_settings() -> tuple[str, int]:
    return _admin_page()


@bp.post("/admin/notifications")
@admin_required
def admin_save() -> Response | tuple[str, int]:
    form = SenderForm()
    form.account.choices = _mailboxes()
    if not form.validate_on_submit():
        return _admin_page(form, 400)
    mode = form.mode.data or ""
    password: str | None = None
    if form.clear_password.data:
        password = ""
    elif form.password.data:
        password = form.password.data
    notifychannels.save_sender(
        mode,
        relay=notifychannels.Relay(
            host=(form.host.data or "").strip(),
            port=form.port.data or 587,
            security=form.security.data,
            username=(form.username.data or "").strip(),
            from_address=(form.from_address.data or "").strip(),
        ),
        password=password,
        account_id=int(form.account.data) if mode == "mailbox" else None,
    )
    Setting.write(FAILING_MINUTES_KEY, str(form.failing_minutes.data))
    audit.record_request("notifications.sender_saved", detail=mode or "none")
    flash("The notification sender is saved. Send yourself a test from Notifications.", "success")
    return redirect(url_for("notifications.admin_settings"))
