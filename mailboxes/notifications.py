"""Notifications: the outbox drained in the background, with bounded retries.

The places that decide a fact queue a message with ``Notification.raise_event`` (models.py):
the token lifecycle (re-authorization needed, renewal failing for over N minutes), the recorded
refusals (a protocol refused by policy), the mail backend (a password used from a new address)
and the OAuth clients (a secret or certificate entering its 30- or 7-day window, checked here
once an hour). Queuing is one INSERT whose unique key makes "once a day per event and mailbox"
hold across restarts and instances; nothing is sent on the caller's thread.

``Notifier`` (a service of the serving process) drains the outbox every few seconds: each row
is claimed with a compare-and-swap (so several instances on one database send it once), sent,
and marked sent, or retried with a doubling pause up to ``NOTIFY_ATTEMPTS`` tries and then
marked failed with the last error, which the settings page shows.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mailboxes import notifychannels
from mailboxes.notifychannels import DeliveryError
from models import Notification, NotificationSettings, User, utcnow
from oauth import clients as oauth_clients
from oauth import tokens
from store import appstate
from store.db import Prepared

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("auth_email.notifications")

KINDS = MappingProxyType(
    {
        "reauth": "A mailbox needs re-authorization",
        "policy_refusal": "A mail server refuses a protocol by policy (SMTP AUTH or IMAP "
        "turned off, no permission)",
        "renewal_failing": "Token renewal keeps failing",
        "credential_expiring": "A client secret or certificate expires in 30 and in 7 days",
        "new_ip": "A mail-client password is used from a new address",
    }
)
CHANNELS = MappingProxyType({"email": "Email", "webhook": "Webhook"})
_ID: Any = Notification._meta.primary_key
CLAIM_SECONDS = 120
MAX_PAUSE = 3600.0
BATCH = 50


def queue_test(user: User, channel: str) -> Notification:
    """A test message on ``channel``, outside the once-a-day rule."""
    return Notification.create(
        user=user,
        kind="test",
        subject=user.email,
        dedup=f"test|{uuid.uuid4().hex}",
        channel=channel,
        title="Test notification from Auth-Email",
        detail="This is a test. Notifications about your mailboxes will arrive like this.",
    )


def recent(user: User, limit: int = 15) -> list[Notification]:
    return _recent(user.id, limit)


_recent = Prepared(
    lambda user_id, limit: (
        Notification.select().where(Notification.user == user_id).order_by(_ID.desc()).limit(limit)
    )
)


def payload(note: Notification, public_url: str) -> dict[str, Any]:
    """The webhook's JSON: what happened, about which mailbox, where to act. No secret."""
    return {
        "id": note.id,
        "event": note.kind,
        "title": note.title,
        "detail": note.detail,
        "mailbox": note.subject if note.account_id else None,
        "subject": note.subject,
        "occurred_at": note.created_at.replace(tzinfo=dt.UTC).isoformat(),
        "url": _link(note, public_url),
    }


def _link(note: Notification, public_url: str) -> str:
    if note.account_id:
        return f"{public_url}/accounts/{note.account_id}"
    if note.kind == "credential_expiring":
        return f"{public_url}/settings/"
    return f"{public_url}/"


def email_body(note: Notification, public_url: str) -> str:
    return (
        f"{note.title}\n\n{note.detail}\n\n"
        f"Open Auth-Email: {_link(note, public_url)}\n\n"
        "-- \nYou get this because of your notification settings: "
        f"{public_url}/settings/notifications\n"
    )


def deliver(note: Notification, config: Mapping[str, Any]) -> None:
    """Send one message now; raises ``DeliveryError``."""
    public_url = str(config["PUBLIC_URL"])
    user = User.get_or_none(User.id == note.user_id)
    if user is None:
        raise DeliveryError("The person is gone.", False)
    if note.channel == "email":
        notifychannels.send_email(
            user.email,
            f"[Auth-Email] {note.title}",
            email_body(note, public_url),
            float(config.get("NOTIFY_TIMEOUT", 15)),
        )
    elif note.channel == "webhook":
        prefs = NotificationSettings.of(user.id)
        if not prefs.webhook_url or not prefs.has_secret("webhook_secret"):
            raise DeliveryError("No webhook URL is set.", False)
        notifychannels.post_webhook(
            prefs.webhook_url, str(prefs.webhook_secret), payload(note, public_url), config
        )
    else:
        raise DeliveryError(f"Unknown channel {note.channel}.", False)


def _claim(note: Notification, now: dt.datetime) -> bool:
    """Take the row for this process (one try counted), unless another took it first."""
    return bool(
        Notification.update(
            claimed_until=now + dt.timedelta(seconds=CLAIM_SECONDS),
            attempts=Notification.attempts + 1,
        )
        .where(
            Notification.id == note.id,
            Notification.status == "pending",
            Notification.attempts == note.attempts,
            Notification.claimed_until.is_null() | (Notification.claimed_until < now),
        )
        .execute()
    )


def pause(attempts: int, first: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: doubling, at most an hour."""
    return min(first * 2 ** max(attempts - 1, 0), MAX_PAUSE)


def drain(config: Mapping[str, Any], now: dt.datetime | None = None, limit: int = BATCH) -> int:
    """Send what is due; returns how many rows were tried."""
    attempts_max = max(1, int(config.get("NOTIFY_ATTEMPTS", 5)))
    first = float(config.get("NOTIFY_RETRY_SECONDS", 60))
    tried = 0
    with tokens.connected():
        now = now or utcnow()
        due = list(
            Notification.select()
            .where(
                Notification.status == "pending",
                Notification.next_attempt_at <= now,
                Notification.claimed_until.is_null() | (Notification.claimed_until < now),
            )
            .order_by(Notification.id)
            .limit(limit)
        )
        for note in due:
            if not _claim(note, now):
                continue
            tried += 1
            attempt = note.attempts + 1
            try:
                deliver(note, config)
            except DeliveryError as exc:
                _failed(note, attempt, exc, attempts_max, first)
            except Exception as exc:  # a bug must not stop the other messages
                log.exception("notification %s: sending failed", note.id)
                _failed(note, attempt, DeliveryError(f"Internal error ({type(exc).__name__})"),
                        attempts_max, first)  # fmt: skip
            else:
                Notification.update(
                    status="sent", sent_at=utcnow(), claimed_until=None, last_error=""
                ).where(Notification.id == note.id).execute()
    return tried


def _failed(
    note: Notification, attempt: int, exc: DeliveryError, attempts_max: int, first: float
) -> None:
    final = not exc.retry or attempt >= attempts_max
    values: dict[Any, Any] = {
        Notification.last_error: exc.message[:1000],
        Notification.claimed_until: None,
    }
    if final:
        values[Notification.status] = "failed"
    else:
        values[Notification.next_attempt_at] = utcnow() + dt.timedelta(
            seconds=pause(attempt, first)
        )
    Notification.update(values).where(Notification.id == note.id).execute()
    log.warning(
        "notification %s (%s, %s): try %d %s: %s",
        note.id, note.kind, note.channel, attempt, "failed, giving up" if final else "failed",
        exc.message,
    )  # fmt: skip


KEEP_DAYS = 90


def sweep(today: dt.date | None = None) -> int:
    """The checks nobody's action triggers: credentials entering their expiry windows. Also
    forgets sent and failed messages after ``KEEP_DAYS``."""
    with tokens.connected():
        Notification.delete().where(
            Notification.status != "pending",
            Notification.created_at < utcnow() - dt.timedelta(days=KEEP_DAYS),
        ).execute()
        return oauth_clients.notify_expiring(today)


class Notifier:
    """Drains ``app``'s outbox every ``NOTIFY_POLL_SECONDS`` in a daemon thread; sweeps hourly."""

    SWEEP_SECONDS = 3600.0

    def __init__(self, app: Flask | None = None, config: Mapping[str, Any] | None = None) -> None:
        self.app = app or appstate.current()  # whose outbox (by default: the current app's)
        self.config = config if config is not None else (self.app.config if self.app else {})
        self.interval = float(self.config.get("NOTIFY_POLL_SECONDS", 5))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = -self.SWEEP_SECONDS

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            _RUNNING.set(self.app, self)
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Look at the outbox now (a test message was queued)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with appstate.bound(self.app):
                    if time.monotonic() - self._swept >= self.SWEEP_SECONDS:
                        self._swept = time.monotonic()
                        sweep()
                    drain(self.config)
            except Exception:  # keep the thread alive; the next round tries again
                log.exception("notification round failed")
            self._wake.wait(self.interval)
            self._wake.clear()


_RUNNING: appstate.Slot[Notifier] = appstate.Slot("notifier", fallback=False)


def wake() -> None:
    """Have the current app's running notifier look at the outbox now (none runs: nothing)."""
    notifier = _RUNNING.get_or_none()
    if notifier is not None:
        notifier.wake()
