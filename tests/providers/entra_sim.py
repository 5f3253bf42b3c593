"""Entra ID v2.0 simulator (a test double of login.microsoftonline.com).

Serves ``/{tenant}/oauth2/v2.0/token`` (authorization code with PKCE, refresh token, client
credentials, device code, password) with the bodies, field order, AADSTS errors and rules Entra
shows (see tests/providers/README.md for what is and is not faithful); the sign-in page and the
device code flow are in ``entra_pages``, the directory's types and the AADSTS table in
``entra_directory``. The Exchange and Graph simulators ask this one about tokens and mailboxes.

Everything a test controls is a method: ``add_app``, ``add_user``, ``situation(mailbox, ...)``,
``app_situation(client_id, ...)``, ``token_fault(...)``, ``requests.count(...)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import secrets
import threading
from collections import defaultdict, deque
from typing import Any

from tests.providers.common import (
    Clock,
    Faults,
    HttpsServer,
    Request,
    RequestLog,
    Response,
    Signer,
    TokenRequest,
    guid,
    malformed,
    utc_text,
)
from tests.providers.entra_directory import (
    AADSTS,
    APP_SITUATIONS,
    DEVICE_GRANT,
    EXCHANGE_RESOURCES,
    GRAPH,
    OIDC_SCOPES,
    PERMISSIONS,
    SUBERRORS,
    USER_SITUATIONS,
    App,
    DeviceFlow,
    EntraError,
    Grant,
    Tenant,
    User,
)
from tests.providers.entra_pages import EntraPages

__all__ = ["DEVICE_GRANT", "EXCHANGE_RESOURCES", "GRAPH", "App", "EntraSim", "Tenant", "User"]


class EntraSim(EntraPages):
    def __init__(self, cert_file: str, key_file: str, clock: Clock | None = None) -> None:
        self.lock = threading.RLock()
        self.clock = clock or Clock()
        self.signer = Signer()
        self.tenants: dict[str, Tenant] = {}
        self.apps: dict[str, App] = {}
        self.users: dict[str, User] = {}
        self.codes: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.opaque: dict[str, dict[str, Any]] = {}  # consumer access tokens -> claims
        self.devices: dict[str, DeviceFlow] = {}
        self.requests = RequestLog()
        self.faults = Faults()
        self.authorize_requests: list[dict[str, str]] = []
        self.loop_threshold = 20
        self.device_interval = 5
        self._recent: dict[tuple[str, ...], deque[float]] = defaultdict(deque)
        self.tenant = self.add_tenant("example.test")
        self.http = HttpsServer(self.handle, cert_file, key_file)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()

    # ----------------------------------------------------------------- directory (test API)
    def add_tenant(self, domain: str) -> Tenant:
        tenant = Tenant(guid(), domain)
        with self.lock:
            self.tenants[tenant.id] = tenant
        return tenant

    def add_app(
        self,
        name: str = "Auth-Email test app",
        public: bool = False,
        redirect_uris: list[str] | None = None,
        tenant: Tenant | None = None,
        **options: Any,
    ) -> App:
        app = App(
            client_id=guid(),
            name=name,
            tenant_id=(tenant or self.tenant).id,
            secret=None if public else secrets.token_urlsafe(30).replace("-", "~")[:40],
            redirect_uris=list(redirect_uris or []),
            **options,
        )
        with self.lock:
            self.apps[app.client_id] = app
        return app

    def add_user(
        self,
        email: str,
        password: str | None = None,
        tenant: Tenant | None = None,
        shared: bool = False,
        consumer: bool = False,
    ) -> User:
        local = email.split("@")[0]
        user = User(
            email=email,
            password=password or f"pw-{local}",
            tenant_id=(tenant or self.tenant).id,
            name=local.replace(".", " ").title(),
            shared=shared,
            consumer=consumer,
        )
        with self.lock:
            self.users[email.lower()] = user
        return user

    def user(self, email: str) -> User | None:
        with self.lock:
            return self.users.get(email.lower())

    def situation(self, mailbox: str, *names: str, clear: bool = False) -> None:
        """Make ``mailbox`` play ``names`` (see USER_SITUATIONS); ``clear`` removes them."""
        unknown = set(names) - USER_SITUATIONS
        assert not unknown, f"unknown situations {unknown}; one of {sorted(USER_SITUATIONS)}"
        user = self.user(mailbox)
        assert user, f"no such mailbox {mailbox}"
        with self.lock:
            if clear:
                user.situations -= set(names) if names else set(user.situations)
            else:
                user.situations |= set(names)
            if "password_changed" in names and not clear:
                user.tokens_valid_from = self.clock.now()

    def change_password(self, mailbox: str, password: str) -> None:
        user = self.user(mailbox)
        assert user
        with self.lock:
            user.password = password
            user.tokens_valid_from = self.clock.now()

    def app_situation(self, client_id: str, *names: str, clear: bool = False) -> None:
        unknown = set(names) - APP_SITUATIONS
        assert not unknown, f"unknown app situations {unknown}; one of {sorted(APP_SITUATIONS)}"
        with self.lock:
            app = self.apps[client_id]
            app.situations = app.situations - set(names) if clear else app.situations | set(names)

    def grant_full_access(self, mailbox: str, principal: str) -> None:
        """``Add-MailboxPermission -AccessRights FullAccess`` (principal: UPN or app id)."""
        user = self.user(mailbox)
        assert user
        with self.lock:
            user.full_access.add(principal.lower())

    def grant_send_as(self, mailbox: str, principal: str) -> None:
        """``Add-RecipientPermission -AccessRights SendAs``."""
        user = self.user(mailbox)
        assert user
        with self.lock:
            user.send_as.add(principal.lower())

    def token_fault(
        self, kind: str, client_id: str | None = None, times: int | None = None, **kw: Any
    ) -> None:
        """Make the token endpoint misbehave (see common.FAULTS) for one client or all."""
        self.faults.add(kind, client_id, times, **kw)

    def endpoint(self, tenant: str = "organizations", what: str = "token") -> str:
        return f"{self.url}/{tenant}/oauth2/v2.0/{what}"

    # ----------------------------------------------------------------- tokens (for Exchange/Graph)
    def validate(self, token: str) -> dict[str, Any] | None:
        """The claims of an access token this simulator issued (None if not ours or tampered)."""
        with self.lock:
            if token in self.opaque:
                return dict(self.opaque[token])
        return self.signer.decode(token)

    # ----------------------------------------------------------------- HTTP
    def handle(self, req: Request) -> Response:
        parts = req.path.strip("/").split("/")
        if req.path.rstrip("/") == "/devicelogin":
            return self.device_page(req)
        if len(parts) == 4 and parts[1:3] == ["oauth2", "v2.0"]:
            tenant, what = parts[0], parts[3]
            if what == "token" and req.method == "POST":
                return self.token(req, tenant)
            if what == "authorize":
                return self.authorize(req, tenant)
            if what == "devicecode" and req.method == "POST":
                return self.devicecode(req, tenant)
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            base = f"{self.url}/{parts[0]}/oauth2/v2.0"
            return Response.json(
                200,
                {
                    "token_endpoint": f"{base}/token",
                    "authorization_endpoint": f"{base}/authorize",
                    "device_authorization_endpoint": f"{base}/devicecode",
                    "issuer": f"https://login.microsoftonline.com/{parts[0]}/v2.0",
                },
            )
        return Response.json(404, {"error": "not_found"})

    def error(
        self, code: int, error: str | None = None, retry_after: int | None = None, **fmt: str
    ) -> Response:
        name, status, text = AADSTS[code]
        now = self.clock.now()
        trace, corr, stamp = guid(), guid(), utc_text(now)
        description = (
            f"AADSTS{code}: {text.format_map(defaultdict(str, fmt))}\r\n"
            f"Trace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {stamp}"
        )
        body: dict[str, Any] = {
            "error": error or name,
            "error_description": description,
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        }
        if code in SUBERRORS:
            body["suberror"] = SUBERRORS[code]
        if code == 50079:
            body["claims"] = (
                '{"access_token":{"capolids":{"essential":true,"values":["' + guid() + '"]}}}'
            )
        headers = {"Retry-After": str(retry_after)} if retry_after else {}
        return Response.json(status, body, **headers)

    def token(self, req: Request, tenant_name: str) -> Response:
        client_id = req.form.get("client_id") or (req.basic[0] if req.basic else "")
        grant_type = req.form.get("grant_type", "")
        record = TokenRequest(self.clock.now(), client_id, "", grant_type, 0)
        try:
            answer = self._token(req, tenant_name, client_id, grant_type, record)
        except EntraError as exc:
            answer = self.error(exc.code, exc.error, **exc.fmt)
        record.status = answer.status
        if answer.status != 200 and answer.body.startswith(b"{"):
            record.error = str(json.loads(answer.body).get("error", ""))
        self.requests.add(record)
        return answer

    def _token(
        self, req: Request, tenant_name: str, client_id: str, grant_type: str, record: TokenRequest
    ) -> Response:
        tenant = self.resolve_tenant(tenant_name)
        if not client_id:
            raise EntraError(900144, name="client_id")
        with self.lock:
            app = self.apps.get(client_id)
        if app is None or (
            tenant is not None and not app.multi_tenant and tenant.id != app.tenant_id
        ):
            raise EntraError(700016, app_id=client_id, tenant=tenant.id if tenant else tenant_name)
        fault = self.faults.take(client_id)
        if fault and fault.kind in ("hang", "html", "unavailable"):
            return malformed(fault, {}) or Response(500)
        if (fault and fault.kind == "throttled") or "throttled" in app.situations:
            if grant_type == "client_credentials":
                return Response(
                    429,
                    b"Too Many Requests",
                    "text/plain",
                    {"Retry-After": str(fault.retry_after if fault else 60)},
                )
            raise EntraError(50196)
        if tenant_name in ("common", "organizations", "consumers"):
            if grant_type == "client_credentials":
                raise EntraError(50059)
            if not app.multi_tenant and tenant_name != "consumers":
                raise EntraError(50194, app_id=app.client_id, app_name=app.name)
        self.authenticate_client(req, app)
        if self.looping(req, client_id, grant_type):
            raise EntraError(50196)
        if grant_type == "authorization_code":
            body = self.redeem_code(req, app, record)
        elif grant_type == "refresh_token":
            body = self.redeem_refresh(req, app, record)
        elif grant_type == "client_credentials":
            record.account = client_id
            body = self.client_credentials(req, app)
        elif grant_type == DEVICE_GRANT:
            body = self.redeem_device(req, app, record)
        elif grant_type == "password":
            body = self.password_grant(req, app, record)
        else:
            raise EntraError(70003, error="unsupported_grant_type", grant=grant_type)
        if fault:
            return malformed(fault, body) or Response.json(200, body)
        return Response.json(200, body)

    def resolve_tenant(self, name: str) -> Tenant | None:
        """The tenant of a URL segment (None for common/organizations/consumers); 90002 else."""
        if name in ("common", "organizations", "consumers"):
            return None
        with self.lock:
            for tenant in self.tenants.values():
                if name.lower() in (tenant.id, tenant.domain):
                    return tenant
        raise EntraError(90002, tenant=name)

    def authenticate_client(self, req: Request, app: App) -> None:
        secret = req.form.get("client_secret") or (req.basic[1] if req.basic else None)
        if app.secret is None:
            if secret or req.form.get("client_assertion"):
                raise EntraError(700025)
            if req.form.get("grant_type") == "client_credentials":
                raise EntraError(7000218)
            return
        if not secret:
            raise EntraError(7000218)
        if not secrets.compare_digest(secret, app.secret):
            raise EntraError(7000215, app_id=app.client_id)
        if "secret_expired" in app.situations:
            raise EntraError(7000222, app_id=app.client_id)

    def looping(self, req: Request, client_id: str, grant_type: str) -> bool:
        """Entra's loop detection: the same request more than ``loop_threshold`` times a minute
        (the real threshold is unpublished; 20 is an inference)."""
        if grant_type == "client_credentials":
            return False
        key = (
            client_id,
            grant_type,
            req.form.get("refresh_token", ""),
            req.form.get("username", ""),
            req.form.get("code", ""),
            req.form.get("scope", ""),
        )
        now = self.clock.now()
        with self.lock:
            seen = self._recent[key]
            while seen and seen[0] < now - 60:
                seen.popleft()
            seen.append(now)
            return len(seen) > self.loop_threshold

    # ----------------------------------------------------------------- scopes
    @staticmethod
    def parse_scope(text: str) -> tuple[set[str], list[tuple[str, str, str]]]:
        """(OIDC scopes, [(resource URI, kind, permission)]); unprefixed names are Graph's."""
        oidc: set[str] = set()
        resources: list[tuple[str, str, str]] = []
        for item in text.split():
            if item in OIDC_SCOPES:
                oidc.add(item)
                continue
            if "://" in item:
                uri, _, name = item.rstrip("/").rpartition("/")
                if item.endswith("/.default") or item.endswith("/"):
                    uri, name = (
                        item[: -len("/.default")]
                        if item.endswith("/.default")
                        else item.rstrip("/"),
                        ".default",
                    )
            else:
                uri, name = GRAPH, item
            if uri.rstrip("/") in EXCHANGE_RESOURCES:
                kind = "exchange"
            elif uri.rstrip("/") == GRAPH:
                kind = "graph"
            else:
                raise EntraError(500011, resource=uri, tenant="the directory")
            if name != ".default" and name not in PERMISSIONS[kind]:
                raise EntraError(70011, scope=item)
            resources.append((uri.rstrip("/"), kind, name))
        return oidc, resources

    def consented(self, user: User, app: App) -> set[tuple[str, str]]:
        return set(user.consents.get(app.client_id, set())) | app.admin_consented

    def issue(
        self, app: App, user: User, scope: str, grant: Grant | None, offline_ok: bool = True
    ) -> dict[str, Any]:
        """The success body of a user grant: access token for the first resource, rotated
        refresh token, id_token, in the order Entra sends them."""
        oidc, resources = self.parse_scope(scope)
        if "consent_revoked" in user.situations:
            raise EntraError(65001, app_id=app.client_id, app_name=app.name)
        consented = self.consented(user, app)
        for _uri, kind, name in resources:
            if name != ".default" and (kind, name) not in consented:
                raise EntraError(65001, app_id=app.client_id, app_name=app.name)
        if "mfa_required" in user.situations:
            raise EntraError(50076, app_id=app.client_id)
        if "mfa_enrollment" in user.situations:
            raise EntraError(50079, app_id=app.client_id)
        if "conditional_access" in user.situations:
            raise EntraError(53003)
        if "throttled" in user.situations:
            raise EntraError(50196)
        uri, kind = (resources[0][0], resources[0][1]) if resources else (GRAPH, "graph")
        names = sorted(n for (k, n) in consented - app.withheld if k == kind)
        now = int(self.clock.now())
        lifetime = app.token_lifetime or random.randint(3600, 5400)
        tenant = self.tenants[user.tenant_id]
        claims: dict[str, Any] = {
            "aud": uri,
            "iss": f"https://sts.windows.net/{tenant.id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "app_displayname": app.name,
            "appid": app.client_id,
            "appidacr": "0" if app.secret is None else "1",
            "idtyp": "user",
            "name": user.name,
            "oid": user.oid,
            "scp": " ".join(names),
            "tid": tenant.id,
            "unique_name": user.email,
            "upn": user.email,
            "ver": "1.0",
        }
        if user.consumer:
            access = "EwB" + secrets.token_urlsafe(90)
            with self.lock:
                self.opaque[access] = claims
        else:
            access = self.signer.encode(claims)
        granted = " ".join(n if kind == "graph" else f"{uri}/{n}" for n in names)
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": granted,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access,
        }
        if "offline_access" in oidc and offline_ok:
            prefix = "M.C5" if user.consumer else "0.A"
            refresh = prefix + secrets.token_urlsafe(200)
            original = grant.scope if grant else scope
            with self.lock:
                self.refresh_tokens[refresh] = Grant(
                    app.client_id,
                    user.email,
                    user.tenant_id,
                    original,
                    self.clock.now(),
                    last_used=self.clock.now(),
                )
            body["refresh_token"] = refresh
        if "openid" in oidc:
            id_claims: dict[str, Any] = {
                "aud": app.client_id,
                "iss": f"https://login.microsoftonline.com/{tenant.id}/v2.0",
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "name": user.name,
                "oid": user.oid,
                "preferred_username": user.email,
                "sub": base64.urlsafe_b64encode(
                    hashlib.sha256((user.oid + app.client_id).encode()).digest()
                ).decode()[:43],
                "tid": tenant.id,
                "ver": "2.0",
            }
            if "email" in oidc:
                id_claims["email"] = user.email
            if grant and grant.nonce:
                id_claims["nonce"] = grant.nonce
            body["id_token"] = self.signer.encode(id_claims)
        return body

    # ----------------------------------------------------------------- grants
    def redeem_code(self, req: Request, app: App, record: TokenRequest) -> dict[str, Any]:
        code = req.form.get("code", "")
        with self.lock:
            grant = self.codes.get(code)
        if grant is None:
            if code.startswith("0.A") and len(code) > 40:
                raise EntraError(70000, why="The code is not valid.")
            raise EntraError(9002313)
        record.account = grant.email
        if grant.client_id != app.client_id:
            raise EntraError(70000, why="The code was issued to another client.")
        if grant.used:
            raise EntraError(54005)
        if self.clock.now() - grant.issued_at > 600:
            raise EntraError(70008)
        if req.form.get("redirect_uri", "") != grant.redirect_uri:
            raise EntraError(50148)
        if grant.challenge:
            verifier = req.form.get("code_verifier", "")
            want = grant.challenge
            got = (
                verifier
                if grant.challenge_method == "plain"
                else base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            if not verifier or not secrets.compare_digest(got, want):
                raise EntraError(501481)
        with self.lock:
            grant.used = True
        user = self.user(grant.email)
        assert user
        return self.issue(app, user, req.form.get("scope") or grant.scope, grant)

    def redeem_refresh(self, req: Request, app: App, record: TokenRequest) -> dict[str, Any]:
        token = req.form.get("refresh_token", "")
        with self.lock:
            grant = self.refresh_tokens.get(token)
        if grant is None:
            raise EntraError(9002313)
        record.account = grant.email
        if grant.client_id != app.client_id:
            raise EntraError(70000, why="The refresh token was issued to another client.")
        user = self.user(grant.email)
        assert user
        now = self.clock.now()
        if grant.issued_at < user.tokens_valid_from:
            raise EntraError(
                50173,
                issued=utc_text(grant.issued_at, "%Y-%m-%dT%H:%M:%S.0000000Z"),
                valid_from=utc_text(user.tokens_valid_from, "%Y-%m-%dT%H:%M:%S.0000000Z"),
            )
        if app.spa and now - grant.issued_at > 86400:
            raise EntraError(700084, issued=utc_text(grant.issued_at, "%Y-%m-%dT%H:%M:%S.0000000Z"))
        if now - grant.last_used > 90 * 86400:
            raise EntraError(700082, issued=utc_text(grant.issued_at, "%Y-%m-%dT%H:%M:%S.0000000Z"))
        scope = req.form.get("scope") or grant.scope
        if "offline_access" not in scope.split():
            scope += " offline_access"  # a refresh always returns a new refresh token
        with self.lock:
            grant.last_used = now  # the old token keeps working (not revoked by rotation)
        return self.issue(app, user, scope, grant)

    def client_credentials(self, req: Request, app: App) -> dict[str, Any]:
        scope = req.form.get("scope", "")
        items = scope.split()
        if len(items) != 1 or not items[0].endswith("/.default"):
            raise EntraError(70011, scope=scope)
        _, resources = self.parse_scope(scope)
        uri, kind, _ = resources[0]
        tenant = self.tenants[app.tenant_id]
        now = int(self.clock.now())
        lifetime = app.token_lifetime or 3599
        claims = {
            "aud": uri,
            "iss": f"https://sts.windows.net/{tenant.id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "app_displayname": app.name,
            "appid": app.client_id,
            "appidacr": "1",
            "idtyp": "app",
            "oid": app.sp_oid,
            "roles": list(app.app_roles.get(kind, [])),
            "tid": tenant.id,
            "ver": "1.0",
        }
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self.signer.encode(claims),
        }

    def password_grant(self, req: Request, app: App, record: TokenRequest) -> dict[str, Any]:
        username = req.form.get("username", "")
        record.account = username
        user = self.user(username)
        if user is None or user.shared or user.password != req.form.get("password"):
            raise EntraError(50126)
        if user.consumer:
            raise EntraError(70002)
        return self.issue(app, user, req.form.get("scope", ""), None)
