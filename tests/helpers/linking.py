"""The peers' OAuth server, driven over HTTP, and linking mailboxes against it."""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from flask.testing import FlaskClient

from models import OAuthClient, User
from tests.helpers.app import USER_PASSWORD
from tests.helpers.web import AuthActions, post_form

PUBLIC = "http://127.0.0.1:8080"
REDIRECT = PUBLIC + "/authorize"


# ---------------------------------------------------------------------------------- helpers


class PeerInfo:
    """The peers' addresses and helpers, from the ``peers`` fixture."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __getattr__(self, name: str) -> Any:
        source = self.__dict__["source"]
        if isinstance(source, dict):
            if name in source:
                return source[name]
        elif hasattr(source, name):
            return getattr(source, name)
        data = getattr(source, "info", None) or getattr(source, "data", None)
        if isinstance(data, dict) and name in data:
            return data[name]
        raise AttributeError(name)


def mailbox(prefix: str = "box") -> str:
    """A fresh mailbox at the peers (any address there signs in with pw-<local part>)."""
    return f"{prefix}{secrets.token_hex(4)}@example.test"


ALL_GRANTS = [
    "authorization_code",
    "refresh_token",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:device_code",
]


def register(peer: PeerInfo, redirect: str = REDIRECT, **meta: Any) -> dict[str, Any]:
    """Register a client at the OAuth server (RFC 7591), e.g. with ``access_token_ttl``."""
    body = {
        "redirect_uris": [redirect],
        "grant_types": ALL_GRANTS,
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        **meta,
    }
    answer = requests.post(
        peer.registration_url,
        json=body,
        headers={"Authorization": f"Bearer {peer.registration_token}"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def token_requests(peer: PeerInfo, client_id: str) -> int:
    """How many requests reached the token endpoint for this client (counted at the server)."""
    stats = requests.get(peer.test_stats_url, timeout=10).json()
    return int(stats["by_client"].get(client_id, 0))


def revoke_at_op(peer: PeerInfo, **which: str) -> None:
    requests.post(peer.test_revoke_url, json=which, timeout=10).raise_for_status()


def peer_client(
    owner: User, peer: PeerInfo, reg: dict[str, Any], grant: str = "authorization_code", **over: Any
) -> OAuthClient:
    """An "Other (custom server)" client with the peer's URLs and Dovecot as IMAP server."""
    values: dict[str, Any] = {
        "owner": owner,
        "name": f"peer-{grant}-{secrets.token_hex(2)}",
        "provider": "other",
        "grant": grant,
        "authorize_url": peer.auth_url,
        "token_url": peer.token_url,
        "device_url": peer.device_authorization_url,
        "revocation_url": peer.revocation_url,
        "scope": "openid email mail",
        "client_id": reg["client_id"],
        "client_secret": reg.get("client_secret"),
        "imap_host": peer.mail_host,
        "imap_port": peer.imaps_port,
        "imap_security": "tls",
        **over,
    }
    return OAuthClient.create(**values)


def op_sign_in(peer: PeerInfo, url: str, email: str, approve: bool = True) -> str:
    """Sign in and consent at the OAuth server over HTTP; returns the redirect back to us."""
    session = requests.Session()
    answer = session.get(url, allow_redirects=False, timeout=10)
    for _ in range(12):
        location = answer.headers.get("location")
        if location is None:
            page = answer.text
            login = re.search(r'action="(/interaction/[^"]+/login)"', page)
            confirm = re.search(r'action="(/interaction/[^"]+/(?:confirm|abort))"', page)
            if login:
                form = {"login": email, "password": "pw-" + email.split("@")[0]}
                answer = session.post(
                    urljoin(peer.issuer, login.group(1)), data=form, allow_redirects=False
                )
            elif confirm:
                action = (
                    confirm.group(1) if approve else confirm.group(1).replace("confirm", "abort")
                )
                answer = session.post(urljoin(peer.issuer, action), allow_redirects=False)
            else:
                raise AssertionError(f"unexpected page at the OAuth server: {page[:300]}")
            continue
        target = urljoin(answer.url, location)
        if not target.startswith(peer.issuer):
            return target
        answer = session.get(target, allow_redirects=False, timeout=10)
    raise AssertionError("the OAuth server kept redirecting")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def signed_in_user(auth: AuthActions, email: str, custom: bool = True) -> User:
    user = auth.create_user(email, can_custom_clients=custom)
    auth.login(email, USER_PASSWORD)
    return user


def link_by_code(
    client: FlaskClient, peer: PeerInfo, oauth_client: OAuthClient, address: str
) -> tuple[Any, str]:
    """Authorize ``address`` through the web routes; returns (callback response, callback URL)."""
    start = post_form(
        client,
        "/accounts/new",
        {"address": address, "provider": "other", "client": str(oauth_client.id)},
        form_page=f"/accounts/new?address={address}",
    )
    assert start.status_code == 302, start.get_data(as_text=True)
    assert start.headers["Location"].startswith(peer.auth_url)
    back = op_sign_in(peer, start.headers["Location"], address)
    assert back.startswith(REDIRECT + "?")
    return client.get(path_and_query(back)), back
