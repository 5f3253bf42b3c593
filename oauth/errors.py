"""Errors of the OAuth layer and their words for people, in one place.

The token errors (what a token request ended in, classified by the provider's error code) and
the explanation catalogue (each provider error as a title, a cause and a fix) live together, so
classifying a refusal and wording it is one module: ``grants`` raises these, ``tokens`` and
``authorize`` word them, and callers catch them here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from errors import PersonError

# ---------------------------------------------------------------------------------- token errors


class TokenError(PersonError):
    """A token could not be had; ``message`` says why in words a person can act on.

    ``retry_after``: seconds the provider asked us to wait (its ``Retry-After``), if it did.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NeedsReauthorization(TokenError):
    """The grant is gone (revoked, expired, password changed): the user must authorize again."""


class TokenUnavailable(TokenError):
    """A temporary failure (timeout, 5xx, another refresh that failed): try again later.

    ``unreached``: the request never reached the server (connection refused, DNS), so asking
    again at once is harmless; any answer (even a 503) waits for the back-off instead.
    """

    unreached = False


class AccountUnusable(TokenError):
    """The account is disabled, not linked yet, or gone."""


class ClientRefused(TokenUnavailable):
    """The provider refuses the OAuth client itself (wrong or expired secret, grant or scope not
    allowed): re-authorizing cannot help; the client's settings must be fixed. A subclass of
    ``TokenUnavailable`` so that the mail proxy answers with a temporary error carrying it."""

    def __init__(
        self,
        message: str,
        error: str = "",
        description: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after)
        self.error = error
        self.description = description


class GrantError(TokenError):
    """The token endpoint refused a grant; ``error`` and ``description`` are the provider's."""

    def __init__(self, error: str, description: str = "", retry_after: float | None = None) -> None:
        self.error = error or "unknown_error"
        self.description = description or ""
        said = f"{self.error}: {self.description}" if description else self.error
        super().__init__(said, retry_after)

    @property
    def grant_gone(self) -> bool:
        """The grant itself is refused: only a new authorization by the user helps."""
        return self.error in GRANT_GONE

    @property
    def client_refused(self) -> bool:
        """The client (its secret or settings) is refused: re-authorizing cannot help."""
        return self.error in CLIENT_REFUSED


# The provider's error codes (RFC 6749 section 5.2, OpenID Connect, RFC 8628) by what helps.
GRANT_GONE = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required"}
)
CLIENT_REFUSED = frozenset(
    {"invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"}
)
TEMPORARY = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


# ---------------------------------------------------------------------------------- explanations


@dataclass(frozen=True)
class Explanation:
    """What went wrong, why, and what to do about it."""

    title: str
    cause: str
    fix: str
    code: str = ""
    detail: str = ""  # the provider's own words


class AuthorizationProblem(PersonError):
    """An authorization that cannot go on; carries the explanation shown to the user."""

    def __init__(self, explanation: Explanation, status: int = 400) -> None:
        super().__init__(explanation.title)
        self.explanation = explanation
        self.status = status


_AADSTS = re.compile(r"AADSTS(\d+)")


def error_key(error: str, description: str = "") -> str:
    """The most specific key the catalogue may know: an AADSTS code, a recognised Google
    message, or the OAuth ``error`` itself."""
    error = (error or "").strip()
    found = _AADSTS.search(description or "") or _AADSTS.search(error)
    if found:
        return f"AADSTS{found.group(1)}"
    if error == "invalid_grant" and "expired or revoked" in (description or "").lower():
        return "google_expired_or_revoked"
    return error


def is_throttling(error: str, description: str = "") -> bool:
    """A refusal that only says "not now" (Entra's client-request-loop, AADSTS50196), whatever
    its ``error`` (``invalid_grant``): waiting helps, re-authorizing does not."""
    return error_key(error, description) == "AADSTS50196"


def explain(error: str, description: str = "", redirect: str = "") -> Explanation:
    """The provider's error (``error`` and its description) as a cause and a fix."""
    error = (error or "").strip()
    description = (description or "").strip()[:1000]
    key = error_key(error, description)
    title, cause, fix = _MESSAGES.get(key) or _MESSAGES.get(error) or _UNKNOWN
    fix = fix.replace("{redirect_uri}", redirect or "<public URL>/authorize")
    return Explanation(title, cause, fix, code=key or "unknown", detail=description)


def known_explanation(error: str, description: str = "") -> Explanation | None:
    """``explain``'s text when it knows the provider's specific (AADSTS) code, else None."""
    key = error_key(error, description)
    if key == (error or "").strip() or key not in _MESSAGES:
        return None
    return explain(error, description)


_UNKNOWN = (
    "The provider refused the authorization",
    "The provider gave an error this page does not know.",
    "Read the provider's message below, check the client's settings, and try again; "
    "if it happens again, ask your administrator.",
)

_MESSAGES: dict[str, tuple[str, str, str]] = {
    "access_denied": (
        "The authorization was declined",
        "You (or a policy of your organization) declined the access this app asked for.",
        "Start again and accept on the provider's consent page. If your organization does "
        "not let users consent to apps, an administrator must grant consent first.",
    ),
    "AADSTS50011": (
        "The redirect URI is not registered for this app",
        "The app registration does not list this server's redirect URI.",
        "In the Entra admin center, open App registrations → the app → Authentication, add "
        "a Web platform redirect URI of exactly {redirect_uri} and save; then try again.",
    ),
    "AADSTS7000215": (
        "The client secret is wrong",
        "The provider did not accept the client secret. Usually the secret's ID was entered "
        "instead of its Value.",
        "In App registrations → the app → Certificates & secrets, copy the secret's Value "
        "(shown only right after creating it; create a new one if needed) into the client's "
        "settings here.",
    ),
    "AADSTS7000222": (
        "The client secret has expired",
        "The app registration's client secret is past its expiry date.",
        "Create a new client secret under Certificates & secrets and enter its Value in the "
        "client's settings here.",
    ),
    "AADSTS65001": (
        "Consent for this app is missing",
        "Nobody has consented to the permissions this app asks for in your organization.",
        "Ask an administrator to open the app's API permissions and choose \u201cGrant "
        "admin consent\u201d, then try again.",
    ),
    "AADSTS700016": (
        "The app is not known in this directory",
        "No application with this client ID exists in the tenant you signed in to.",
        "Check the client ID and tenant in the client's settings; an app from another "
        "organization must be multi-tenant and consented to in yours.",
    ),
    "AADSTS50194": (
        "This single-tenant app cannot use the common endpoint",
        "The app is registered for one organization only, but was used with 'common'.",
        "Enter the Directory (tenant) ID in the client's settings, or make the app "
        "multi-tenant in its registration.",
    ),
    "AADSTS50076": (
        "Multi-factor authentication is required",
        "Your organization requires MFA, which the password grant cannot do.",
        "Use Authorization Code or Device Code instead.",
    ),
    "AADSTS70008": (
        "The authorization has expired",
        "The refresh token (or code) expired because it was not used for a long time.",
        "Authorize the mailbox again. Auth-Email renews idle mailboxes regularly, so this "
        "should not come back while the service runs.",
    ),
    "AADSTS700082": (
        "The authorization expired from inactivity",
        "The refresh token was not used for 90 days, so Microsoft no longer accepts it.",
        "Authorize the mailbox again. Auth-Email renews idle mailboxes regularly, so this "
        "should not come back while the service runs.",
    ),
    "AADSTS700084": (
        "The authorization of a single-page app expired",
        "The app registration lists this redirect URI as a Single-page application, whose "
        "refresh tokens last only 24 hours.",
        "In App registrations → the app → Authentication, register {redirect_uri} under the "
        "Web platform (not Single-page application), then authorize again.",
    ),
    "AADSTS50173": (
        "The authorization was revoked",
        "The grant was revoked, usually because the password was changed or reset, or an "
        "administrator revoked the user's sessions.",
        "Authorize the mailbox again.",
    ),
    "AADSTS50079": (
        "Multi-factor authentication must be set up first",
        "Your organization requires you to enroll in multi-factor authentication.",
        "Sign in once at https://aka.ms/mfasetup to enroll, then authorize the mailbox again "
        "(with Authorization Code or Device Code, which can do MFA).",
    ),
    "AADSTS53003": (
        "Blocked by a Conditional Access policy",
        "A Conditional Access policy of your organization does not allow this sign-in (for "
        "example from this location, device or app).",
        "Ask your administrator to allow this app in the Conditional Access policies, then "
        "authorize again.",
    ),
    "AADSTS7000218": (
        "This app needs a client secret",
        "The app registration is a confidential client: Microsoft expects a client secret, "
        "and this client was saved without one.",
        "Either enter the secret's Value in the client's settings, or in App registrations → "
        "the app → Authentication set “Allow public client flows” to Yes (for Device "
        "Code or the password grant without a secret).",
    ),
    "AADSTS700025": (
        "This app is a public client: remove the secret",
        "The app registration is a public client (“Allow public client flows”), "
        "and Microsoft refuses a client secret from a public client.",
        "Clear the client secret in the client's settings (leave it empty), or turn public "
        "client flows off in the app registration if it should be confidential.",
    ),
    "AADSTS90002": (
        "The tenant was not found",
        "The Directory (tenant) ID or domain in the client's settings does not name an "
        "existing tenant (or it is in another cloud, such as US Government).",
        "Copy the Directory (tenant) ID from the app registration's Overview page into the "
        "client's settings, and check that the provider (cloud) is the right one.",
    ),
    "AADSTS50196": (
        "The provider is throttling this app",
        "Microsoft saw the same request too often (a client request loop) and refuses it for "
        "a while.",
        "Nothing to change: Auth-Email waits before it asks again. If it keeps happening, "
        "tell your administrator.",
    ),
    "AADSTS500011": (
        "The mail service is not available in this tenant",
        "The resource in the scope (Office 365 Exchange Online) was not found in the tenant: "
        "the tenant has no Exchange Online, or the scope names the wrong resource.",
        "Check the client's scope (https://outlook.office.com/… for delegated access, "
        "https://outlook.office365.com/.default for Client Credentials) and that the tenant "
        "has Exchange Online licences.",
    ),
    "AADSTS70011": (
        "The requested permissions are not valid",
        "Microsoft does not accept a scope the client asks for (misspelt, or mixing "
        "resources or .default with other scopes).",
        "Use the provider's default scope in the client's settings, or check each scope's "
        "spelling.",
    ),
    "AADSTS9002313": (
        "The request was malformed",
        "Microsoft could not read the code or refresh token (it was damaged or cut short).",
        "Authorize the mailbox again.",
    ),
    "AADSTS54005": (
        "This authorization code was already used",
        "The code from the sign-in can be redeemed only once.",
        "Start the authorization again.",
    ),
    "AADSTS70000": (
        "The authorization is not valid",
        "The code or grant expired, or was issued for another app or scope.",
        "Start the authorization again.",
    ),
    "AADSTS70016": (
        "The sign-in is not finished yet",
        "The device code is waiting for you to sign in at the verification page.",
        "Finish signing in at the page shown, then wait for this page to continue.",
    ),
    "google_expired_or_revoked": (
        "Google no longer accepts this authorization",
        "Google ended the refresh token: it was revoked, unused for six months, ended by a "
        "password change, or, for an app whose OAuth consent screen is in Testing status, "
        "it expired after 7 days.",
        "Authorize the mailbox again. If it stops again after a week, publish the app: in the "
        "Google Cloud console, OAuth consent screen → Publishing status → Publish app.",
    ),
    "deleted_client": (
        "The OAuth client was deleted at the provider",
        "The client ID no longer exists in the Google Cloud project.",
        "Create a new OAuth client in the Google Cloud console and enter its ID and secret in "
        "the client's settings.",
    ),
    "invalid_client": (
        "The client ID or secret was not accepted",
        "The provider does not recognise this client, or its secret is wrong or expired.",
        "Check the client ID and secret (the secret's Value) in the client's settings.",
    ),
    "unauthorized_client": (
        "This client may not use this kind of authorization",
        "The app registration does not allow the requested grant or platform.",
        "Enable the grant in the app registration, or choose a client that has it.",
    ),
    "invalid_scope": (
        "The requested permissions are not valid",
        "The provider does not know or allow the scopes the client asks for.",
        "Check the client's scope setting against the provider's documentation.",
    ),
    "invalid_grant": (
        "The authorization is no longer valid",
        "The provider refused the code or token: it expired, was already used, or the grant "
        "was revoked (for example after a password change).",
        "Start the authorization again.",
    ),
    "invalid_request": (
        "The provider rejected the request",
        "The provider found the authorization request malformed.",
        "Check the client's settings (URLs and scope) and try again.",
    ),
    "server_error": (
        "The provider had a problem",
        "The provider failed while handling the authorization.",
        "Wait a moment and try again.",
    ),
    "temporarily_unavailable": (
        "The provider is busy",
        "The provider is temporarily unable to handle the authorization.",
        "Wait a moment and try again.",
    ),
    "expired_token": (
        "The code expired",
        "The device code expired before the sign-in was finished.",
        "Start again and finish signing in within the time shown.",
    ),
    "no_refresh_token": (
        "The provider gave no refresh token",
        "Without a refresh token the mailbox would stop working within the hour.",
        "Make sure the client's scope asks for offline access (offline_access for Microsoft; "
        "Google clients need access_type=offline and consent), then try again.",
    ),
}

CLIENT_CREDENTIALS_HELP = (
    "For Exchange Online, an app using Client Credentials needs: the Office 365 Exchange Online "
    "application permissions IMAP.AccessAsApp / POP.AccessAsApp (and SMTP.SendAsApp) with admin "
    "consent; its service principal registered in Exchange Online (New-ServicePrincipal -AppId "
    "<client ID> -ObjectId <enterprise app object ID>); and rights on the mailbox "
    "(Add-MailboxPermission -Identity <mailbox> -User <service principal ID> -AccessRights "
    "FullAccess)."
)


def unreachable(message: str) -> Explanation:
    """A token endpoint that failed temporarily (``message`` says how)."""
    return Explanation(
        "The provider could not be reached",
        message,
        "Try again in a moment; if it persists, check the client's URLs.",
        code="unavailable",
    )


def password_refused(description: str) -> Explanation:
    return Explanation(
        "The user name or password was refused",
        "The provider did not accept this user name and password for the legacy password "
        "grant. It also refuses every account that needs multi-factor authentication, which "
        "this grant cannot do.",
        "Check the password and try again, or link the mailbox with a client that uses "
        "Authorization Code or Device Code.",
        code="invalid_grant",
        detail=description,
    )


def with_cc_help(explanation: Explanation) -> Explanation:
    return Explanation(
        explanation.title,
        explanation.cause,
        f"{explanation.fix} {CLIENT_CREDENTIALS_HELP}",
        explanation.code,
        explanation.detail,
    )
