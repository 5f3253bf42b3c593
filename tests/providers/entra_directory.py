"""The Entra simulator's directory and vocabulary: resources and permissions, the AADSTS
errors (code, ``error``, HTTP status, words), tenants, apps, users and mailboxes, grants, and
the situations a mailbox or an app can be told to play.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.providers.common import guid

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
