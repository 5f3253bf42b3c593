"""Upkeep in the serving process: refresh idle accounts before their refresh tokens age out.

Microsoft's refresh tokens die after 90 days unused; a mailbox nobody read over the holidays
must not need re-authorization. ``refresh_idle_accounts`` is a plain function (tests call it);
``Upkeep`` runs it now and then in a thread that ``serve.py`` starts and stops.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from flask import Flask

from mailboxes import linking
from models import Account, AccountStatus, OAuthClient, utcnow
from oauth import authorize as oauth
from oauth import errors as oauth_errors
from oauth import providers, tokens
from store import appstate

log = logging.getLogger("auth_email.upkeep")

IDLE_DAYS = 14
INTERVAL_SECONDS = 3600.0


def idle_accounts(now: dt.datetime, idle_days: int = IDLE_DAYS) -> list[int]:
    """Active accounts with a refresh token that was not renewed for ``idle_days``."""
    cutoff = now - dt.timedelta(days=idle_days)
    query = (
        Account.select(Account.id)
        .join(OAuthClient)
        .where(
            Account.status.in_([s.value for s in AccountStatus if s.testable]),
            Account.refresh_token.is_null(False),
            OAuthClient.grant != providers.CLIENT_CREDENTIALS,
            (Account.last_refresh_at < cutoff)
            | (Account.last_refresh_at.is_null() & (Account.created_at < cutoff)),
        )
        .order_by(Account.last_refresh_at)
    )
    return [row.id for row in query]


def refresh_idle_accounts(now: dt.datetime | None = None, idle_days: int = IDLE_DAYS) -> int:
    """Refresh every idle account once; returns how many were refreshed.

    Failures are recorded on the account by the token lifecycle (``needs_reauth`` for a refused
    grant, ``last_error`` for a temporary failure) and show on the dashboard. Also deletes
    expired pending authorizations and abandoned placeholder accounts (older than an hour).
    """
    refreshed = 0
    with tokens.connected():
        for account_id in idle_accounts(now or utcnow(), idle_days):
            try:
                tokens.get_access_token(account_id, force_refresh=True)
            except oauth_errors.TokenError as exc:
                log.warning("upkeep: account %s not refreshed: %s", account_id, exc.message)
                continue
            except Exception:  # one broken account (e.g. unreadable) must not stop the others
                log.exception("upkeep: refreshing account %s failed", account_id)
                continue
            refreshed += 1
        oauth.forget_expired(now)
        abandoned = linking.forget_abandoned(now)
        if abandoned:
            log.info("upkeep: deleted %d abandoned placeholder account(s)", abandoned)
    return refreshed


class Upkeep:
    """Runs ``refresh_idle_accounts`` every ``interval`` seconds in a daemon thread."""

    def __init__(
        self,
        interval: float = INTERVAL_SECONDS,
        idle_days: int = IDLE_DAYS,
        app: Flask | None = None,
    ) -> None:
        self.app = app or appstate.current()  # whose accounts (by default: the current app's)
        self.interval = interval
        self.idle_days = idle_days
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="upkeep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        # A short pause first, so that start-up is not slowed by token requests.
        while not self._stop.wait(min(60.0, self.interval)):
            try:
                with appstate.bound(self.app):
                    count = refresh_idle_accounts(idle_days=self.idle_days)
                if count:
                    log.info("upkeep: refreshed %d idle account(s)", count)
            except Exception:  # keep the thread alive; the next round tries again
                log.exception("upkeep round failed")
            if self._stop.wait(self.interval):
                break
