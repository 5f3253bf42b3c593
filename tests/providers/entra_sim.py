"""Entra ID v2.0 simulator (a test double of login.microsoftonline.com).

Serves ``/{tenant}/oauth2/v2.0/authorize`` (a small sign-in form), ``/token`` (authorization
code with PKCE, refresh token, client credentials, device code, password) and ``/devicecode``,
with the bodies, field order, AADSTS errors and rules Entra shows (see tests/providers/README.md
for what is and is not faithful). The directory (tenants, apps, users, shared mailboxes and
their permissions) lives here too; the Exchange and Graph simulators ask it about tokens.

Everything a test controls is a method: ``add_app``, ``add_user``, ``situation(mailbox, ...)``,
``app_situation(client_id, ...)``, ``token_fault(...)``, ``requests.count(...)``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import random
import secrets
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

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
    page,
    utc_text,
)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
GRAPH = "https://graph.microsoft.com"
EXCHANGE_RESOURCES = (
    "https://outlook.office.com",
    "https://outlook.office365.com",
    "https://ps.outlook.com",
)
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
PERMISSIONS = {
    "exchange": {
        "IMAP.AccessAsUser.All",
        "POP.AccessAsUser.All",
        "SMTP.Send",
        "EWS.AccessAsUser.All",
    },
    "graph": {
        "Mail.Send",
        "Mail.Read",
        "Mail.ReadWrite",
        "User.Read",
        "IMAP.AccessAsUser.All",
        "POP.AccessAsUser.All",
        "SMTP.Send",
    },
}
APP_ROLES = {
    "exchange": ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"],
    "graph": ["Mail.Send"],
}
DEFAULT_DELEGATED = {
    ("exchange", "IMAP.AccessAsUser.All"),
    ("exchange", "POP.AccessAsUser.All"),
    ("exchange", "SMTP.Send"),
    ("graph", "Mail.Send"),
    ("graph", "User.Read"),
}

# AADSTS code -> (error, HTTP status, description). «» parts are filled with str.format.
AADSTS: dict[int, tuple[str, int, str]] = {
    70008: (
        "invalid_grant",
        400,
        (
            "The provided authorization code or refresh token has expired due to inactivity. Send "
            "a new interactive authorization request for this user and resource."
        ),
    ),
    700082: (
        "invalid_grant",
        400,
        (
            "The refresh token has expired due to inactivity. The token was issued on {issued} "
            "and was inactive for 90.00:00:00."
        ),
    ),
    700084: (
        "invalid_grant",
        400,
        (
            "The refresh token was issued to a single page app (SPA), and therefore has a fixed, "
            "limited lifetime of 1.00:00:00, which cannot be extended. It is now expired and a "
            "new sign in request must be sent by the SPA to the sign in page. The token was "
            "issued on {issued}."
        ),
    ),
    50173: (
        "invalid_grant",
        400,
        (
            "The provided grant has expired due to it being revoked, a fresh auth token is "
            "needed. The user might have changed or reset their password. The grant was issued on "
            "'{issued}' and the TokensValidFrom date (before which tokens are not valid) for this "
            "user is '{valid_from}'."
        ),
    ),
    50076: (
        "invalid_grant",
        400,
        (
            "Due to a configuration change made by your administrator, or because you moved to a "
            "new location, you must use multi-factor authentication to access '{app_id}'."
        ),
    ),
    50079: (
        "interaction_required",
        400,
        (
            "Due to a configuration change made by your administrator, or because you moved to a "
            "new location, you must enroll in multi-factor authentication to access '{app_id}'."
        ),
    ),
    53003: (
        "interaction_required",
        400,
        (
            "Access has been blocked by Conditional Access policies. The access policy does not "
            "allow token issuance."
        ),
    ),
    65001: (
        "invalid_grant",
        400,
        (
            "The user or administrator has not consented to use the application with ID "
            "'{app_id}' named '{app_name}'. Send an interactive authorization request for this "
            "user and resource."
        ),
    ),
    7000215: (
        "invalid_client",
        401,
        (
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret value, not the client secret ID, for a secret added to app '{app_id}'."
        ),
    ),
    7000222: (
        "invalid_client",
        401,
        (
            "The provided client secret keys for app '{app_id}' are expired. Visit the Azure "
            "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider "
            "using certificate credentials for added security: https://aka.ms/certCreds."
        ),
    ),
    7000218: (
        "invalid_client",
        401,
        (
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'."
        ),
    ),
    700025: (
        "invalid_client",
        400,
        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
    ),
    700016: (
        "unauthorized_client",
        400,
        (
            "Application with identifier '{app_id}' was not found in the directory '{tenant}'. "
            "This can happen if the application has not been installed by the administrator of "
            "the tenant or consented to by any user in the tenant. You may have sent your "
            "authentication request to the wrong tenant."
        ),
    ),
    50194: (
        "invalid_request",
        400,
        (
            "Application '{app_id}'({app_name}) is not configured as a multi-tenant application. "
            "Usage of the /common endpoint is not supported for such applications created after "
            "'10/15/2018'. Use a tenant-specific endpoint or configure the application to be "
            "multi-tenant."
        ),
    ),
    90002: (
        "invalid_tenant",
        400,
        (
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
            "are signing into the correct cloud. Check with your subscription administrator, this "
            "may happen if there are no active subscriptions for the tenant."
        ),
    ),
    50196: (
        "invalid_grant",
        400,
        (
            "The server terminated an operation because it encountered a client request loop. "
            "Please contact your app vendor."
        ),
    ),
    500011: (
        "invalid_resource",
        400,
        (
            "The resource principal named {resource} was not found in the tenant named {tenant}. "
            "This can happen if the application has not been installed by the administrator of "
            "the tenant or consented to by any user in the tenant. You might have sent your "
            "authentication request to the wrong tenant."
        ),
    ),
    70011: (
        "invalid_scope",
        400,
        (
            "The provided value for the input parameter 'scope' is not valid. The scope {scope} "
            "is not valid."
        ),
    ),
    9002313: ("invalid_grant", 400, "Invalid request. Request is malformed or invalid."),
    54005: (
        "invalid_grant",
        400,
        (
            "OAuth2 Authorization code was already redeemed, please retry with a new valid code "
            "or use an existing refresh token."
        ),
    ),
    70000: (
        "invalid_grant",
        400,
        "The provided value for the 'code' parameter is not valid. {why}",
    ),
    # Not listed in WIRE.md (inference, I): the codes Entra is known to use for these.
    50059: (
        "invalid_request",
        400,
        (
            "No tenant-identifying information found in either the request or implied by any "
            "provided credentials."
        ),
    ),
    50126: (
        "invalid_grant",
        400,
        "Error validating credentials due to invalid username or password.",
    ),
    501481: (
        "invalid_grant",
        400,
        (
            "The Code_Verifier does not match the code_challenge supplied in the authorization "
            "request."
        ),
    ),
    50148: (
        "invalid_grant",
        400,
        (
            "The redirect_uri specified in the token request does not match the redirect_uri of "
            "the authorization request."
        ),
    ),
    70016: (
        "authorization_pending",
        400,
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    ),
    70019: ("expired_token", 400, "Verification code expired."),
    70002: ("invalid_client", 400, "The client does not exist or is not enabled for consumers."),
    900144: (
        "invalid_request",
        400,
        "The request body must contain the following parameter: '{name}'.",
    ),
    70003: (
        "unsupported_grant_type",
        400,
        "The app requested an unsupported grant type '{grant}'.",
    ),
}
SUBERRORS = {50076: "basic_action", 65001: "consent_required", 53003: "message_only"}


class EntraError(Exception):
    def __init__(self, code: int, error: str | None = None, **fmt: str) -> None:
        super().__init__(code)
        self.code = code
        self.error = error
        self.fmt = fmt


@dataclass
class Tenant:
    id: str
    domain: str


@dataclass
class App:
    client_id: str
    name: str
    tenant_id: str
    secret: str | None  # None: a public client
    redirect_uris: list[str]
    multi_tenant: bool = False
    spa: bool = False
    # API permissions an admin consented to (tenant-wide): (resource kind, name)
    admin_consented: set[tuple[str, str]] = field(default_factory=lambda: set(DEFAULT_DELEGATED))
    # requested scopes never granted (an admin removed the permission): granted scope differs
    withheld: set[tuple[str, str]] = field(default_factory=set)
    # application permissions (Client Credentials), per resource kind
    app_roles: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in APP_ROLES.items()}
    )
    situations: set[str] = field(default_factory=set)
    token_lifetime: int | None = None  # fixed expires_in for tests; None: random 3600-5400
    sp_oid: str = field(default_factory=guid)


@dataclass
class User:
    """A user or mailbox of a tenant (shared mailboxes cannot sign in)."""

    email: str
    password: str
    tenant_id: str
    name: str
    oid: str = field(default_factory=guid)
    shared: bool = False
    consumer: bool = False  # an Outlook.com account: opaque EwB... tokens, M.C5 refresh tokens
    situations: set[str] = field(default_factory=set)
    full_access: set[str] = field(default_factory=set)  # principals (UPN or app id) who may open it
    send_as: set[str] = field(default_factory=set)  # principals who may send as it
    tokens_valid_from: float = 0.0
    consents: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # client_id -> scopes


@dataclass
class Grant:
    """What a code, device code or refresh token stands for."""

    client_id: str
    email: str
    tenant_id: str
    scope: str  # as originally requested
    issued_at: float
    redirect_uri: str = ""
    challenge: str = ""
    challenge_method: str = ""
    nonce: str = ""
    used: bool = False
    last_used: float = 0.0


@dataclass
class DeviceFlow:
    client_id: str
    tenant: str
    scope: str
    user_code: str
    expires_at: float
    email: str = ""
    state: str = "pending"  # pending | approved | declined | redeemed


# situations a mailbox can play (see README.md)
USER_SITUATIONS = {
    "smtp_auth_disabled",  # 535 5.7.139 ... for the Mailbox
    "smtp_auth_disabled_tenant",  # 535 5.7.139 ... for the Tenant
    "security_defaults",  # 535 5.7.139 ... security defaults policy
    "conditional_access",  # token endpoint 53003; SMTP 5.7.139 criteria
    "mfa_required",  # token endpoint 50076; SMTP 5.7.139 criteria
    "mfa_enrollment",  # token endpoint 50079 (interaction_required, with claims)
    "imap_disabled",  # IMAP: authenticated but not connected
    "pop_disabled",  # POP3: authentication failure
    "no_permission",  # the principal cannot open it: IMAP not connected, POP3 failure
    "consent_revoked",  # refresh: 65001
    "password_changed",  # refresh: 50173 (set with ``change_password``)
    "throttled",  # user flows: 50196
    "graph_throttled",  # Graph sendMail: 429
}
APP_SITUATIONS = {"secret_expired", "throttled"}


class EntraSim:
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
            import json

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

    # ----------------------------------------------------------------- device code
    def devicecode(self, req: Request, tenant_name: str) -> Response:
        try:
            self.resolve_tenant(tenant_name)
            client_id = req.form.get("client_id", "")
            if client_id not in self.apps:
                raise EntraError(700016, app_id=client_id, tenant=tenant_name)
            self.parse_scope(req.form.get("scope", ""))
        except EntraError as exc:
            return self.error(exc.code, exc.error, **exc.fmt)
        user_code = "".join(random.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        device_code = "DAQABAAEAAAD" + secrets.token_urlsafe(120)
        flow = DeviceFlow(
            client_id, tenant_name, req.form.get("scope", ""), user_code, self.clock.now() + 900
        )
        with self.lock:
            self.devices[device_code] = flow
        uri = f"{self.url}/devicelogin"
        return Response.json(
            200,
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": uri,
                "expires_in": 900,
                "interval": self.device_interval,
                "message": (
                    f"To sign in, use a web browser to open the page {uri} and enter the code "
                    f"{user_code} to authenticate."
                ),
            },
        )

    def approve_device(self, user_code: str, email: str, approve: bool = True) -> None:
        """What the user does on the device login page (``approve=False``: declines)."""
        with self.lock:
            for flow in self.devices.values():
                if flow.user_code == user_code:
                    flow.email = email
                    flow.state = "approved" if approve else "declined"
                    user = self.users[email.lower()]
                    _, resources = self.parse_scope(flow.scope)
                    user.consents.setdefault(flow.client_id, set()).update(
                        (k, n) for _, k, n in resources
                    )
                    return
        raise KeyError(user_code)

    def redeem_device(self, req: Request, app: App, record: TokenRequest) -> dict[str, Any]:
        with self.lock:
            flow = self.devices.get(req.form.get("device_code", ""))
        if flow is None or flow.client_id != app.client_id:
            raise EntraError(
                70000, error="bad_verification_code", why="The device code is not valid."
            )
        record.account = flow.email
        if self.clock.now() > flow.expires_at or flow.state == "redeemed":
            raise EntraError(70019)
        if flow.state == "pending":
            raise EntraError(70016)
        if flow.state == "declined":
            raise EntraError(
                70000, error="authorization_declined", why="The user declined the authorization."
            )
        flow.state = "redeemed"
        user = self.user(flow.email)
        assert user
        return self.issue(app, user, flow.scope, None)

    def device_page(self, req: Request) -> Response:
        if req.method == "POST":
            user = self.user(req.form.get("login", ""))
            if user is None or user.password != req.form.get("passwd"):
                return Response.html(
                    200,
                    page("Sign in", "<p class='error'>Your account or password is incorrect.</p>"),
                )
            try:
                self.approve_device(
                    req.form.get("otc", "").strip().upper(), user.email, "decline" not in req.form
                )
            except KeyError:
                return Response.html(
                    200, page("Enter code", "<p class='error'>That code didn't work.</p>")
                )
            return Response.html(200, page("You're signed in", "<p>You can close this window.</p>"))
        form = (
            "<form id='devicelogin' method='post' action='/devicelogin'>"
            "<input name='otc' placeholder='Code'><input name='login' placeholder='Email'>"
            "<input name='passwd' type='password'><button type='submit'>Next</button></form>"
        )
        return Response.html(200, page("Enter code", form))

    # ----------------------------------------------------------------- authorize
    def authorize(self, req: Request, tenant_name: str) -> Response:
        params = {**req.query, **req.form}
        if req.method == "GET":
            with self.lock:
                self.authorize_requests.append(dict(params))
        try:
            tenant = self.resolve_tenant(tenant_name)
            app = self.apps.get(params.get("client_id", ""))
            if app is None:
                raise EntraError(700016, app_id=params.get("client_id", ""), tenant=tenant_name)
            if tenant_name in ("common", "organizations") and not app.multi_tenant:
                raise EntraError(50194, app_id=app.client_id, app_name=app.name)
            if tenant is not None and not app.multi_tenant and tenant.id != app.tenant_id:
                raise EntraError(700016, app_id=app.client_id, tenant=tenant.id)
            if params.get("redirect_uri") not in app.redirect_uris:
                return Response.html(
                    400,
                    page(
                        "Sign in",
                        (
                            f"<p class='error'>AADSTS50011: The redirect URI "
                            f"'{html.escape(params.get('redirect_uri', ''))}' specified in the "
                            f"request does not match the redirect URIs configured for the "
                            f"application '{app.client_id}'.</p>"
                        ),
                    ),
                )
            self.parse_scope(params.get("scope", ""))
        except EntraError as exc:
            name, _, text = AADSTS[exc.code]
            message = text.format_map(defaultdict(str, exc.fmt))
            return Response.html(
                400,
                page("Sign in", f"<p class='error'>AADSTS{exc.code}: {html.escape(message)}</p>"),
            )
        redirect = params["redirect_uri"]
        if req.method == "POST":
            state = {"state": params["state"]} if params.get("state") else {}
            if "decline" in req.form:
                query = {
                    "error": "access_denied",
                    "error_description": "AADSTS65004: User declined to consent to access the app.",
                    **state,
                }
                return Response.redirect(f"{redirect}?{urlencode(query)}")
            user = self.user(req.form.get("login", ""))
            if user is None or user.shared or user.password != req.form.get("passwd"):
                return Response.html(
                    200,
                    self.sign_in_page(
                        tenant_name, params, "Your account or password is incorrect."
                    ),
                )
            with self.lock:
                _, resources = self.parse_scope(params.get("scope", ""))
                user.consents.setdefault(app.client_id, set()).update(
                    (k, n) for _, k, n in resources
                )
                user.situations.discard("consent_revoked")
                code = "0.A" + secrets.token_urlsafe(300)
                self.codes[code] = Grant(
                    app.client_id,
                    user.email,
                    user.tenant_id,
                    params.get("scope", ""),
                    self.clock.now(),
                    redirect_uri=redirect,
                    challenge=params.get("code_challenge", ""),
                    challenge_method=params.get("code_challenge_method", "plain"),
                    nonce=params.get("nonce", ""),
                )
            query = {"code": code, **state, "session_state": guid()}
            return Response.redirect(f"{redirect}?{urlencode(query)}")
        return Response.html(200, self.sign_in_page(tenant_name, params, ""))

    def sign_in_page(self, tenant_name: str, params: dict[str, str], error: str) -> str:
        hidden = "".join(
            f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>"
            for k, v in params.items()
            if k not in ("login", "passwd", "decline", "accept")
        )
        hint = html.escape(params.get("login_hint", ""))
        err = f"<p class='error'>{html.escape(error)}</p>" if error else ""
        return page(
            "Sign in",
            f"{err}<form id='signin' method='post' "
            f"action='/{html.escape(tenant_name)}/oauth2/v2.0/authorize'>"
            f"{hidden}<input name='login' type='email' value='{hint}' "
            "placeholder='Email, phone, or Skype'>"
            "<input name='passwd' type='password' placeholder='Password'>"
            "<button type='submit' name='accept' value='1'>Sign in</button>"
            "<button type='submit' name='decline' value='1'>Cancel</button></form>",
        )
