"""The app's side of the mail proxy: password checks, tokens and accounting for ``mailproxy``.

The proxy calls these methods from worker threads (never on its event loop). A short-lived
in-memory cache, like Dovecot's auth cache, spares a client that polls every minute a memory-hard
hash each time; every hit is still checked against the database, so a revoked or changed
password, or an account that needs re-authorization, takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import peewee as pw
from flask import Flask

from config import LISTEN_SETTINGS, HostPolicy, mail_host
from mailboxes import graphsend, listeners, smtpdelivery
from mailboxes import refusals as mailrefusals
from mailproxy import (
    EVENT_LOOPS,
    Controller,
    DeliveryRefused,
    Grant,
    ProxyAuthError,
    ProxySettings,
    proxyproto,
)
from models import (
    MAIL_LOOKUP_SECRET,
    Account,
    AccountStatus,
    InstanceSecret,
    MailPassword,
    Notification,
    OAuthClient,
    User,
    utcnow,
)
from oauth import errors as oauth_errors
from oauth import providers, tokens
from people import audit, throttle
from people.passwords import lookup_tag, verify_password
from store import appstate
from store.db import Prepared, database

log = logging.getLogger("auth_email.mail")

CACHE_SECONDS = 600.0


@dataclass(frozen=True)
class _Cached:
    account_id: int
    password_id: int
    until: float


class AuthCache:
    """Successful (address, password) checks for a few minutes, keyed by a salted digest."""

    def __init__(self, ttl: float = CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._salt = secrets.token_bytes(16)
        self._entries: dict[tuple[str, bytes], _Cached] = {}
        self._lock = threading.Lock()

    def key(self, address: str, password: str) -> tuple[str, bytes]:
        return address, hmac.new(self._salt, password.encode(), hashlib.sha256).digest()

    def get(self, address: str, password: str) -> _Cached | None:
        key = self.key(address, password)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit.until < time.monotonic():
                del self._entries[key]
                hit = None
        return hit

    def put(self, address: str, password: str, account_id: int, password_id: int) -> None:
        entry = _Cached(account_id, password_id, time.monotonic() + self.ttl)
        with self._lock:
            self._entries[self.key(address, password)] = entry

    def drop_account(self, account_id: int) -> None:
        with self._lock:
            for key in [k for k, v in self._entries.items() if v.account_id == account_id]:
                del self._entries[key]


def _with_owner_and_client(query: Any) -> Account | None:
    """The first account of ``query`` with its owner and client loaded in the same query."""
    return (
        query.switch(Account)
        .join(User, on=Account.owner == User.id)
        .switch(Account)
        .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=Account.client == OAuthClient.id)
        .first()
    )


#: A cache hit's one query: the account with its owner, client and the password used.
_cached_login = Prepared(
    lambda password_id, account_id: (
        Account.select(Account, User, OAuthClient, MailPassword)
        .join(MailPassword)
        .where(MailPassword.id == password_id, Account.id == account_id)
        .switch(Account)
        .join(User, on=Account.owner == User.id)
        .switch(Account)
        .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=Account.client == OAuthClient.id)
    )  # primary keys: at most one row
)


class AppBackend:
    """``mailproxy.Backend`` over this app's accounts, mail-client passwords and tokens."""

    def __init__(self, config: Mapping[str, Any], app: Flask | None = None) -> None:
        # The app whose database, vault and settings the proxy's threads use (by default the
        # one whose context creates the backend).
        self.app = app or appstate.current()
        self.public_url = config["PUBLIC_URL"]
        self.config = dict(config)
        self.hosts = HostPolicy.from_config(config, providers.preset_hosts())
        self.cache = AuthCache()
        self._flights: dict[tuple[str, bytes], threading.Event] = {}
        self._flights_lock = threading.Lock()
        self._hashing = threading.BoundedSemaphore(os.cpu_count() or 1)
        # password / account id -> (IP, when): its last use written then (see ``_recent``)
        self._last_use: dict[int, tuple[str, float]] = {}
        self._last_seen: dict[int, tuple[str, float]] = {}
        # Writes nobody waits for (audit rows, last use, accounting) go to one thread, in order,
        # off the login's critical path; one writer also spares SQLite lock contention.
        self._bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mail-bookkeeping")
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self._pending_lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._open_lock = threading.Lock()
        # (account, protocol) with a mail server refusal on record: a login that works clears it
        self._refused: set[tuple[int, str]] = set()

    # -- password check ---------------------------------------------------------------------
    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        address = address.strip().lower()
        keys = throttle.login_keys("mail", address, client_ip, self.config)
        with self._context():
            self._refuse_if_blocked(throttle.retry_after(keys))
            account = self._check_password(address, password, client_ip, keys)
            if account is None:
                self.later(
                    audit.record, "mail.login_failed", ip=client_ip, target=address, detail=protocol
                )
                raise ProxyAuthError("credentials", "Wrong address or password")
            return self._grant(account, protocol, client_ip)

    @staticmethod
    def _refuse_if_blocked(wait: int) -> None:
        if wait:
            raise ProxyAuthError(
                "throttled",
                f"Too many failed logins; try again in {throttle.describe_wait(wait)}",
                retry_after=wait,
            )

    def _check_password(
        self, address: str, password: str, client_ip: str, keys: list[throttle.Key]
    ) -> Account | None:
        """The account if ``password`` is one of its mail-client passwords.

        A cache hit costs one query. On a miss, identical logins in flight wait for the first
        one's answer instead of hashing again (a client opening ten connections at once is one
        attempt, not ten), and at most one hash per core runs at a time (each takes the
        configured memory, 64 MiB by default).
        """
        hit = self.cache.get(address, password)
        if hit is not None:
            rows = _cached_login(hit.password_id, hit.account_id)
            row = rows[0] if rows else None
            if row is not None:
                self._password_used(hit.password_id, client_ip)
                return row
        key = self.cache.key(address, password)
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = threading.Event()
        assert flight is not None
        if not leader:
            flight.wait(30)
            if self.cache.get(address, password) is not None:
                return self._check_password(address, password, client_ip, keys)
            return None  # the same guess, already counted once by the first of them
        try:
            # Counted before it is verified: parallel guesses cannot all pass (throttle.py).
            self._refuse_if_blocked(throttle.reserve(keys))
            account = self._verify(address, password, client_ip)
            if account is not None:
                throttle.succeeded(keys)
            return account
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.set()

    def _verify(self, address: str, password: str, client_ip: str) -> Account | None:
        """Exactly one hash per attempt, whether the address is unknown or has many passwords.

        The row to verify is found by its keyed lookup digest; with none, a dummy hash is
        verified instead. Passwords from before lookups existed (migration 4) are verified one by
        one until each is next used, which writes its digest.
        """
        tag = lookup_tag(InstanceSecret.value_of(MAIL_LOOKUP_SECRET), address, password)
        account = _with_owner_and_client(
            Account.select(Account, User, OAuthClient).where(
                (Account.address == address) & (Account.status != AccountStatus.PENDING.value)
            )  # the one linked account (placeholders of other users' attempts hold none)
        )
        rows = (
            list(
                MailPassword.select().where(
                    (MailPassword.account == account)
                    & ((MailPassword.lookup == tag) | MailPassword.lookup.is_null())
                )
            )
            if account is not None
            else []
        )
        found = next((row for row in rows if row.lookup == tag), None)
        legacy = [row for row in rows if row.lookup is None]
        match: MailPassword | None
        with self._hashing:
            if found is not None and verify_password(found.password_hash, password):
                match = found
            else:
                if found is None:
                    verify_password(None, password)  # the same work as a wrong password
                match = next(
                    (row for row in legacy if verify_password(row.password_hash, password)), None
                )
                if match is not None:
                    MailPassword.update(lookup=tag).where(MailPassword.id == match.id).execute()
        if account is None or match is None:
            return None
        self.cache.put(address, password, account.id, match.id)
        self._password_used(match.id, client_ip)
        return account

    @contextmanager
    def _context(self) -> Iterator[None]:
        """A database connection, in this backend's app (its database, vault and settings)."""
        with appstate.bound(self.app), database.connection_context():
            yield

    def later(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a bookkeeping write in the bookkeeping thread, in order.

        Writes queued within GATHER_SECONDS of the first, or while the thread is busy, go
        together, in one transaction: a login's audit row and last use, and a burst's, cost
        one commit."""
        with self._pending_lock:
            self._pending.append((write, args, kwargs))
            if len(self._pending) > 1:
                return  # a drain is queued and has not taken the list yet: it takes this too
        self._bookkeeping.submit(self._drain)

    def _drain(self) -> None:
        time.sleep(GATHER_SECONDS)  # the writes queued meanwhile join this transaction
        with self._pending_lock:
            batch, self._pending = self._pending, []
        try:
            with self._context():
                try:
                    with database.atomic():
                        for write, args, kwargs in batch:
                            write(*args, **kwargs)
                    return
                except Exception:
                    if len(batch) == 1:
                        log.exception("bookkeeping write failed")
                        return
                # One write failed and the batch was rolled back: each again in its own
                # transaction, so that only the failing one is lost. (No savepoint per write
                # in the common case: two statements less for each.)
                for write, args, kwargs in batch:
                    try:
                        with database.atomic():
                            write(*args, **kwargs)
                    except Exception:
                        log.exception("bookkeeping write failed")
        except Exception:
            log.exception("bookkeeping writes failed")

    def flush(self) -> None:
        """Wait for the bookkeeping writes submitted so far (at shutdown, and in tests)."""
        self._bookkeeping.submit(lambda: None).result()

    def close(self) -> None:
        self._bookkeeping.shutdown(wait=True)

    def _password_used(self, password_id: int, client_ip: str) -> None:
        """Last use and IP of the device's password (the account page shows them).

        Written when the IP changes or a minute has passed, not on every poll of a busy client.
        """
        if _recent(self._last_use, password_id, client_ip):
            return
        self.later(_note_use, password_id, client_ip)

    def _grant(self, account: Account, protocol: str, client_ip: str) -> Grant:
        page = f"{self.public_url}/accounts/{account.id}"
        if not account.owner.is_enabled or account.state is AccountStatus.DISABLED:
            raise ProxyAuthError("disabled", "This account is disabled in Auth-Email")
        if account.state.needs_authorization or account.client is None:
            self.later(
                audit.record,
                "mail.login_needs_reauth",
                actor=account.owner,
                ip=client_ip,
                target=account.address,
                detail=protocol,
            )
            raise ProxyAuthError("reauth", f"Re-authorize this account in Auth-Email: {page}")
        if account.protocol_state:
            self._refused.update((account.id, p) for p in mailrefusals.states(account))
        endpoint = providers.endpoints_for(account.client).get(protocol)
        if endpoint is None:
            raise ProxyAuthError(
                "refused", f"This mailbox's OAuth client names no {protocol.upper()} server"
            )
        refusal = self.hosts.refusal(endpoint.host)
        if refusal:  # the client was saved under an older, wider CUSTOM_CLIENT_HOSTS
            raise ProxyAuthError("disabled", f"This account's mail server is refused: {refusal}")
        self.later(
            audit.record,
            "mail.login",
            actor=account.owner,
            ip=client_ip,
            target=account.address,
            detail=protocol,
        )
        # A shared mailbox: Exchange wants the delegate who authorized in the SMTP login (and
        # the shared address in From, which needs SendAs); IMAP and POP3 name the mailbox.
        login_as = account.signed_in_as if protocol == "smtp" and account.signed_in_as else ""
        grant = Grant(
            account_id=account.id,
            address=login_as or account.address,
            upstream=endpoint,
            mechanism=providers.sasl_mechanism_for(account.client),  # type: ignore[arg-type]
        )
        if protocol == "smtp" and smtpdelivery.through_graph(account):
            return self._graph_grant(grant)
        # The row just read holds the token: when it needs no renewal, the proxy need not
        # ask ``access_token`` for it (one thread hand-off and one query less per login).
        try:
            token = tokens.ready_token(account) or ""
        except Exception:  # an unreadable token: access_token refuses it in its own words
            token = ""
        return replace(grant, token=token)

    # -- SMTP through Microsoft Graph (smtpdelivery, graphsend) ---------------------------------
    @staticmethod
    def _graph_grant(grant: Grant) -> Grant:
        return replace(grant, deliver=True, max_message=graphsend.MAX_MESSAGE)

    def smtp_auth_refused(self, account_id: int, detail: str) -> Grant | None:
        with self._context():
            switch = smtpdelivery.record_refusal(account_id, detail)
            account = Account.get_by_id(account_id)
            self.later(
                audit.record,
                "mail.smtp_auth_refused",
                actor=account.owner,
                target=account.address,
                detail="switched to Microsoft Graph" if switch else detail[:200],
            )
            if account.client is None:
                return None
            if not switch:  # SMTP AUTH by choice: recorded for SMTP only, with its fix
                self.upstream_refused(account_id, "smtp", detail.removeprefix("mail server: "))
                return None
            endpoint = providers.endpoints_for(account.client)["smtp"]
            mechanism = providers.sasl_mechanism_for(account.client)
            return self._graph_grant(
                Grant(account.id, account.address, endpoint, mechanism)  # type: ignore[arg-type]
            )

    def deliver(self, account_id: int, sender: str, recipients: list[str], message: bytes) -> str:
        with self._context():
            account = Account.get_or_none(Account.id == account_id)
            if account is None:
                raise DeliveryRefused(451, "4.7.0", "This mailbox is not linked any more")
            said = graphsend.send(account, sender, recipients, message)
            self.later(
                audit.record,
                "mail.sent_via_graph",
                actor=account.owner,
                target=account.address,
                detail=f"{len(recipients)} recipients, {len(message)} bytes",
            )
            return said

    # -- tokens -------------------------------------------------------------------------------
    def access_token(self, account_id: int, force_refresh: bool = False) -> str:
        with self._context():
            try:
                return tokens.get_access_token(account_id, force_refresh=force_refresh)
            except oauth_errors.NeedsReauthorization as error:
                # Where to go first: a mail client cuts a long line, the reason may be long.
                raise ProxyAuthError(
                    "reauth",
                    f"Re-authorize this account in Auth-Email at "
                    f"{self.public_url}/accounts/{account_id} : {error.message}",
                ) from None
            except oauth_errors.TokenUnavailable as error:
                raise ProxyAuthError("unavailable", error.message) from None
            except oauth_errors.AccountUnusable as error:
                # unlinked, disabled or not yet authorized since the password was checked
                raise ProxyAuthError("disabled", error.message) from None
            except Exception:
                log.exception("getting the access token of account %s failed", account_id)
                raise ProxyAuthError("unavailable", "Internal error, try again later") from None

    def upstream_refused(self, account_id: int, protocol: str, detail: str) -> None:
        """Worth one refresh and retry? Not for a policy refusal (SMTP AUTH disabled), nor when
        this protocol already refused this very token: the recorded reason comes back at once,
        without a token request. Never marks the account: that is the token endpoint's say."""
        with self._context():
            account = _with_owner_and_client(
                Account.select(Account, User, OAuthClient).where(Account.id == account_id)
            )
            if account is None:
                raise ProxyAuthError("disabled", "This mailbox is not linked any more.")
            refusal = self._explain(account, protocol, detail)
            known = mailrefusals.states(account).get(protocol)
            again = known is not None and known.version == account.token_version
            if refusal.token_may_help and not again:
                return
            stored = mailrefusals.record(account_id, refusal)
            self._refused.add((account_id, protocol))
            raise ProxyAuthError("refused", stored.for_mail_client())

    def token_rejected(self, account_id: int, protocol: str, detail: str) -> str | None:
        """A freshly renewed token was refused too: recorded for this protocol only."""
        with self._context():
            account = _with_owner_and_client(
                Account.select(Account, User, OAuthClient).where(Account.id == account_id)
            )
            if account is None:
                return None
            stored = mailrefusals.record(account_id, self._explain(account, protocol, detail))
            self._refused.add((account_id, protocol))
            log.warning(
                "account %s: %s refused by the mail server: %s", account_id, protocol, detail
            )
            return stored.for_mail_client()

    @staticmethod
    def _explain(account: Account, protocol: str, detail: str) -> mailrefusals.Refusal:
        app_only = account.client is not None and account.client.grant == "client_credentials"
        return mailrefusals.explain(protocol, detail, account.address, app_only)

    # -- accounting ---------------------------------------------------------------------------
    def session_opened(self, account_id: int, protocol: str, client_ip: str) -> None:
        with self._open_lock:
            self._open[account_id] = self._open.get(account_id, 0) + 1
            cleared = (account_id, protocol) in self._refused
            self._refused.discard((account_id, protocol))
        if cleared:
            self.later(mailrefusals.clear, account_id, protocol)
        if not _recent(self._last_seen, account_id, client_ip):
            self.later(_account_used, account_id, client_ip, utcnow())

    def session_closed(self, account_id: int, protocol: str, bytes_in: int, bytes_out: int) -> None:
        with self._open_lock:
            self._open[account_id] = max(0, self._open.get(account_id, 0) - 1)
        self.later(_account_relayed, account_id, bytes_in + bytes_out)

    def sessions_open(self, account_id: int) -> int:
        with self._open_lock:
            return self._open.get(account_id, 0)


#: How long the bookkeeping thread waits for more writes before it writes a batch: a login's
#: writes come within a few milliseconds of each other (half the thread's CPU per login,
#: bench/README.md); nobody waits for them, and the pages show times to the minute.
GATHER_SECONDS = 0.05

#: Last use (of a password, of an account) is written when the IP changes or this many seconds
#: have passed, not on every poll of a busy client: the pages show it to the minute.
LAST_USE_EVERY = 60


def _recent(seen: dict[int, tuple[str, float]], key: int, client_ip: str) -> bool:
    """Whether ``key``'s use from ``client_ip`` was written less than LAST_USE_EVERY ago;
    if not, now counts as written."""
    now = time.monotonic()
    last = seen.get(key)
    if last is not None and last[0] == client_ip and now - last[1] < LAST_USE_EVERY:
        return True
    seen[key] = (client_ip, now)
    return False


def _note_use(password_id: int, client_ip: str) -> None:
    """Record the password's use; a password used from an address it never came from before
    (and that was used elsewhere already) is a notification to its owner."""
    if not MailPassword.note_use(password_id, client_ip):
        return
    row = (
        MailPassword.select(MailPassword, Account)
        .join(Account)
        .where(MailPassword.id == password_id)
        .first()
    )
    if row is None:
        return
    account = row.account
    Notification.raise_event(
        account.owner_id,
        "new_ip",
        account.address,
        f"{account.address}: mail-client password used from a new address ({client_ip})",
        f"The password “{row.label}” of {account.address} was used from {client_ip}, an address "
        "it was never used from before. If that was not you or one of your devices, revoke the "
        "password on the mailbox's page.",
        account_id=account.id,
    )


# Bookkeeping writes: built in the bookkeeping thread, not on the event loop or the login's thread.
def _account_used(account_id: int, client_ip: str, at: Any) -> None:
    Account.update(last_used_at=at, last_used_ip=client_ip).where(
        Account.id == account_id
    ).execute()


def _account_relayed(account_id: int, count: int) -> None:
    Account.update(bytes_relayed=Account.bytes_relayed + count).where(
        Account.id == account_id
    ).execute()


def proxy_settings(app: Flask) -> ProxySettings:
    """The proxy's settings from the app's configuration layers."""
    cfg = app.config
    cert, key, generated = listeners.tls_files(app)
    return ProxySettings(
        listeners={name: cfg[key] for name, key in LISTEN_SETTINGS.items()},
        tls_cert=cert,
        tls_key=key,
        tls_key_group_readable=not generated,  # e.g. certbot's key shared with our group
        upstream_ca_file=cfg["UPSTREAM_CA_FILE"] or None,
        hostname=mail_host(cfg),
        max_connections=cfg["MAIL_MAX_CONNECTIONS"],
        max_connections_per_ip=cfg["MAIL_MAX_CONNECTIONS_PER_IP"],
        idle_timeout_prelogin=cfg["MAIL_IDLE_TIMEOUT_PRELOGIN"],
        idle_timeout=cfg["MAIL_IDLE_TIMEOUT"],
        handshake_timeout=cfg["MAIL_HANDSHAKE_TIMEOUT"],
        prelogin_lifetime=cfg["MAIL_PRELOGIN_SECONDS"],
        max_prelogin_commands=cfg["MAIL_PRELOGIN_COMMANDS"],
        allow_plaintext_from_loopback=bool(cfg["MAIL_PLAINTEXT_FROM_LOOPBACK"]),
        trusted_proxies=trusted_proxies(cfg["MAIL_TRUSTED_PROXIES"]),
        upstream_pool_size=cfg["MAIL_UPSTREAM_POOL"],
        event_loop=event_loop(cfg["MAIL_EVENT_LOOP"]),
        reauth_message=(
            "The mail provider refused this account's token: re-authorize it on "
            f"{cfg['PUBLIC_URL']}/"
        ),
    )


def event_loop(value: str) -> str:
    """MAIL_EVENT_LOOP checked: an unknown loop, or uvloop when not installed, stops the start."""
    name = str(value).strip().lower()
    if name not in EVENT_LOOPS:
        raise ValueError(f"MAIL_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, not {value!r}")
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError(
            "MAIL_EVENT_LOOP is uvloop, which is not installed: install it or use asyncio"
        )
    return name


def trusted_proxies(value: str) -> tuple[str, ...]:
    """MAIL_TRUSTED_PROXIES as a tuple; a value that is no address or network stops the start."""
    try:
        return tuple(str(n) for n in proxyproto.parse_networks(value or ""))
    except ValueError as error:
        raise ValueError(f"MAIL_TRUSTED_PROXIES: {error}") from None


_SERVICE: appstate.Slot[MailProxyService] = appstate.Slot("mail_proxy", fallback=False)


def running(app: Flask) -> MailProxyService | None:
    """The mail proxy service of ``app`` in this process (None: the proxy does not run here)."""
    return _SERVICE.of(app)


class MailProxyService:
    """The mail proxy as a service of the serving process (see serve.py)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.backend = AppBackend(app.config, app)
        self.controller = Controller(self.backend, proxy_settings(app))
        _SERVICE.set(app, self)

    def start(self) -> None:
        self.controller.start()
        # /healthz and the mail-client setup pages name the ports actually bound
        listeners.record_bound(self.app, self.controller.listening)

    def stop(self) -> None:
        self.controller.stop()
        self.backend.close()
