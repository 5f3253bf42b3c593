"""The Entra simulator's interactive side: the sign-in page at ``/authorize`` (a plain form that
``requests`` or a browser can submit) and the device code flow (``/devicecode``, polling, the
``/devicelogin`` page). A mixin of :class:`tests.providers.entra_sim.EntraSim`.
"""

from __future__ import annotations

import html
import random
import secrets
import threading
from collections import defaultdict
from typing import Any
from urllib.parse import urlencode

from tests.providers.common import Clock, Request, Response, TokenRequest, guid, page
from tests.providers.entra_directory import AADSTS, App, DeviceFlow, EntraError, Grant, User


class EntraPages:
    # provided by EntraSim
    lock: threading.RLock
    clock: Clock
    url: str
    apps: dict[str, App]
    users: dict[str, User]
    codes: dict[str, Grant]
    devices: dict[str, DeviceFlow]
    authorize_requests: list[dict[str, str]]
    device_interval: int
    error: Any
    resolve_tenant: Any
    parse_scope: Any
    user: Any
    issue: Any

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
