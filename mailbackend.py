"""The app's side of the mail proxy: password checks, tokens and accounting for ``mailproxy``.

The proxy calls these methods from worker threads (never on its event loop). A short-lived
in-memory cache, like Dovecot's auth cache, spares a client that polls every minute a memory-hard
hash each time; every hit is still checked against the database, so a revoked or changed
password, or an account that needs re-authorization, takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask

import audit
import providers
import throttle
import tokens
from db import database
from mailproxy import Controller, Grant, ProxyAuthError, ProxySettings
from mailproxy.settings import LISTENER_NAMES, parse_hostport
from models import Account, MailPassword, utcnow
from passwords import verify_password

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

    def _key(self, address: str, password: str) -> tuple[str, bytes]:
        return address, hmac.new(self._salt, password.encode(), hashlib.sha256).digest()

    def get(self, address: str, password: str) -> _Cached | None:
        key = self._key(address, password)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit.until < time.monotonic():
                del self._entries[key]
                hit = None
        return hit

    def put(self, address: str, password: str, account_id: int, password_id: int) -> None:
        entry = _Cached(account_id, password_id, time.monotonic() + self.ttl)
        with self._lock:
            self._entries[self._key(address, password)] = entry

    def drop_account(self, account_id: int) -> None:
        with self._lock:
            for key in [k for k, v in self._entries.items() if v.account_id == account_id]:
                del self._entries[key]


class AppBackend:
    """``mailproxy.Backend`` over this app's accounts, mail-client passwords and tokens."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.public_url = config["PUBLIC_URL"]
        self.policy_address = throttle.Policy(
            config["LOGIN_FAILURE_LIMIT"], config["LOGIN_BLOCK_SECONDS"]
        )
        self.policy_ip = throttle.Policy(
            config["LOGIN_FAILURE_LIMIT_PER_IP"], config["LOGIN_BLOCK_SECONDS"]
        )
        self.cache = AuthCache()
        self._open: dict[int, int] = {}
        self._open_lock = threading.Lock()

    # -- password check ---------------------------------------------------------------------
    def authenticate(self, protocol: str, address: str, password: str, client_ip: str) -> Grant:
        address = address.strip().lower()
        with database.connection_context():
            keys = [f"mail:addr:{address}", f"mail:ip:{client_ip}"]
            wait = throttle.retry_after(keys)
            if wait:
                raise ProxyAuthError(
                    "throttled",
                    f"Too many failed logins; try again in {throttle.describe_wait(wait)}",
                    retry_after=wait,
                )
            account = self._check_password(address, password, client_ip)
            if account is None:
                throttle.failure(keys[0], self.policy_address)
                throttle.failure(keys[1], self.policy_ip)
                audit.record("mail.login_failed", ip=client_ip, target=address, detail=protocol)
                raise ProxyAuthError("credentials", "Wrong address or password")
            throttle.success(keys[0])
            return self._grant(account, protocol, client_ip)

    def _check_password(self, address: str, password: str, client_ip: str) -> Account | None:
        hit = self.cache.get(address, password)
        if hit is not None:
            still = MailPassword.get_or_none(
                (MailPassword.id == hit.password_id) & (MailPassword.account == hit.account_id)
            )
            if still is not None:
                self._password_used(still.id, client_ip)
                return Account.get_by_id(hit.account_id)
        account = Account.get_or_none(Account.address == address)
        candidates = (
            list(MailPassword.select().where(MailPassword.account == account))
            if account is not None
            else []
        )
        if account is None or not candidates:
            verify_password(None, password)  # same cost as a wrong password
            return None
        for candidate in candidates:
            if verify_password(candidate.password_hash, password):
                self.cache.put(address, password, account.id, candidate.id)
                self._password_used(candidate.id, client_ip)
                return account
        return None

    @staticmethod
    def _password_used(password_id: int, client_ip: str) -> None:
        """Last use and IP of the device's password (the account page shows them)."""
        MailPassword.update(last_used_at=utcnow(), last_used_ip=client_ip[:64]).where(
            MailPassword.id == password_id
        ).execute()

    def _grant(self, account: Account, protocol: str, client_ip: str) -> Grant:
        page = f"{self.public_url}/accounts/{account.id}"
        if not account.owner.is_enabled or account.status == "disabled":
            raise ProxyAuthError("disabled", "This account is disabled in Auth-Email")
        if account.status in ("needs_reauth", "pending") or account.client is None:
            audit.record(
                "mail.login_needs_reauth",
                actor=account.owner,
                ip=client_ip,
                target=account.address,
                detail=protocol,
            )
            raise ProxyAuthError("reauth", f"Re-authorize this account in Auth-Email: {page}")
        endpoint = providers.endpoints_for(account.client)[protocol]
        audit.record(
            "mail.login", actor=account.owner, ip=client_ip, target=account.address, detail=protocol
        )
        return Grant(
            account_id=account.id,
            address=account.address,
            upstream=endpoint,
            mechanism=providers.sasl_mechanism_for(account.client),  # type: ignore[arg-type]
        )

    # -- tokens -------------------------------------------------------------------------------
    def access_token(self, account_id: int, force_refresh: bool = False) -> str:
        with database.connection_context():
            try:
                return tokens.get_access_token(account_id, force_refresh=force_refresh)
            except tokens.NeedsReauthorization as error:
                raise ProxyAuthError(
                    "reauth",
                    f"{error} Re-authorize this account in Auth-Email: "
                    f"{self.public_url}/accounts/{account_id}",
                ) from None
            except tokens.TokenUnavailable as error:
                raise ProxyAuthError("unavailable", str(error)) from None

    def token_rejected(self, account_id: int, detail: str) -> None:
        with database.connection_context():
            Account.update(
                status="needs_reauth",
                status_detail=f"The mail server refused a fresh token: {detail}"[:1000],
            ).where(Account.id == account_id).execute()
            self.cache.drop_account(account_id)

    # -- accounting ---------------------------------------------------------------------------
    def session_opened(self, account_id: int, protocol: str, client_ip: str) -> None:
        with self._open_lock:
            self._open[account_id] = self._open.get(account_id, 0) + 1
        with database.connection_context():
            Account.update(last_used_at=utcnow(), last_used_ip=client_ip).where(
                Account.id == account_id
            ).execute()

    def session_closed(self, account_id: int, protocol: str, bytes_in: int, bytes_out: int) -> None:
        with self._open_lock:
            self._open[account_id] = max(0, self._open.get(account_id, 0) - 1)
        with database.connection_context():
            Account.update(bytes_relayed=Account.bytes_relayed + bytes_in + bytes_out).where(
                Account.id == account_id
            ).execute()

    def sessions_open(self, account_id: int) -> int:
        with self._open_lock:
            return self._open.get(account_id, 0)


def proxy_settings(app: Flask) -> ProxySettings:
    """The proxy's settings from the app's configuration layers."""
    from config import mail_host
    from mailsetup import tls_files

    cfg = app.config
    cert, key, _ = tls_files(app)
    return ProxySettings(
        listeners={name: cfg[f"{name.upper()}_LISTEN"] for name in LISTENER_NAMES},
        tls_cert=cert,
        tls_key=key,
        upstream_ca_file=cfg["UPSTREAM_CA_FILE"] or None,
        hostname=mail_host(cfg),
        reauth_message=(
            "The mail provider refused this account's token: re-authorize it on "
            f"{cfg['PUBLIC_URL']}/"
        ),
    )


class MailProxyService:
    """The mail proxy as a service of the serving process (see serve.py)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.backend = AppBackend(app.config)
        app.extensions["mail_backend"] = self.backend
        self.controller = Controller(self.backend, proxy_settings(app))
        app.extensions["mail_proxy"] = self.controller

    def start(self) -> None:
        self.controller.start()
        for name, (host, port) in self.controller.listening.items():
            # A listener on port 0 got a free port: /healthz and the mail-client setup pages
            # read the listener settings, so they must name the port actually bound.
            key = f"{name.upper()}_LISTEN"
            if parse_hostport(self.app.config[key])[1] == 0:
                self.app.config[key] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        self.controller.stop()
