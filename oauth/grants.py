"""Requests to a provider's OAuth endpoints: code exchange, client credentials, device code,
password grant, refresh and revocation, all through one TLS setup (system CAs plus the
configured upstream CA file) and one mapping of failures to errors a person can act on.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from flask import Flask
from requests.adapters import HTTPAdapter

from config import HostPolicy, is_loopback_host
from models import OAuthClient
from oauth import providers
from oauth.errors import TEMPORARY, GrantError, TokenError, TokenUnavailable
from store import appstate

log = logging.getLogger("auth_email.grants")

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True)
class Settings:
    """What the module needs from the configuration; set by ``configure``."""

    ca_file: str = ""
    hosts: HostPolicy = HostPolicy()
    timeout: float = 15.0  # seconds per HTTP request
    attempts: int = 3  # tries per refresh on timeouts and 5xx
    backoff: float = 0.5  # first pause between tries; doubles
    margin: int = 60  # a cached token must stay valid this many seconds more
    poll: float = 0.1  # how often a waiting caller looks at the row again

    @property
    def claim_seconds(self) -> float:
        """How long a refresh claim holds before another caller may take over (a crash)."""
        return self.attempts * self.timeout + self.backoff * 2**self.attempts + 10

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            ca_file=str(config.get("UPSTREAM_CA_FILE") or ""),
            hosts=HostPolicy.from_config(config, providers.preset_hosts()),
            timeout=float(config.get("TOKEN_HTTP_TIMEOUT", 15.0)),
            attempts=int(config.get("TOKEN_ATTEMPTS", 3)),
            backoff=float(config.get("TOKEN_BACKOFF", 0.5)),
        )


class _State:
    """One app's settings, and the TLS context built from them on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.ssl_context: ssl.SSLContext | None = None


_STATE: appstate.Slot[_State] = appstate.Slot("grants", default=lambda: _State(Settings()))


def init_app(app: Flask) -> None:
    """Take the app's settings from its config."""
    use_settings(app, Settings.from_config(app.config))


def use_settings(app: Flask, settings: Settings) -> None:
    _STATE.set(app, _State(settings))


def settings() -> Settings:
    """The current app's settings."""
    return _STATE.get().settings


# ---------------------------------------------------------------------------------- HTTP


def ssl_context() -> ssl.SSLContext:
    """System CAs plus ``UPSTREAM_CA_FILE``: for token endpoints and upstream mail servers."""
    state = _STATE.get()
    with state.lock:
        if state.ssl_context is None:
            context = ssl.create_default_context()
            if state.settings.ca_file:
                context.load_verify_locations(cafile=state.settings.ca_file)
            state.ssl_context = context
        return state.ssl_context


class _VerifyingAdapter(HTTPAdapter):
    """Verifies servers against ``ssl_context()`` (requests alone takes one CA bundle)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = ssl_context()
        super().init_poolmanager(*args, **kwargs)


def check_endpoint(url: str) -> None:
    """Token, device, revocation and permission URLs: https to a host the instance allows
    (CUSTOM_CLIENT_HOSTS); plain http only to loopback, and loopback only where allowed."""
    parts = urlsplit(url)
    secure = parts.scheme == "https" or (
        parts.scheme == "http" and is_loopback_host(parts.hostname)
    )
    if not secure:
        raise GrantError("insecure_endpoint", f"the endpoint {url!r} must use https")
    refusal = settings().hosts.refusal(parts.hostname)
    if refusal:
        raise GrantError("host_not_allowed", refusal)


def host_policy() -> HostPolicy:
    """Where clients may point this server (the one policy: forms, grants, mail servers)."""
    return settings().hosts


def session_for(client: OAuthClient, *, redirect_uri: str | None = None) -> OAuth2Session:
    """An Authlib session built for this client (never a global registry entry)."""
    from oauth import certificates as client_certificates

    secret = client.client_secret or None
    method = "client_secret_basic" if secret else "none"
    if client_certificates.uses_certificate(client):
        # RFC 7523: the "secret" Authlib signs the client assertion with is the private key.
        secret, method = client.private_key, "private_key_jwt"
    session = OAuth2Session(
        client_id=client.client_id,
        client_secret=secret,
        token_endpoint_auth_method=method,
        scope=client.scope or None,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
    )
    if method == "private_key_jwt":
        session.register_client_auth_method(client_certificates.assertion_auth(client))
    session.mount("https://", _VerifyingAdapter())
    session.hooks["response"].append(_raise_when_busy)
    return session


def _raise_when_busy(response: requests.Response, *_: Any, **__: Any) -> None:
    """A 429 or 5xx answer is a temporary failure whatever its body says (even an OAuth error)."""
    if response.status_code == 429 or response.status_code >= 500:
        response.raise_for_status()


def call_endpoint(request: Callable[[], Any]) -> dict[str, Any]:
    """Run one token request; map every failure to a GrantError or TokenUnavailable.

    The provider's temporary errors (``server_error``, ``temporarily_unavailable``,
    ``slow_down``), HTTP 429 and 5xx, timeouts and network failures are ``TokenUnavailable``;
    every other OAuth error is a ``GrantError`` (``grant_gone`` / ``client_refused`` tell which).
    """
    try:
        token = request()
    except OAuthError as exc:
        error, description = str(exc.error or ""), str(exc.description or "")
        wait = getattr(exc, "retry_after", None)
        if error in TEMPORARY:
            said = f"{error}: {description}" if description else error
            raise TokenUnavailable(
                f"the token endpoint is temporarily unable to answer ({said[:300]})", wait
            ) from None
        raise GrantError(error, description, wait) from None
    except requests.Timeout:
        raise TokenUnavailable("the token endpoint did not answer in time") from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        wait = retry_after_of(exc.response)
        if status >= 500 or status == 429:
            raise TokenUnavailable(f"the token endpoint answered HTTP {status}", wait) from None
        raise GrantError("http_error", f"the token endpoint answered HTTP {status}") from None
    except requests.exceptions.SSLError as exc:
        raise TokenUnavailable(f"TLS failure at the token endpoint: {_reason(exc)}") from None
    except requests.ConnectionError as exc:
        unreached = TokenUnavailable(f"the token endpoint is unreachable: {_reason(exc)}")
        unreached.unreached = True
        raise unreached from None
    except requests.RequestException as exc:
        raise TokenUnavailable(f"the token endpoint is unreachable: {_reason(exc)}") from None
    except ValueError as exc:
        raise TokenUnavailable(f"the token endpoint gave no usable answer ({exc})") from None
    return dict(token)


RETRY_AFTER_MAX = 86400.0


def retry_after_of(response: requests.Response | None) -> float | None:
    """The answer's ``Retry-After`` in seconds (delta-seconds or an HTTP date), at most a day."""
    raw = response.headers.get("Retry-After", "").strip() if response is not None else ""
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _reason(exc: BaseException) -> str:
    """A short cause without URLs or bodies (which never hold secrets here, but stay short)."""
    while exc.__context__ is not None and not isinstance(exc, OSError | ssl.SSLError):
        exc = exc.__context__
    return type(exc).__name__ if not str(exc) else str(exc).split("\n")[0][:200]


def _post(client: OAuthClient, url: str, data: dict[str, str]) -> dict[str, Any]:
    """A plain form POST to an endpoint with the client's credentials (device, revocation)."""
    check_endpoint(url)
    session = session_for(client)

    def send() -> dict[str, Any]:
        # Without a secret the method is "none", which puts client_id into the body itself.
        auth = session.client_auth(session.token_endpoint_auth_method)
        body = {**data}
        if session.token_endpoint_auth_method == "private_key_jwt":
            body["client_id"] = client.client_id
        response = session.post(url, data=body, auth=auth, timeout=settings().timeout)
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            response.raise_for_status()
            raise ValueError(f"HTTP {response.status_code}, not a JSON object")
        if "error" in payload:
            refused = OAuthError(
                str(payload.get("error")), str(payload.get("error_description") or "")
            )
            refused.retry_after = retry_after_of(response)  # type: ignore[attr-defined]
            raise refused
        if not response.ok:
            response.raise_for_status()
        return payload

    return call_endpoint(send)


# ---------------------------------------------------------------------------------- grants


def _fetch(client: OAuthClient, redirect_uri: str | None = None, **params: Any) -> dict[str, Any]:
    """One request to the client's token endpoint with the given grant parameters."""
    check_endpoint(client.token_url)
    session = session_for(client, redirect_uri=redirect_uri)
    if redirect_uri:
        params["redirect_uri"] = redirect_uri
    return call_endpoint(
        lambda: session.fetch_token(client.token_url, timeout=settings().timeout, **params)
    )


def exchange_code(
    client: OAuthClient, code: str, redirect_uri: str, code_verifier: str
) -> dict[str, Any]:
    """Authorization Code grant with PKCE: the code from the callback for tokens."""
    return _fetch(
        client,
        redirect_uri=redirect_uri,
        grant_type="authorization_code",
        code=code,
        code_verifier=code_verifier,
    )


def client_credentials(client: OAuthClient) -> dict[str, Any]:
    """Client Credentials grant (no user): the scope is the client's, e.g. ``.../.default``."""
    return _fetch(client, grant_type=providers.CLIENT_CREDENTIALS, scope=client.scope)


def refresh_grant(client: OAuthClient, refresh_token: str, scope: str = "") -> dict[str, Any]:
    """Refresh grant. Without ``scope`` the provider renews what it granted (RFC 6749 section
    6); with one, it must be no more than the grant. The answer is returned as sent, checked by
    the caller (who must keep a rotated refresh token even when the rest is unusable)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scope:
        data["scope"] = scope
    return _post(client, client.token_url, data)


def password_grant(client: OAuthClient, username: str, password: str) -> dict[str, Any]:
    """Resource Owner Password grant (legacy; fails with MFA). The password is not kept."""
    return _fetch(
        client, grant_type="password", username=username, password=password, scope=client.scope
    )


@dataclass(frozen=True)
class DeviceStart:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


def device_code_start(client: OAuthClient) -> DeviceStart:
    """Start a Device Code flow: the code the user types at the provider's page."""
    if not client.device_url:
        raise GrantError("unsupported_grant_type", "this client has no device authorization URL")
    data = {"scope": client.scope} if client.scope else {}
    answer = _post(client, client.device_url, data)
    try:
        return DeviceStart(
            device_code=str(answer["device_code"]),
            user_code=str(answer["user_code"]),
            verification_uri=str(answer.get("verification_uri") or answer["verification_url"]),
            verification_uri_complete=str(answer.get("verification_uri_complete") or ""),
            expires_in=int(answer.get("expires_in") or 900),
            interval=int(answer.get("interval") or 5),
        )
    except (KeyError, TypeError, ValueError):
        raise TokenUnavailable("the device authorization answer is incomplete") from None


def device_code_poll(client: OAuthClient, device_code: str) -> dict[str, Any] | None:
    """One poll of a Device Code flow: the tokens, or None while the user has not finished.

    ``slow_down`` arrives as ``TokenUnavailable`` (like any temporary failure): poll later.
    """
    try:
        return _post(
            client,
            client.token_url,
            {"grant_type": DEVICE_GRANT, "device_code": device_code},
        )
    except GrantError as exc:
        if exc.error == "authorization_pending":
            return None
        raise


def revoke(client: OAuthClient, url: str, token: str, hint: str) -> bool:
    """RFC 7009 revocation; True when the provider accepted it. Failures are not fatal."""
    try:
        _post(client, url, {"token": token, "token_type_hint": hint})
    except TokenError as exc:
        log.info("revocation at the provider failed: %s", exc.message)
        return False
    return True


def identity_from(token: Mapping[str, Any]) -> str:
    """Who signed in: from the id_token's claims, else from the access token's when it is a
    JWT (Entra's ``upn``, ``preferred_username``). Both came straight from the provider over
    TLS; the access token is opaque to us otherwise (Microsoft says so), so only read."""
    for name in ("id_token", "access_token"):
        claims = _jwt_claims(token.get(name))
        for key in ("email", "preferred_username", "upn", "unique_name"):
            value = claims.get(key)
            if isinstance(value, str) and "@" in value:
                return value.lower()
    return ""


def _jwt_claims(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str) or raw.count(".") != 2:
        return {}
    try:
        part = raw.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}
