"""Where notifications go: the instance's email sender and each person's webhook.

Email leaves through an SMTP relay the admin configures (its password in the vault), or through
one linked mailbox chosen as the instance's sender, over that mailbox's own upstream path (SMTP
with XOAUTH2, or Microsoft Graph when its delivery setting says so). A webhook gets a JSON POST
signed with HMAC-SHA256 over ``<timestamp>.<raw body>`` (``X-Auth-Email-Signature:
sha256=<hex>``, ``X-Auth-Email-Timestamp``), so a receiver can refuse replays.

Every failure is a ``DeliveryError`` whose message names what refused and never a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import smtplib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

import requests

from config import HostPolicy, is_loopback_host
from mailboxes import graphsend, smtpdelivery, verification
from mailproxy import DeliveryRefused
from models import NOTIFY_RELAY_PASSWORD, Account, InstanceSecret, Setting
from oauth import errors as oauth_errors
from oauth import grants, providers, tokens
from store.db import Prepared

SENDER_KEY = "notify_sender"  # "" (no email), "relay" or "mailbox"
ACCOUNT_KEY = "notify_sender_account"
RELAY_KEYS = ("host", "port", "security", "username", "from")
SECURITY = {"starttls": "STARTTLS", "tls": "Implicit TLS", "plain": "None (loopback only)"}
SIGNATURE_HEADER = "X-Auth-Email-Signature"
TIMESTAMP_HEADER = "X-Auth-Email-Timestamp"


class DeliveryError(Exception):
    """A message could not be delivered. ``retry``: a later try may work (4xx, no answer)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Relay:
    host: str = ""
    port: int = 587
    security: str = "starttls"
    username: str = ""
    from_address: str = ""
    has_password: bool = False


@dataclass(frozen=True)
class Sender:
    """The instance's email sender, as the admin set it (no secret in it)."""

    mode: str  # "", "relay", "mailbox"
    relay: Relay
    account_id: int | None

    @property
    def configured(self) -> bool:
        return bool(self.mode)


def _setting(name: str) -> str:
    return Setting.read(f"notify_relay_{name}") or ""


_secret_named = Prepared(
    lambda name: InstanceSecret.select(InstanceSecret.id).where(InstanceSecret.name == name)
)


def sender() -> Sender:
    port = _setting("port")
    relay = Relay(
        host=_setting("host"),
        port=int(port) if port.isdigit() else 587,
        security=_setting("security") or "starttls",
        username=_setting("username"),
        from_address=_setting("from"),
        has_password=bool(_secret_named(NOTIFY_RELAY_PASSWORD)),
    )
    account = Setting.read(ACCOUNT_KEY) or ""
    account_id = int(account) if account.isdigit() else None
    return Sender(Setting.read(SENDER_KEY) or "", relay, account_id)


def save_sender(
    mode: str,
    *,
    relay: Relay | None = None,
    password: str | None = None,
    account_id: int | None = None,
) -> None:
    """Store the admin's choice. ``password``: None keeps the stored one, "" removes it."""
    Setting.write(SENDER_KEY, mode or None)
    if relay is not None:
        values = {
            "host": relay.host,
            "port": str(relay.port),
            "security": relay.security,
            "username": relay.username,
            "from": relay.from_address,
        }
        for name, value in values.items():
            Setting.write(f"notify_relay_{name}", value or None)
    if password == "":
        InstanceSecret.delete().where(InstanceSecret.name == NOTIFY_RELAY_PASSWORD).execute()
    elif password is not None:
        row = InstanceSecret.get_or_none(InstanceSecret.name == NOTIFY_RELAY_PASSWORD)
        if row is None:
            InstanceSecret.create(name=NOTIFY_RELAY_PASSWORD, value=password)
        else:
            row.value = password
            row.save()
    if account_id is not None:
        Setting.write(ACCOUNT_KEY, str(account_id))


def relay_refusal(host: str, security: str) -> str | None:
    """Why the relay cannot be used that way (a password in the clear, off this machine)."""
    if security == "plain" and not is_loopback_host(host):
        return "Without TLS the relay must be on this machine (a loopback address)."
    return None


# ---------------------------------------------------------------------------------- email


def message(to: str, from_address: str, subject: str, body: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = from_address
    mail["To"] = to
    mail["Subject"] = " ".join(subject.split())  # names typed by people: no line breaks
    mail["Date"] = formatdate(usegmt=True)
    mail["Message-ID"] = make_msgid(domain=from_address.rpartition("@")[2] or None)
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(body)
    return mail


def send_email(to: str, subject: str, body: str, timeout: float = 15.0) -> None:
    """Send through the instance's sender; raises ``DeliveryError``."""
    chosen = sender()
    if chosen.mode == "relay":
        relay = chosen.relay
        _send_relay(relay, message(to, relay.from_address, subject, body), timeout)
    elif chosen.mode == "mailbox":
        account = Account.get_or_none(Account.id == chosen.account_id)
        if account is None:
            raise DeliveryError("The mailbox chosen as the sender is not linked any more.", False)
        _send_mailbox(account, message(to, account.address, subject, body), timeout)
    else:
        raise DeliveryError("The administrator has not set up an email sender.", False)


def _smtp_said(exc: smtplib.SMTPResponseException) -> str:
    said = exc.smtp_error
    text = said.decode(errors="replace") if isinstance(said, bytes) else str(said)
    return f"{exc.smtp_code} {text}".strip()


def _connect(host: str, port: int, security: str, timeout: float) -> smtplib.SMTP:
    where = f"{host}:{port}"
    try:
        return verification.open_smtp(host, port, security, timeout)
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"{where} refused the connection: {_smtp_said(exc)}") from None
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        raise DeliveryError(f"Could not connect to {where}: {exc}") from None


def _send(conn: smtplib.SMTP, where: str, mail: EmailMessage, login: Any = None) -> None:
    try:
        try:
            if login is not None:
                login(conn)
            conn.send_message(mail)
        except DeliveryError:
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            code, said = next(iter(exc.recipients.values()))
            text = said.decode(errors="replace") if isinstance(said, bytes) else str(said)
            raise DeliveryError(
                f"{where} refused the recipient: {code} {text}", code < 500
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"{where} refused: {_smtp_said(exc)}", exc.smtp_code < 500
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"The connection to {where} failed: {exc}") from None
    finally:
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            pass


def _send_relay(relay: Relay, mail: EmailMessage, timeout: float) -> None:
    refusal = relay_refusal(relay.host, relay.security)
    if refusal or not relay.host:
        raise DeliveryError(refusal or "No SMTP relay is set.", False)
    conn = _connect(relay.host, relay.port, relay.security, timeout)
    login = None
    if relay.username:
        row = InstanceSecret.get_or_none(InstanceSecret.name == NOTIFY_RELAY_PASSWORD)
        password = str(row.value) if row is not None else ""

        def login(conn: smtplib.SMTP) -> None:
            conn.ehlo_or_helo_if_needed()
            try:
                conn.login(relay.username, password)
            except smtplib.SMTPResponseException:
                raise
            except smtplib.SMTPException as exc:  # no AUTH, or no mechanism smtplib speaks
                offered = conn.esmtp_features.get("auth", "").strip() or "none"
                raise DeliveryError(
                    f"The relay {relay.host}:{relay.port} cannot take the login: {exc} "
                    f"(it offers: {offered}).",
                    False,
                ) from None

    _send(conn, f"The relay {relay.host}:{relay.port}", mail, login)


def _send_mailbox(account: Account, mail: EmailMessage, timeout: float) -> None:
    """Through the mailbox's own upstream path, as its mail clients' mail goes."""
    if account.client is None:
        raise DeliveryError(f"{account.address} needs re-authorization to send.", False)
    if smtpdelivery.through_graph(account):
        try:
            graphsend.send(account, account.address, [str(mail["To"])], mail.as_bytes())
        except DeliveryRefused as exc:
            raise DeliveryError(
                f"Microsoft Graph refused: {exc.code} {exc.status} {exc.text}",
                exc.code < 500,
            ) from None
        return
    endpoint = providers.endpoints_for(account.client).get("smtp")
    if endpoint is None:
        raise DeliveryError(f"The OAuth client of {account.address} names no SMTP server.", False)
    if endpoint.security == "plain" and not is_loopback_host(endpoint.host):
        raise DeliveryError(f"{endpoint.host} is not loopback: refusing a plain connection.", False)
    try:
        token = tokens.get_access_token(account.id)
    except oauth_errors.TokenError as exc:
        raise DeliveryError(f"No token for {account.address}: {exc.message}") from None
    mechanism = providers.sasl_mechanism_for(account.client)
    login_as = account.signed_in_as or account.address

    def login(conn: smtplib.SMTP) -> None:
        conn.ehlo_or_helo_if_needed()
        payload = verification.sasl_payload(endpoint, mechanism, login_as, token).decode()
        try:
            conn.auth(mechanism.upper(), lambda c=None: payload if c is None else "")
        except smtplib.SMTPAuthenticationError as exc:
            if "5.7.139" in _smtp_said(exc):
                raise  # refused by policy: a newer token cannot help
            # the server refused the cached token: once more with a renewed one
            try:
                fresh = tokens.get_access_token(account.id, force_refresh=True)
            except oauth_errors.TokenError:
                raise exc from None
            payload = verification.sasl_payload(endpoint, mechanism, login_as, fresh).decode()
            conn.auth(mechanism.upper(), lambda c=None: payload if c is None else "")

    conn = _connect(endpoint.host, endpoint.port, endpoint.security, timeout)
    _send(conn, f"{endpoint.host}:{endpoint.port} (as {account.address})", mail, login)


# ---------------------------------------------------------------------------------- webhook


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def webhook_url_refusal(url: str, config: Mapping[str, Any]) -> str | None:
    """Why a webhook URL cannot be used: https, or http to loopback when the instance allows
    loopback hosts (CUSTOM_CLIENT_LOOPBACK); the hosts custom clients may name."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "Enter a full https:// URL."
    if parts.username or parts.password:
        return "Put no user name or password in the URL."
    policy = HostPolicy.from_config(config)
    if parts.scheme == "http" and not (policy.allow_loopback and is_loopback_host(parts.hostname)):
        return "Use https:// (plain http only to this machine, when the instance allows it)."
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "The port is not a number."
    return policy.refusal(parts.hostname)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def post_webhook(
    url: str, secret: str, payload: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    """POST ``payload`` signed; raises ``DeliveryError`` (retry on no answer, 408, 429, 5xx)."""
    refusal = webhook_url_refusal(url, config)
    if refusal:
        raise DeliveryError(f"The webhook URL is refused: {refusal}", False)
    body = json.dumps(payload, separators=(",", ":")).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Auth-Email notifications",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, stamp, body),
        "X-Auth-Email-Event": str(payload.get("event", "")),
    }
    timeout = float(config.get("NOTIFY_TIMEOUT", 15))
    host = urlsplit(url).netloc
    session = requests.Session()
    session.mount("https://", grants._VerifyingAdapter())  # system CAs + UPSTREAM_CA_FILE
    try:
        answer = session.post(
            url,
            data=body,
            headers=headers,
            timeout=(min(timeout, 10.0), timeout),
            allow_redirects=False,
        )
    except requests.Timeout:
        raise DeliveryError(f"The webhook at {host} did not answer within {timeout:g} s.") from None
    except requests.RequestException as exc:
        raise DeliveryError(
            f"Could not reach the webhook at {host} ({type(exc).__name__})."
        ) from None
    finally:
        session.close()
    if 200 <= answer.status_code < 300:
        return
    said = " ".join(answer.text[:200].split())
    retry = answer.status_code in (408, 429) or answer.status_code >= 500
    raise DeliveryError(
        f"The webhook at {host} answered {answer.status_code} {answer.reason}"
        + (f": {said}" if said else ""),
        retry,
    )
