"""Sending through Microsoft Graph: the Graph access token, ``sendMail`` with MIME, and the
link check.

Used when a Microsoft 365 tenant refuses SMTP AUTH (``535 5.7.139``) or the account is set to
deliver through Graph (see ``smtpdelivery``). The mail proxy accepts the device's message and
hands it here; the device's SMTP reply waits for Graph's answer (``202 Accepted``), and every
refusal becomes an SMTP reply a person can act on (``DeliveryRefused``).

The Graph token is a separate access token (Graph and Outlook are different resources), got
with the account's refresh token for ``https://graph.microsoft.com/Mail.Send`` (Entra allows a
refresh for another consented resource), or with Client Credentials for
``https://graph.microsoft.com/.default``. It is stored encrypted next to the Outlook token and
renewed when it runs out. The rotated refresh token Entra returns is not stored: the old one
keeps working (Entra does not revoke it), and the main token lifecycle owns that column.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import SMTPUTF8
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote

import requests
from flask import Flask

from mailproxy.backend import DeliveryRefused
from models import Account, OAuthClient, utcnow
from oauth import errors as oauth_errors
from oauth import grants, providers
from store import appstate
from store.db import Ciphertext, vault

log = logging.getLogger("auth_email.graph")

GRAPH_SCOPE = "https://graph.microsoft.com/Mail.Send"
GRAPH_APP_SCOPE = "https://graph.microsoft.com/.default"
#: Graph takes about 4 MB per request; base64 makes 3 bytes of MIME 4, so 3 MiB of message.
MAX_MESSAGE = 3 * 1024 * 1024
#: Graph's limit of recipients per message.
MAX_RECIPIENTS = 500
RECIPIENT_HEADERS = ("To", "Cc", "Bcc")


@dataclass(frozen=True)
class Settings:
    url: str = "https://graph.microsoft.com"
    timeout: float = 30.0  # seconds per request
    attempts: int = 3  # tries of sendMail while Graph answers 5xx (never after a timeout)
    backoff: float = 1.0  # first pause between tries; doubles; a shorter Retry-After wins

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            url=str(config.get("GRAPH_URL") or cls.url).rstrip("/"),
            timeout=float(config.get("GRAPH_TIMEOUT", cls.timeout)),
            attempts=max(1, int(config.get("GRAPH_ATTEMPTS", cls.attempts))),
            backoff=float(config.get("GRAPH_BACKOFF", cls.backoff)),
        )


_SETTINGS: appstate.Slot[Settings] = appstate.Slot("graphsend", default=Settings)
_locks: dict[int, threading.Lock] = {}
_locks_lock = threading.Lock()


def init_app(app: Flask) -> None:
    _SETTINGS.set(app, Settings.from_config(app.config))


def settings() -> Settings:
    """The current app's settings."""
    return _SETTINGS.get()


class GraphTokenError(Exception):
    """No Graph token could be had; ``reply`` is the SMTP reply that says why."""

    def __init__(self, reply: DeliveryRefused) -> None:
        super().__init__(reply.text)
        self.reply = reply


# ---------------------------------------------------------------------------------- token


def _lock(account_id: int) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(account_id, threading.Lock())


def graph_token(account_id: int, force_refresh: bool = False) -> str:
    """A Graph access token for the account (cached encrypted; one renewal at a time)."""
    with _lock(account_id):
        account = Account.get_by_id(account_id)
        expires = account.graph_token_expires_at
        if (
            not force_refresh
            and account.has_secret("graph_access_token")
            and expires is not None
            and expires > utcnow() + dt.timedelta(seconds=grants.settings().margin)
        ):
            return str(account.graph_access_token)
        token = _request_token(account)
        access = str(token["access_token"])
        sealed = vault.get().seal(access, Account.graph_access_token.aad(account))
        Account.update(
            graph_access_token=Ciphertext(sealed),
            graph_token_expires_at=_expiry(token),
        ).where(Account.id == account_id).execute()
        return access


def _expiry(token: Mapping[str, Any]) -> dt.datetime:
    try:
        seconds = int(token.get("expires_in") or 3600)
    except (TypeError, ValueError):
        seconds = 3600
    return utcnow() + dt.timedelta(seconds=max(seconds, 0))


def _request_token(account: Account) -> dict[str, Any]:
    client: OAuthClient | None = account.client
    if client is None:
        raise GraphTokenError(DeliveryRefused(554, "5.7.0", "This mailbox has no OAuth client."))
    try:
        if client.grant == providers.CLIENT_CREDENTIALS:
            session = grants.session_for(client)
            token = grants.call_endpoint(
                lambda: session.fetch_token(
                    client.token_url,
                    grant_type=providers.CLIENT_CREDENTIALS,
                    scope=GRAPH_APP_SCOPE,
                    timeout=grants.settings().timeout,
                )
            )
        else:
            refresh = account.refresh_token
            if not refresh:
                raise oauth_errors.GrantError("invalid_grant", "no refresh token is stored")
            grants.check_endpoint(client.token_url)
            session = grants.session_for(client)
            token = grants.call_endpoint(
                lambda: session.refresh_token(
                    client.token_url,
                    refresh_token=str(refresh),
                    scope=GRAPH_SCOPE,
                    timeout=grants.settings().timeout,
                )
            )
    except oauth_errors.GrantError as exc:
        raise GraphTokenError(_token_refusal(client, exc)) from None
    except oauth_errors.TokenUnavailable as exc:
        raise GraphTokenError(
            DeliveryRefused(451, "4.4.3", f"No Microsoft Graph token: {exc.message}")
        ) from None
    if not isinstance(token.get("access_token"), str) or not token["access_token"]:
        raise GraphTokenError(
            DeliveryRefused(451, "4.4.3", "The token endpoint answered without a Graph token.")
        )
    return token


def _token_refusal(client: OAuthClient, exc: oauth_errors.GrantError) -> DeliveryRefused:
    said = f"{exc.error}: {exc.description}"[:300]
    if "65001" in exc.description or "consent" in exc.description.lower() or exc.client_refused:
        return DeliveryRefused(550, "5.7.1", f"{permission_help(client)} ({said})")
    return DeliveryRefused(
        554, "5.7.0", f"Microsoft refused the authorization; re-authorize the mailbox ({said})"
    )


def permission_help(client: OAuthClient) -> str:
    """Which permission to add so that Graph may send (delegated or application)."""
    if client.grant == providers.CLIENT_CREDENTIALS:
        return (
            "Sending through Microsoft Graph needs the application permission Mail.Send "
            "(Microsoft Graph) with admin consent in the app registration"
        )
    return (
        "Sending through Microsoft Graph needs the delegated permission Mail.Send (Microsoft "
        f"Graph): add {GRAPH_SCOPE} to the client's scope and the app registration, then "
        "re-authorize the mailbox"
    )


# ---------------------------------------------------------------------------------- MIME


def prepare(address: str, recipients: list[str], message: bytes) -> bytes:
    """The MIME Graph gets: every envelope recipient named in To, Cc or Bcc.

    Graph's MIME ``sendMail`` delivers to the recipients in the headers, not to an envelope.
    So envelope recipients the headers do not name (Bcc, which clients strip before sending)
    go into a Bcc header, which Graph removes on delivery. An address in the headers that is
    not an envelope recipient would be sent to by Graph, unlike SMTP: refused.
    """
    if len(recipients) > MAX_RECIPIENTS:
        raise DeliveryRefused(
            452, "4.5.3", f"Microsoft Graph takes at most {MAX_RECIPIENTS} recipients a message"
        )
    headers = BytesHeaderParser(policy=SMTPUTF8).parsebytes(message)
    named = {
        a.lower()
        for _, a in getaddresses(
            [str(v) for name in RECIPIENT_HEADERS for v in headers.get_all(name, [])]
        )
        if a
    }
    envelope = {r.lower() for r in recipients}
    extra = sorted(named - envelope)
    if extra:
        raise DeliveryRefused(
            550,
            "5.7.0",
            "Microsoft Graph sends to every address in To, Cc and Bcc, and "
            f"{', '.join(extra)[:200]} is not among this message's RCPT TO recipients; "
            "send it with matching recipients",
        )
    missing = [r for r in recipients if r.lower() not in named]
    if missing:
        message = b"Bcc: " + ", ".join(missing).encode("utf-8") + b"\r\n" + message
    if len(message) > MAX_MESSAGE:
        raise too_large(len(message))
    return message


def too_large(size: int | None = None) -> DeliveryRefused:
    said = f" ({size} bytes)" if size else ""
    return DeliveryRefused(
        552,
        "5.3.4",
        f"Message too big for Microsoft Graph{said}: it takes at most {MAX_MESSAGE} bytes "
        "(4 MB per request); send a smaller message or smaller attachments",
    )


# ---------------------------------------------------------------------------------- sending


def _http() -> requests.Session:
    session = requests.Session()
    session.mount("https://", grants._VerifyingAdapter())
    return session


def _graph_error(response: requests.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error", {})
        return str(error.get("code", "")), str(error.get("message", ""))[:300]
    except (ValueError, AttributeError):
        return "", response.text[:200]


def _retry_after(response: requests.Response, default: int) -> int:
    try:
        return max(0, int(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


def send(account: Account, sender: str, recipients: list[str], message: bytes) -> str:
    """POST the message to ``/users/{mailbox}/sendMail``; the confirmation text on 202.

    Raises ``DeliveryRefused`` with the SMTP reply. 5xx answers are tried again a bounded
    number of times (the message was not accepted); a request that timed out is not (it may
    have been), and 429 is not (Graph asks to wait).
    """
    body = base64.b64encode(prepare(account.address, recipients, message))
    url = f"{settings().url}/v1.0/users/{quote(account.address, safe='@')}/sendMail"
    http = _http()
    refreshed = False
    pause = settings().backoff
    status, code, said = 0, "", ""
    attempt = 0
    while attempt < settings().attempts:
        attempt += 1
        try:
            token = graph_token(account.id, force_refresh=refreshed)
        except GraphTokenError as exc:
            raise exc.reply from None
        try:
            response = http.post(
                url,
                data=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
                timeout=settings().timeout,
            )
        except requests.exceptions.ConnectTimeout:
            status, said = 0, "Microsoft Graph could not be reached in time"
        except requests.Timeout:
            raise DeliveryRefused(
                451,
                "4.4.2",
                f"Microsoft Graph did not confirm the message within {settings().timeout:g} s; "
                "it may not have been sent: check Sent Items before sending it again",
            ) from None
        except requests.ConnectionError as exc:
            status, said = 0, f"Microsoft Graph is unreachable ({type(exc).__name__})"
        else:
            status = response.status_code
            if status == 202:
                return f"Sent through Microsoft Graph as {account.address}"
            code, said = _graph_error(response)
            log.info("Graph sendMail for %s: HTTP %s %s", account.address, status, code)
            if status == 401 and not refreshed:
                refreshed = True
                attempt -= 1  # a renewed token is not a new attempt of Graph's patience
                continue
            if status < 500:
                raise _refusal(account, sender, status, code, said, response)
            pause = min(pause, float(_retry_after(response, int(pause))))
        if attempt < settings().attempts:
            time.sleep(pause)
            pause *= 2
    where = f"HTTP {status}" if status else said
    raise DeliveryRefused(
        451,
        "4.3.0",
        f"Microsoft Graph is unavailable ({where}) after {attempt} attempts; the message was "
        "not sent, try again later",
    )


def _refusal(
    account: Account, sender: str, status: int, code: str, said: str, response: requests.Response
) -> DeliveryRefused:
    client = account.client
    principal = (
        client.client_id if client and client.grant == providers.CLIENT_CREDENTIALS else None
    )
    if code == "ErrorSendAsDenied":
        trustee = f"the app {principal}" if principal else account.address
        return DeliveryRefused(
            550,
            "5.7.60",
            f"SendAsDenied: {trustee} may not send as {sender or 'the From address'}. Send from "
            f"{account.address}, or have an Exchange admin grant it: Add-RecipientPermission "
            f"-Identity {sender or '<from address>'} -Trustee {principal or account.address} "
            "-AccessRights SendAs",
        )
    if status == 429:
        wait = _retry_after(response, 60)
        return DeliveryRefused(
            451,
            "4.7.0",
            f"Microsoft Graph is throttling this mailbox ({code or 'HTTP 429'}); "
            f"try again in {wait} seconds",
        )
    if status == 413 or code in ("ErrorRequestEntityTooLarge", "ErrorMessageSizeExceeded"):
        return too_large()
    if status == 401:
        return DeliveryRefused(
            451, "4.7.0", f"Microsoft Graph refused a fresh token ({code}: {said}); try again later"
        )
    if status == 403:
        help_text = permission_help(client) if client else "Mail.Send is missing"
        return DeliveryRefused(
            550,
            "5.7.1",
            f"Microsoft Graph denied sending as {account.address} ({code}). {help_text}",
        )
    if status == 404:
        return DeliveryRefused(
            550, "5.1.0", f"Microsoft Graph does not know the mailbox {account.address}"
        )
    if code == "ErrorInvalidRecipients":
        return DeliveryRefused(550, "5.1.3", f"Microsoft Graph refused the recipients: {said}")
    return DeliveryRefused(
        554, "5.6.0", f"Microsoft Graph refused the message ({code or status}): {said}"
    )


# ---------------------------------------------------------------------------------- check


def check(account: Account, access_token: str | None = None) -> str:
    """Test Graph without sending: ``GET /v1.0/users/{mailbox}``. Raises ``DeliveryRefused``."""
    try:
        token = access_token or graph_token(account.id)
    except GraphTokenError as exc:
        raise exc.reply from None
    url = f"{settings().url}/v1.0/users/{quote(account.address, safe='@')}"
    try:
        response = _http().get(
            url, headers={"Authorization": f"Bearer {token}"}, timeout=settings().timeout
        )
    except requests.RequestException as exc:
        raise DeliveryRefused(451, "4.4.1", f"Microsoft Graph is unreachable: {exc}") from None
    if response.status_code == 200:
        return f"Microsoft Graph knows {account.address}."
    code, said = _graph_error(response)
    raise _refusal(account, account.address, response.status_code, code, said, response)
