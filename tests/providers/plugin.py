"""Pytest fixtures that start the provider simulators (``pytest_plugins`` in tests/conftest.py).

``provider_sims`` (session) starts them once, in this process: HTTPS servers in threads and the
mail front ends on one asyncio loop, all on 127.0.0.1 with free ports and the test bed's
server certificate (signed by its throwaway CA, ``ca_file``), so clients keep verifying TLS.
``sims`` (per test) is the same object, with faults and clock moves undone after the test.
"""

from __future__ import annotations

import re
import secrets
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

from tests.peerbed import pkce_pair
from tests.providers.entra_sim import App, EntraSim, User
from tests.providers.exchange_sim import ExchangeSim
from tests.providers.google_sim import Account, GoogleApp, GoogleSim
from tests.providers.graph_sim import GraphSim
from tests.providers.mailfront import Loop
from tests.providers.mailstore import DovecotStore

EXCHANGE_SCOPE = (
    "https://outlook.office.com/IMAP.AccessAsUser.All "
    "https://outlook.office.com/POP.AccessAsUser.All "
    "https://outlook.office.com/SMTP.Send offline_access"
)
REDIRECT = "http://127.0.0.1:8080/authorize"


class ProviderSims:
    """The running simulators and helpers to sign in at them the way a browser would."""

    def __init__(self, peers: Any) -> None:
        self.peers = peers
        self.host = "127.0.0.1"
        self.ca_file: str = peers.ca_file
        cert, key = peers.server_cert_file, peers.server_key_file
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.loop = Loop()
        self.store = DovecotStore(peers)
        self.entra = EntraSim(cert, key)
        self.exchange = ExchangeSim(self.entra, self.store, self.loop, self.tls)
        self.graph = GraphSim(self.entra, self.store, cert, key)
        self.google = GoogleSim(self.store, self.loop, self.tls, cert, key)

    def close(self) -> None:
        for part in (self.google, self.graph, self.exchange, self.entra):
            part.close()
        self.loop.close()

    def reset(self) -> None:
        """Undo what one test may have changed globally (faults, clocks)."""
        self.entra.faults.clear()
        self.google.faults.clear()
        self.graph.faults.clear()
        self.entra.clock.offset = 0
        self.google.clock.offset = 0
        self.entra.loop_threshold = 20
        self.exchange.basic_auth_disabled = False

    def provider_hosts(self) -> dict[str, str]:
        """PROVIDER_HOSTS moving the shipped Microsoft and Google hosts to the simulators."""
        here = self.host
        exchange, google = self.exchange, self.google
        return {
            "login.microsoftonline.com": f"{here}:{urlsplit(self.entra.url).port}",
            "accounts.google.com": f"{here}:{urlsplit(self.google.url).port}",
            "oauth2.googleapis.com": f"{here}:{urlsplit(self.google.url).port}",
            "outlook.office365.com:993": f"{here}:{exchange.imap.port}",
            "outlook.office365.com:995": f"{here}:{exchange.pop3.port}",
            "smtp.office365.com": f"{here}:{exchange.smtp.port}",
            "smtp-mail.outlook.com": f"{here}:{exchange.smtp.port}",
            "imap.gmail.com": f"{here}:{google.imap.port}",
            "pop.gmail.com": f"{here}:{google.pop3.port}",
            "smtp.gmail.com": f"{here}:{google.smtp.port}",
        }

    def product_settings(self) -> dict[str, Any]:
        """The product's settings that reach the simulators (and trust their certificate)."""
        return {
            "PROVIDER_HOSTS": self.provider_hosts(),
            "GRAPH_URL": self.graph.url,
            "UPSTREAM_CA_FILE": self.ca_file,
        }

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    # ----------------------------------------------------------------- Entra
    def entra_user(self, prefix: str = "user", seed: int = 1, **kw: Any) -> User:
        """A new Entra user whose mailbox exists at Dovecot (``seed`` messages in INBOX)."""
        address = f"{prefix}-{secrets.token_hex(4)}@example.test"
        if seed:
            self.peers.seed(address, seed)
        return self.entra.add_user(address, **kw)

    def entra_sign_in(
        self, url: str, email: str, password: str | None = None, decline: bool = False
    ) -> str:
        """Submit the Entra sign-in form at ``url``; returns the redirect back to the client."""
        session = requests.Session()
        first = session.get(url, verify=self.ca_file, timeout=10)
        assert first.status_code == 200, first.text
        fields = dict(
            re.findall(r"<input type='hidden' name='([^']*)' value='([^']*)'>", first.text)
        )
        fields = {k: _unescape(v) for k, v in fields.items()}
        user = self.entra.user(email)
        fields.update({"login": email, "passwd": password or (user.password if user else "")})
        if decline:
            fields["decline"] = "1"
        action = re.search(r"action='([^']+)'", first.text)
        assert action
        answer = session.post(
            urljoin(url, action.group(1)),
            data=fields,
            verify=self.ca_file,
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 302, answer.text[:500]
        return str(answer.headers["Location"])

    def entra_authorize_url(
        self, app: App, scope: str = EXCHANGE_SCOPE, tenant: str | None = None, **extra: str
    ) -> tuple[str, str]:
        """(authorize URL with PKCE, code_verifier)."""
        verifier, challenge = pkce_pair()
        query = {
            "client_id": app.client_id,
            "response_type": "code",
            "redirect_uri": app.redirect_uris[0],
            "scope": scope,
            "state": secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        from urllib.parse import urlencode

        tenant = tenant or self.entra.tenants[app.tenant_id].id
        return f"{self.entra.endpoint(tenant, 'authorize')}?{urlencode(query)}", verifier

    def entra_code(self, app: App, user: User, scope: str = EXCHANGE_SCOPE) -> tuple[str, str]:
        """Sign ``user`` in for ``app``; returns (code, verifier)."""
        url, verifier = self.entra_authorize_url(app, scope)
        back = self.entra_sign_in(url, user.email)
        return parse_qs(urlsplit(back).query)["code"][0], verifier

    def entra_token(
        self, app: App, data: dict[str, str], tenant: str | None = None, secret: str | None = None
    ) -> requests.Response:
        """POST to the Entra token endpoint (client_secret_post when the app has a secret)."""
        form = {"client_id": app.client_id, **data}
        if secret is None and app.secret:
            secret = app.secret
        if secret:
            form["client_secret"] = secret
        tenant = tenant or self.entra.tenants[app.tenant_id].id
        return requests.post(
            self.entra.endpoint(tenant), data=form, verify=self.ca_file, timeout=30
        )

    def entra_tokens(self, app: App, user: User, scope: str = EXCHANGE_SCOPE) -> dict[str, Any]:
        """A full Authorization Code + PKCE flow; the token endpoint's JSON."""
        code, verifier = self.entra_code(app, user, scope)
        answer = self.entra_token(
            app,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": app.redirect_uris[0],
                "code_verifier": verifier,
                "scope": scope,
            },
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    # ----------------------------------------------------------------- Google
    def google_account(self, prefix: str = "g", seed: int = 1) -> Account:
        address = f"{prefix}-{secrets.token_hex(4)}@example.net"
        if seed:
            self.peers.seed(address, seed)
        return self.google.add_account(address)

    def google_tokens(
        self,
        app: GoogleApp,
        account: Account,
        scope: str = "https://mail.google.com/",
        **extra: str,
    ) -> dict[str, Any]:
        from urllib.parse import urlencode

        verifier, challenge = pkce_pair()
        query = {
            "client_id": app.client_id,
            "redirect_uri": app.redirect_uris[0],
            "response_type": "code",
            "scope": scope,
            "access_type": "offline",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        url = f"{self.google.url}/o/oauth2/v2/auth?{urlencode(query)}"
        back = self.google_sign_in(url, account)
        code = parse_qs(urlsplit(back).query)["code"][0]
        answer = requests.post(
            f"{self.google.url}/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": app.redirect_uris[0],
                "code_verifier": verifier,
                "client_id": app.client_id,
                "client_secret": app.secret,
            },
            verify=self.ca_file,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def google_sign_in(self, url: str, account: Account) -> str:
        """Submit the Google sign-in form at ``url``; returns the redirect back to the client."""
        session = requests.Session()
        first = session.get(url, verify=self.ca_file, timeout=10)
        assert first.status_code == 200, first.text
        fields = {
            k: _unescape(v)
            for k, v in re.findall(
                r"<input type='hidden' name='([^']*)' value='([^']*)'>", first.text
            )
        }
        fields.update({"identifier": account.email, "Passwd": account.password})
        back = session.post(
            f"{self.google.url}/o/oauth2/v2/auth",
            data=fields,
            verify=self.ca_file,
            allow_redirects=False,
            timeout=10,
        )
        assert back.status_code == 302, back.text
        return str(back.headers["Location"])


@pytest.fixture
def sim_settings(sims: ProviderSims) -> Iterator[dict[str, Any]]:
    """Settings that point the product's Microsoft 365, Outlook.com and Google presets and
    Microsoft Graph at the simulators (``make_app(instance, **sim_settings)``): the supported
    ``PROVIDER_HOSTS`` and ``GRAPH_URL``, as an operator would set them for another cloud.
    The presets are set back to the shipped hosts afterwards, for tests that build no app."""
    from oauth import providers

    yield sims.product_settings()
    providers.configure({})


def _unescape(value: str) -> str:
    import html

    return html.unescape(value)


@pytest.fixture(scope="session")
def provider_sims(peers: Any) -> Iterator[ProviderSims]:
    sims = ProviderSims(peers)
    try:
        yield sims
    finally:
        sims.close()


@pytest.fixture
def sims(provider_sims: ProviderSims) -> Iterator[ProviderSims]:
    """The simulators for one test; faults and clock moves are undone afterwards."""
    yield provider_sims
    provider_sims.reset()
