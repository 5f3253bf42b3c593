"""Google OAuth + Gmail simulator (a test double of accounts.google.com, oauth2.googleapis.com
and imap/pop/smtp.gmail.com).

Token endpoint as WIRE.md F1 has it: refresh tokens are not rotated, at most 100 per account
and client (the 101st silently invalidates the oldest), 7 days in Testing mode, ``invalid_grant``
"Token has been expired or revoked." for all of those and for revocation or a password change,
``invalid_client`` / ``deleted_client`` with 401. It also decides Gmail logins (token, scope,
user, situations, the 16th simultaneous IMAP session) for the front ends in ``gmail_sim``,
behind which is the test bed's Dovecot (``mailstore``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import ssl
import threading
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
    TokenRequest,
    malformed,
    page,
)
from tests.providers.gmail_sim import MAIL_SCOPE, GmailImap, GmailPop3, GmailSmtp
from tests.providers.mailfront import ConnectionCounter, Loop, MailServer, Verdict
from tests.providers.mailstore import DovecotStore

IMAP_LIMIT = 15  # the 16th simultaneous connection is refused
TESTING_LIFETIME = 7 * 86400
REFRESH_CAP = 100
SITUATIONS = {"imap_disabled", "pop_disabled", "revoked", "password_changed"}


@dataclass
class GoogleApp:
    client_id: str
    secret: str
    redirect_uris: list[str]
    testing: bool = False  # External user type in Testing status: refresh tokens live 7 days
    deleted: bool = False
    token_lifetime: int = 3599


@dataclass
class Account:
    email: str
    password: str
    name: str
    situations: set[str] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)  # "Send mail as" addresses
    consented: set[str] = field(default_factory=set)  # client ids that were granted offline access


@dataclass
class RefreshGrant:
    client_id: str
    email: str
    scope: str
    issued_at: float
    valid: bool = True


class GoogleSim:
    def __init__(
        self, store: DovecotStore, loop: Loop, tls: ssl.SSLContext, cert_file: str, key_file: str
    ) -> None:
        self.lock = threading.RLock()
        self.clock = Clock()
        self.store = store
        self.apps: dict[str, GoogleApp] = {}
        self.accounts: dict[str, Account] = {}
        self.codes: dict[str, tuple[str, str, str, str, str, bool]] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        self.access_tokens: dict[str, tuple[str, str, float]] = {}  # token -> (email, scope, exp)
        self.requests = RequestLog()
        self.faults = Faults()
        self.authorize_requests: list[dict[str, str]] = []
        self.connections = ConnectionCounter()
        self.sent: list[tuple[str, str, list[str]]] = []
        self.http = HttpsServer(self.handle, cert_file, key_file)
        self.url = self.http.url
        self.imap = MailServer(loop, GmailImap, self, tls, implicit_tls=True)
        self.pop3 = MailServer(loop, GmailPop3, self, tls, implicit_tls=True)
        self.smtp = MailServer(loop, GmailSmtp, self, tls, implicit_tls=True)  # 465
        self.submission = MailServer(loop, GmailSmtp, self, tls, implicit_tls=False)  # 587

    def close(self) -> None:
        self.http.close()
        for server in (self.imap, self.pop3, self.smtp, self.submission):
            server.close()

    # ----------------------------------------------------------------- test API
    def add_app(self, redirect_uris: list[str] | None = None, testing: bool = False) -> GoogleApp:
        app = GoogleApp(
            client_id=f"{secrets.randbelow(10**12):012d}-{secrets.token_hex(16)}.apps.googleusercontent.com",
            secret="GOCSPX-" + secrets.token_urlsafe(21),
            redirect_uris=list(redirect_uris or []),
            testing=testing,
        )
        with self.lock:
            self.apps[app.client_id] = app
        return app

    def add_account(self, email: str, password: str | None = None) -> Account:
        local = email.split("@")[0]
        account = Account(email.lower(), password or f"pw-{local}", local.title())
        with self.lock:
            self.accounts[account.email] = account
        return account

    def account(self, email: str) -> Account | None:
        with self.lock:
            return self.accounts.get(email.lower())

    def situation(self, email: str, *names: str, clear: bool = False) -> None:
        """``imap_disabled``, ``pop_disabled``; ``revoked`` and ``password_changed`` end every
        refresh token of the account (Gmail scopes are revoked by a password change)."""
        assert set(names) <= SITUATIONS, f"one of {sorted(SITUATIONS)}"
        account = self.account(email)
        assert account
        with self.lock:
            account.situations = (
                account.situations - set(names) if clear else account.situations | set(names)
            )
            if not clear and {"revoked", "password_changed"} & set(names):
                for grant in self.refresh_tokens.values():
                    if grant.email == account.email:
                        grant.valid = False
                account.consented.clear()

    def delete_app(self, client_id: str) -> None:
        with self.lock:
            self.apps[client_id].deleted = True

    def token_fault(
        self, kind: str, client_id: str | None = None, times: int | None = None, **kw: Any
    ) -> None:
        self.faults.add(kind, client_id, times, **kw)

    def sessions_started(self, session: Any, protocol: str) -> None:
        self.connections.started(session, protocol)

    def sessions_ended(self, session: Any) -> None:
        self.connections.ended(session)

    # ----------------------------------------------------------------- HTTP
    def handle(self, req: Request) -> Response:
        if req.path == "/o/oauth2/v2/auth":
            return self.authorize(req)
        if req.path == "/token" and req.method == "POST":
            return self.token(req)
        if req.path == "/revoke" and req.method == "POST":
            return self.revoke(req)
        return Response.json(404, {"error": "not_found"})

    def token(self, req: Request) -> Response:
        client_id = req.form.get("client_id") or (req.basic[0] if req.basic else "")
        record = TokenRequest(self.clock.now(), client_id, "", req.form.get("grant_type", ""), 0)
        answer = self._token(req, client_id, record)
        record.status = answer.status
        if answer.status != 200 and answer.body.startswith(b"{"):
            record.error = str(json.loads(answer.body).get("error", ""))
        self.requests.add(record)
        return answer

    @staticmethod
    def fail(status: int, error: str, description: str) -> Response:
        return Response.json(status, {"error": error, "error_description": description})

    def _token(self, req: Request, client_id: str, record: TokenRequest) -> Response:
        with self.lock:
            app = self.apps.get(client_id)
        if app is None:
            return self.fail(401, "invalid_client", "The OAuth client was not found.")
        if app.deleted:
            return self.fail(401, "deleted_client", "The OAuth client was deleted.")
        secret = req.form.get("client_secret") or (req.basic[1] if req.basic else "")
        if not secrets.compare_digest(secret or "", app.secret):
            return self.fail(401, "invalid_client", "Unauthorized")
        fault = self.faults.take(client_id)
        if fault and fault.kind == "throttled":
            return Response.json(
                429,
                {"error": "rate_limit_exceeded", "error_description": "Rate Limit Exceeded"},
                **{"Retry-After": str(fault.retry_after)},
            )
        if fault and fault.kind in ("hang", "html", "unavailable"):
            return malformed(fault, {}) or Response(500)
        grant_type = req.form.get("grant_type", "")
        if grant_type == "authorization_code":
            answer = self.redeem_code(req, app, record)
        elif grant_type == "refresh_token":
            answer = self.redeem_refresh(req, app, record)
        else:
            return self.fail(400, "unsupported_grant_type", "Invalid grant_type: " + grant_type)
        if fault and answer.status == 200:
            return malformed(fault, json.loads(answer.body)) or answer
        return answer

    def access(self, app: GoogleApp, email: str, scope: str) -> dict[str, Any]:
        token = "ya29." + secrets.token_urlsafe(120)
        with self.lock:
            self.access_tokens[token] = (email, scope, self.clock.now() + app.token_lifetime)
        return {"access_token": token, "expires_in": app.token_lifetime}

    def redeem_code(self, req: Request, app: GoogleApp, record: TokenRequest) -> Response:
        with self.lock:
            entry = self.codes.pop(req.form.get("code", ""), None)
        if entry is None:
            return self.fail(400, "invalid_grant", "Malformed auth code.")
        client_id, email, scope, redirect, challenge, offline = entry
        record.account = email
        if client_id != app.client_id or req.form.get("redirect_uri") != redirect:
            return self.fail(400, "invalid_grant", "Bad Request")
        if challenge:
            verifier = req.form.get("code_verifier", "")
            got = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            if got != challenge:
                return self.fail(400, "invalid_grant", "Invalid code verifier.")
        body = self.access(app, email, scope)
        if offline:
            token = "1//" + secrets.token_urlsafe(75)
            with self.lock:
                self.refresh_tokens[token] = RefreshGrant(
                    app.client_id, email, scope, self.clock.now()
                )
                mine = [
                    g
                    for g in self.refresh_tokens.values()
                    if g.valid and g.client_id == app.client_id and g.email == email
                ]
                for grant in sorted(mine, key=lambda g: g.issued_at)[
                    : max(0, len(mine) - REFRESH_CAP)
                ]:
                    grant.valid = False  # the 101st silently invalidates the oldest
            body["refresh_token"] = token
        body["scope"] = scope
        body["token_type"] = "Bearer"
        if "openid" in scope.split():
            body["id_token"] = (
                "eyJhbGciOiJub25lIn0."
                + base64.urlsafe_b64encode(
                    json.dumps(
                        {
                            "email": email,
                            "email_verified": True,
                            "aud": app.client_id,
                            "iss": "https://accounts.google.com",
                        }
                    ).encode()
                )
                .decode()
                .rstrip("=")
                + "."
            )
        return Response.json(200, body)

    def redeem_refresh(self, req: Request, app: GoogleApp, record: TokenRequest) -> Response:
        with self.lock:
            grant = self.refresh_tokens.get(req.form.get("refresh_token", ""))
        if grant is None or grant.client_id != app.client_id:
            return self.fail(400, "invalid_grant", "Bad Request")
        record.account = grant.email
        expired = app.testing and self.clock.now() - grant.issued_at > TESTING_LIFETIME
        if not grant.valid or expired:
            return self.fail(400, "invalid_grant", "Token has been expired or revoked.")
        scope = req.form.get("scope") or grant.scope
        if not set(scope.split()) <= set(grant.scope.split()):
            return self.fail(
                400,
                "invalid_scope",
                "Some requested scopes were invalid. {invalid=[" + scope + "]}",
            )
        body = self.access(app, grant.email, scope)
        body["scope"] = scope
        body["token_type"] = "Bearer"
        return Response.json(200, body)

    def revoke(self, req: Request) -> Response:
        token = req.param("token") or ""
        with self.lock:
            grant = self.refresh_tokens.get(token)
            if grant:
                grant.valid = False
                return Response.json(200, {})
            if self.access_tokens.pop(token, None):
                return Response.json(200, {})
        return self.fail(400, "invalid_token", "Token expired or revoked")

    def authorize(self, req: Request) -> Response:
        params = {**req.query, **req.form}
        if req.method == "GET":
            with self.lock:
                self.authorize_requests.append(dict(params))
        app = self.apps.get(params.get("client_id", ""))
        if app is None or app.deleted:
            return Response.html(
                401,
                page(
                    "Access blocked: authorization error",
                    "<p>Error 401: invalid_client</p><p>The OAuth client was not found.</p>",
                ),
            )
        if params.get("redirect_uri") not in app.redirect_uris:
            return Response.html(
                400,
                page(
                    "Access blocked: This app's request is invalid",
                    "<p>Error 400: redirect_uri_mismatch</p>",
                ),
            )
        redirect = params["redirect_uri"]
        state = {"state": params["state"]} if params.get("state") else {}
        if req.method == "POST":
            if "decline" in req.form:
                return Response.redirect(
                    f"{redirect}?{urlencode({'error': 'access_denied', **state})}"
                )
            account = self.account(req.form.get("identifier", ""))
            if account is None or account.password != req.form.get("Passwd"):
                return Response.html(
                    200,
                    self.sign_in_page(
                        params, "Wrong password. Try again or click Forgot password to reset it."
                    ),
                )
            offline = params.get("access_type") == "offline" and (
                params.get("prompt") == "consent" or app.client_id not in account.consented
            )
            account.consented.add(app.client_id)
            code = "4/0A" + secrets.token_urlsafe(60)
            with self.lock:
                self.codes[code] = (
                    app.client_id,
                    account.email,
                    params.get("scope", ""),
                    redirect,
                    params.get("code_challenge", ""),
                    offline,
                )
            query = {**state, "code": code, "scope": params.get("scope", "")}
            return Response.redirect(f"{redirect}?{urlencode(query)}")
        return Response.html(200, self.sign_in_page(params, ""))

    def sign_in_page(self, params: dict[str, str], error: str) -> str:
        hidden = "".join(
            f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>"
            for k, v in params.items()
            if k not in ("identifier", "Passwd", "decline")
        )
        err = f"<p class='error'>{html.escape(error)}</p>" if error else ""
        return page(
            "Sign in - Google Accounts",
            f"{err}<form id='signin' method='post' action='/o/oauth2/v2/auth'>{hidden}"
            f"<input name='identifier' type='email' "
            f"value='{html.escape(params.get('login_hint', ''))}'>"
            "<input name='Passwd' type='password'><button type='submit'>Continue</button>"
            "<button type='submit' name='decline' value='1'>Cancel</button></form>",
        )

    # ----------------------------------------------------------------- Gmail's decision
    def check_login(self, protocol: str, sasl_user: str, token: str) -> Verdict:
        with self.lock:
            entry = self.access_tokens.get(token)
        if entry is None:
            return Verdict(False)
        email, scope, expires = entry
        if (
            expires <= self.clock.now()
            or MAIL_SCOPE not in scope.split()
            or email != sasl_user.lower()
        ):
            return Verdict(False)
        account = self.account(email)
        situations = account.situations if account else set()
        if protocol == "imap" and "imap_disabled" in situations:
            return Verdict(False, "imap_disabled")
        if protocol == "pop3" and "pop_disabled" in situations:
            return Verdict(False, "pop_disabled")
        if protocol == "imap" and self.connections.active("imap", email) >= IMAP_LIMIT:
            return Verdict(False, "too_many")
        return Verdict(True, mailbox=email, principal=email, expires_at=None)
