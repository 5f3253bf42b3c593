"""The provider simulators themselves, driven with requests and stdlib mail clients: each wire
behaviour they promise (tests/providers/README.md) is proven here, so a test of the product
against them can trust what they say.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from typing import Any

import pytest
import requests

from tests.peerbed import xoauth2
from tests.providers.common import jwt_claims
from tests.providers.entra_sim import DEVICE_GRANT, GRAPH
from tests.providers.plugin import EXCHANGE_SCOPE, REDIRECT, ProviderSims

pytestmark = pytest.mark.peers

GRAPH_SCOPE = "https://graph.microsoft.com/Mail.Send offline_access"
MAIL_SCOPE = "https://mail.google.com/"


# ---------------------------------------------------------------------------------- helpers


class Wire:
    """A raw line client over TLS, for checking the exact bytes a server sends."""

    def __init__(self, sims: ProviderSims, port: int, tls: bool = True) -> None:
        self.context = sims.client_tls()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: Any = self.context.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        self.file = self.sock.makefile("rb")

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\r\n")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def ask(self, text: str) -> str:
        self.send(text)
        return self.line()

    def until(self, prefix: str) -> list[str]:
        """Lines up to and including the first that starts with ``prefix``."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix) or not line:
                return lines

    def starttls(self) -> None:
        self.sock = self.context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (OSError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def b64(user: str, token: str) -> str:
    return base64.b64encode(xoauth2(user, token).encode()).decode()


def error_of(answer: requests.Response) -> tuple[int, str, int]:
    body = answer.json()
    return answer.status_code, body["error"], body["error_codes"][0]


def app_with_redirect(sims: ProviderSims, **kw: Any) -> Any:
    return sims.entra.add_app(redirect_uris=[REDIRECT], **kw)


def message(sender: str, to: str, subject: str, bcc: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if bcc:
        msg["Bcc"] = bcc
    msg["Subject"] = subject
    msg.set_content("Sent through a provider simulator.\n")
    return msg


def exchange_imap(sims: ProviderSims, user: str, token: str) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL("127.0.0.1", sims.exchange.imap.port, ssl_context=sims.client_tls())
    conn.authenticate("XOAUTH2", lambda _: xoauth2(user, token).encode())
    return conn


def exchange_smtp(sims: ProviderSims, user: str, token: str) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", sims.exchange.smtp.port, timeout=15)
    conn.starttls(context=sims.client_tls())
    conn.ehlo()
    conn.auth("XOAUTH2", lambda challenge=None: xoauth2(user, token) if challenge is None else "")
    return conn


# ---------------------------------------------------------------------------------- Entra


def test_authorization_code_answers_like_entra(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("ann")
    body = sims.entra_tokens(app, user, EXCHANGE_SCOPE + " openid email")

    assert list(body) == [
        "token_type",
        "scope",
        "expires_in",
        "ext_expires_in",
        "access_token",
        "refresh_token",
        "id_token",
    ]
    assert body["token_type"] == "Bearer"
    assert 3600 <= body["expires_in"] <= 5400 and body["ext_expires_in"] == body["expires_in"]
    # the resource prefix stays, offline_access and openid are not echoed
    assert body["scope"].split() == [
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/POP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
    ]
    assert body["refresh_token"].startswith("0.A")
    claims = jwt_claims(body["access_token"])
    assert claims["aud"] == "https://outlook.office.com" and claims["ver"] == "1.0"
    assert claims["scp"] == "IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send"
    assert claims["upn"] == user.email and claims["idtyp"] == "user"
    assert claims["tid"] == app.tenant_id and claims["iss"].startswith("https://sts.windows.net/")
    id_token = jwt_claims(body["id_token"])
    assert id_token["preferred_username"] == user.email and id_token["aud"] == app.client_id


def test_granted_scope_can_be_narrower_than_requested(sims: ProviderSims) -> None:
    app = app_with_redirect(sims, withheld={("exchange", "POP.AccessAsUser.All")})
    body = sims.entra_tokens(app, sims.entra_user("narrow"))
    assert "POP.AccessAsUser.All" not in body["scope"]
    assert "POP.AccessAsUser.All" not in jwt_claims(body["access_token"])["scp"]


def test_refresh_rotates_and_the_old_token_keeps_working(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    first = sims.entra_tokens(app, sims.entra_user("rot"))
    old = first["refresh_token"]

    again = sims.entra_token(app, {"grant_type": "refresh_token", "refresh_token": old})
    assert again.status_code == 200
    new = again.json()["refresh_token"]
    assert new != old and again.json()["scope"] == first["scope"]  # no scope: as granted
    reuse = sims.entra_token(app, {"grant_type": "refresh_token", "refresh_token": old})
    assert reuse.status_code == 200, reuse.text


def test_refresh_for_another_consented_resource_gives_a_graph_token(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    first = sims.entra_tokens(app, sims.entra_user("graph"))
    answer = sims.entra_token(
        app,
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "scope": GRAPH_SCOPE,
        },
    )
    assert answer.status_code == 200, answer.text
    claims = jwt_claims(answer.json()["access_token"])
    assert claims["aud"] == GRAPH and "Mail.Send" in claims["scp"].split()


def test_refresh_with_an_unconsented_scope_needs_consent(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    first = sims.entra_tokens(app, sims.entra_user("consent"))
    answer = sims.entra_token(
        app,
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "scope": "https://graph.microsoft.com/Mail.Read",
        },
    )
    assert error_of(answer) == (400, "invalid_grant", 65001)
    assert answer.json()["suberror"] == "consent_required"


def test_errors_carry_entras_fields_in_order(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    answer = sims.entra_token(app, {"grant_type": "refresh_token", "refresh_token": "garbled"})
    body = answer.json()
    assert answer.status_code == 400
    assert list(body) == [
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    ]
    assert body["error_codes"] == [9002313]
    assert body["error_description"].startswith("AADSTS9002313: Invalid request.")
    assert (
        f"\r\nTrace ID: {body['trace_id']}\r\nCorrelation ID: {body['correlation_id']}\r\n"
        in (body["error_description"])
    )
    assert body["error_uri"] == "https://login.microsoftonline.com/error?code=9002313"


@pytest.mark.parametrize(
    "public, secret, situation, expected",
    [
        (True, "a-secret", None, (400, "invalid_client", 700025)),
        (False, "", None, (401, "invalid_client", 7000218)),
        (False, "wrong-secret", None, (401, "invalid_client", 7000215)),
        (False, None, "secret_expired", (401, "invalid_client", 7000222)),
    ],
)
def test_client_authentication_errors(
    sims: ProviderSims, public: bool, secret: str | None, situation: str | None, expected: tuple
) -> None:
    app = sims.entra.add_app(public=public)
    user = sims.entra_user("cli", seed=0)
    if situation:
        sims.entra.app_situation(app.client_id, situation)
    data = {"grant_type": "password", "username": user.email, "password": user.password}
    data["scope"] = EXCHANGE_SCOPE
    if secret == "":
        answer = requests.post(
            sims.entra.endpoint(app.tenant_id),
            data={"client_id": app.client_id, **data},
            verify=sims.ca_file,
            timeout=10,
        )
    else:
        answer = sims.entra_token(app, data, secret=secret)
    assert error_of(answer) == expected


def test_tenant_rules(sims: ProviderSims) -> None:
    single = sims.entra.add_app()
    multi = sims.entra.add_app(multi_tenant=True)
    user = sims.entra_user("tenant", seed=0)
    ropc = {"grant_type": "password", "username": user.email, "password": user.password}
    ropc["scope"] = EXCHANGE_SCOPE

    assert error_of(sims.entra_token(single, ropc, tenant="common"))[2] == 50194
    assert error_of(sims.entra_token(single, ropc, tenant="organizations"))[2] == 50194
    assert sims.entra_token(multi, ropc, tenant="organizations").status_code == 200
    assert sims.entra_token(single, ropc, tenant="example.test").status_code == 200
    assert error_of(sims.entra_token(single, ropc, tenant="nowhere.example")) == (
        400,
        "invalid_tenant",
        90002,
    )
    cc = {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    assert error_of(sims.entra_token(multi, cc, tenant="organizations"))[2] == 50059
    other = sims.entra.add_tenant("other.example")
    assert error_of(sims.entra_token(single, ropc, tenant=other.id))[2] == 700016


def test_client_credentials_answer_and_claims(sims: ProviderSims) -> None:
    app = sims.entra.add_app()
    scope = "https://outlook.office365.com/.default"
    answer = sims.entra_token(app, {"grant_type": "client_credentials", "scope": scope})
    body = answer.json()
    assert list(body) == ["token_type", "expires_in", "ext_expires_in", "access_token"]
    assert body["expires_in"] == 3599 == body["ext_expires_in"]
    claims = jwt_claims(body["access_token"])
    assert claims["roles"] == ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
    assert claims["idtyp"] == "app" and "upn" not in claims and "scp" not in claims
    assert claims["aud"] == "https://outlook.office365.com"
    bad = sims.entra_token(app, {"grant_type": "client_credentials", "scope": EXCHANGE_SCOPE})
    assert error_of(bad) == (400, "invalid_scope", 70011)
    public = sims.entra.add_app(public=True)
    assert (
        error_of(sims.entra_token(public, {"grant_type": "client_credentials", "scope": scope}))[2]
        == 7000218
    )


def test_device_code_flow(sims: ProviderSims) -> None:
    app = sims.entra.add_app(public=True)
    user = sims.entra_user("device", seed=0)
    start = requests.post(
        sims.entra.endpoint(app.tenant_id, "devicecode"),
        data={"client_id": app.client_id, "scope": EXCHANGE_SCOPE},
        verify=sims.ca_file,
        timeout=10,
    ).json()
    assert list(start)[:5] == [
        "user_code",
        "device_code",
        "verification_uri",
        "expires_in",
        "interval",
    ]
    assert start["expires_in"] == 900
    poll = {"grant_type": DEVICE_GRANT, "device_code": start["device_code"]}
    assert error_of(sims.entra_token(app, poll)) == (400, "authorization_pending", 70016)

    page = requests.post(
        start["verification_uri"],
        data={"otc": start["user_code"], "login": user.email, "passwd": user.password},
        verify=sims.ca_file,
        timeout=10,
    )
    assert "signed in" in page.text
    done = sims.entra_token(app, poll)
    assert done.status_code == 200 and "refresh_token" in done.json()
    assert error_of(sims.entra_token(app, poll))[1] == "expired_token"

    declined = requests.post(
        sims.entra.endpoint(app.tenant_id, "devicecode"),
        data={"client_id": app.client_id, "scope": EXCHANGE_SCOPE},
        verify=sims.ca_file,
        timeout=10,
    ).json()
    sims.entra.approve_device(declined["user_code"], user.email, approve=False)
    poll2 = {"grant_type": DEVICE_GRANT, "device_code": declined["device_code"]}
    assert error_of(sims.entra_token(app, poll2))[1] == "authorization_declined"


@pytest.mark.parametrize(
    "situation, expected, suberror",
    [
        ("consent_revoked", ("invalid_grant", 65001), "consent_required"),
        ("password_changed", ("invalid_grant", 50173), None),
        ("mfa_required", ("invalid_grant", 50076), "basic_action"),
        ("mfa_enrollment", ("interaction_required", 50079), None),
        ("conditional_access", ("interaction_required", 53003), "message_only"),
        ("throttled", ("invalid_grant", 50196), None),
    ],
)
def test_mailbox_situations_at_the_token_endpoint(
    sims: ProviderSims, situation: str, expected: tuple, suberror: str | None
) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("sit", seed=0)
    first = sims.entra_tokens(app, user)
    time.sleep(0.01)  # tokens issued before the password change
    sims.entra.situation(user.email, situation)
    answer = sims.entra_token(
        app, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    status, error, code = error_of(answer)
    assert (status, error, code) == (400, *expected)
    assert answer.json().get("suberror") == suberror


def test_code_rules(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("code", seed=0)
    code, verifier = sims.entra_code(app, user)
    redeem = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    assert error_of(sims.entra_token(app, {**redeem, "code_verifier": "wrong"}))[2] == 501481
    assert sims.entra_token(app, {**redeem, "code_verifier": verifier}).status_code == 200
    assert error_of(sims.entra_token(app, {**redeem, "code_verifier": verifier}))[2] == 54005

    late, verifier = sims.entra_code(app, user)
    sims.entra.clock.advance(601)
    answer = sims.entra_token(app, {**redeem, "code": late, "code_verifier": verifier})
    assert error_of(answer)[2] == 70008


def test_refresh_token_dies_after_90_idle_days(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    first = sims.entra_tokens(app, sims.entra_user("idle", seed=0))
    sims.entra.clock.advance(91 * 86400)
    answer = sims.entra_token(
        app, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert error_of(answer) == (400, "invalid_grant", 700082)


def test_a_request_loop_is_cut_off_with_50196(sims: ProviderSims) -> None:
    sims.entra.loop_threshold = 3
    app = app_with_redirect(sims)
    first = sims.entra_tokens(app, sims.entra_user("loop", seed=0))
    data = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    statuses = [sims.entra_token(app, data).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 400]
    assert error_of(sims.entra_token(app, data))[2] == 50196


def test_throttling_and_outage_answers(sims: ProviderSims) -> None:
    app = sims.entra.add_app()
    cc = {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    sims.entra.token_fault("throttled", app.client_id, times=1)
    answer = sims.entra_token(app, cc)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "60"
    sims.entra.token_fault("unavailable", app.client_id, times=1, retry_after=7)
    answer = sims.entra_token(app, cc)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "7"
    assert sims.entra_token(app, cc).status_code == 200


@pytest.mark.parametrize("fault", ["html", "truncated", "no_access_token", "expires_in_text"])
def test_malformed_token_answers(sims: ProviderSims, fault: str) -> None:
    app = sims.entra.add_app()
    cc = {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    sims.entra.token_fault(fault, app.client_id, times=1)
    answer = sims.entra_token(app, cc)
    assert answer.status_code == 200
    if fault in ("html", "truncated"):
        with pytest.raises(ValueError):
            answer.json()
    elif fault == "no_access_token":
        assert "access_token" not in answer.json() and answer.json()["token_type"] == "Bearer"
    else:
        assert answer.json()["expires_in"] == "one hour"


def test_a_hanging_token_endpoint(sims: ProviderSims) -> None:
    app = sims.entra.add_app()
    sims.entra.token_fault("hang", app.client_id, times=1, hang=3)
    cc = {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    with pytest.raises(requests.Timeout):
        requests.post(
            sims.entra.endpoint(app.tenant_id),
            data={**cc, "client_id": app.client_id, "client_secret": app.secret},
            verify=sims.ca_file,
            timeout=0.5,
        )


def test_token_requests_are_counted_per_client_and_account(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("count", seed=0)
    first = sims.entra_tokens(app, user)
    for _ in range(2):
        sims.entra_token(
            app, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        )
    assert sims.entra.requests.count(client_id=app.client_id) == 3
    assert sims.entra.requests.count(account=user.email, grant_type="refresh_token") == 2


def test_sign_in_page(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("page", seed=0)
    url, _ = sims.entra_authorize_url(app, login_hint=user.email)
    shown = requests.get(url, verify=sims.ca_file, timeout=10)
    assert f"value='{user.email}'" in shown.text
    assert sims.entra.authorize_requests[-1]["login_hint"] == user.email
    declined = sims.entra_sign_in(url, user.email, decline=True)
    assert "error=access_denied" in declined and "AADSTS65004" in declined

    wrong, _ = sims.entra_authorize_url(app, redirect_uri="https://evil.example/cb")
    assert "AADSTS50011" in requests.get(wrong, verify=sims.ca_file, timeout=10).text
    common, _ = sims.entra_authorize_url(app, tenant="common")
    assert "AADSTS50194" in requests.get(common, verify=sims.ca_file, timeout=10).text


def test_consumer_accounts_get_opaque_tokens(sims: ProviderSims) -> None:
    app = app_with_redirect(sims, multi_tenant=True)
    user = sims.entra_user("msa", consumer=True)
    body = sims.entra_tokens(app, user)
    assert body["access_token"].startswith("EwB") and body["refresh_token"].startswith("M.C5")
    conn = exchange_imap(sims, user.email, body["access_token"])
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()


# ---------------------------------------------------------------------------------- Exchange IMAP


def test_exchange_imap_wire(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("wire")
    token = sims.entra_tokens(app, user)["access_token"]
    wire = Wire(sims, sims.exchange.imap.port)
    assert wire.line() == (
        "* OK The Microsoft Exchange IMAP4 service is ready. [TQBOADIAUABSADAAMQBDAEEAMAAwADAANwA=]"
    )
    wire.send("a CAPABILITY")
    assert wire.until("a ") == [
        "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT "
        "CHILDREN IDLE NAMESPACE LITERAL+",
        "a OK CAPABILITY completed.",
    ]
    assert wire.ask("b SELECT INBOX") == "b BAD Command received in Invalid state."
    assert wire.ask("c AUTHENTICATE XOAUTH2") == "+"  # a bare "+", two-step
    assert wire.ask(b64(user.email, token)) == "c OK AUTHENTICATE completed."
    wire.send("d CAPABILITY")
    assert "CLIENTACCESSRULES CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE" in wire.line()
    wire.line()
    wire.send("e LOGOUT")
    assert wire.until("e ") == [
        "* BYE Microsoft Exchange Server IMAP4 server signing off.",
        "e OK LOGOUT completed.",
    ]


@pytest.mark.parametrize("which", ["garbage", "graph", "no_imap_scope", "expired"])
def test_exchange_imap_refuses_bad_tokens_without_a_challenge(
    sims: ProviderSims, which: str
) -> None:
    app = app_with_redirect(
        sims,
        withheld={("exchange", "IMAP.AccessAsUser.All")} if which == "no_imap_scope" else set(),
    )
    if which == "expired":
        app.token_lifetime = 1
    user = sims.entra_user("bad", seed=0)
    body = sims.entra_tokens(app, user, GRAPH_SCOPE if which == "graph" else EXCHANGE_SCOPE)
    token = "not-a-token" if which == "garbage" else body["access_token"]
    if which == "expired":
        time.sleep(1.1)
    wire = Wire(sims, sims.exchange.imap.port)
    wire.line()
    assert (
        wire.ask(f"a AUTHENTICATE XOAUTH2 {b64(user.email, token)}") == "a NO AUTHENTICATE failed."
    )


def test_a_mailbox_the_principal_cannot_open_is_authenticated_but_not_connected(
    sims: ProviderSims,
) -> None:
    app = app_with_redirect(sims)
    delegate = sims.entra_user("delegate")
    shared = sims.entra_user("shared", shared=True)
    token = sims.entra_tokens(app, delegate)["access_token"]
    wire = Wire(sims, sims.exchange.imap.port)
    wire.line()
    assert wire.ask(f"a AUTHENTICATE XOAUTH2 {b64(shared.email, token)}") == (
        "a OK AUTHENTICATE completed."
    )
    assert wire.ask("b SELECT INBOX") == "b BAD User is authenticated but not connected."
    assert wire.ask("c SELECT INBOX") == "c BAD User is authenticated but not connected."
    assert wire.line() == "* BYE Connection closed. 14"
    assert wire.closed()

    sims.entra.grant_full_access(shared.email, delegate.email)
    conn = exchange_imap(sims, shared.email, token)
    assert conn.select("INBOX") == ("OK", [b"1"])
    conn.logout()


def test_imap_disabled_plays_not_connected(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("noimap")
    sims.entra.situation(user.email, "imap_disabled")
    token = sims.entra_tokens(app, user)["access_token"]
    conn = exchange_imap(sims, user.email, token)
    with pytest.raises(imaplib.IMAP4.error, match="not connected"):
        conn.select("INBOX")


def test_the_session_ends_when_the_access_token_expires(sims: ProviderSims) -> None:
    app = app_with_redirect(sims, token_lifetime=4)
    user = sims.entra_user("expiry")
    token = sims.entra_tokens(app, user)["access_token"]
    wire = Wire(sims, sims.exchange.imap.port)
    wire.line()
    assert wire.ask(f"a AUTHENTICATE XOAUTH2 {b64(user.email, token)}").startswith("a OK")
    wire.send("b NOOP")
    assert wire.until("b ")[-1].startswith("b OK")
    assert wire.until("* BYE") == ["* BYE Session invalidated - AccessTokenExpired"]
    assert wire.closed()


def test_app_only_imap_needs_the_mailbox_permission(sims: ProviderSims) -> None:
    app = sims.entra.add_app()
    user = sims.entra_user("apponly")
    cc = {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    token = sims.entra_token(app, cc).json()["access_token"]
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATE failed"):
        exchange_imap(sims, user.email, token)
    sims.entra.grant_full_access(user.email, app.client_id)
    conn = exchange_imap(sims, user.email, token)
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()


# ---------------------------------------------------------------------------------- Exchange POP3


def test_exchange_pop3_wire(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("pop", seed=2)
    token = sims.entra_tokens(app, user)["access_token"]
    wire = Wire(sims, sims.exchange.pop3.port)
    assert wire.line().startswith("+OK The Microsoft Exchange POP3 service is ready. [")
    wire.send("CAPA")
    capa = wire.until(".")
    assert {"TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"} <= set(capa)
    # the initial response on the AUTH line fails; the two-step form works
    assert wire.ask(f"AUTH XOAUTH2 {b64(user.email, token)}") == (
        "-ERR Authentication failure: unknown user name or bad password."
    )
    assert wire.ask("AUTH XOAUTH2") == "+ "
    assert wire.ask(b64(user.email, "bad")) == (
        "-ERR Authentication failure: unknown user name or bad password."
    )
    assert wire.ask("AUTH XOAUTH2") == "+ "
    assert wire.ask(b64(user.email, token)) == "+OK User successfully authenticated."
    assert wire.ask("STAT").startswith("+OK 2 ")
    assert wire.ask("QUIT") == "+OK Microsoft Exchange Server POP3 server signing off."


def test_exchange_pop3_with_poplib(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("poplib", seed=1)
    token = sims.entra_tokens(app, user)["access_token"]
    conn = poplib.POP3_SSL("127.0.0.1", sims.exchange.pop3.port, context=sims.client_tls())
    assert conn._shortcmd("AUTH XOAUTH2").startswith(b"+")  # type: ignore[attr-defined]
    assert conn._shortcmd(b64(user.email, token)) == b"+OK User successfully authenticated."  # type: ignore[attr-defined]
    assert b"Seed message 1" in b"\n".join(conn.retr(1)[1])
    conn.quit()


# ---------------------------------------------------------------------------------- Exchange SMTP


def test_exchange_smtp_wire(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("smtpwire", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    wire = Wire(sims, sims.exchange.smtp.port, tls=False)
    assert wire.line().startswith(
        "220 SN2PR00CA0018.outlook.office365.com Microsoft ESMTP MAIL Service ready at "
    )
    wire.send("EHLO client.example")
    plain = wire.until("250 ")
    assert "250-STARTTLS" in plain and not any("AUTH" in x for x in plain)
    assert plain[-1] == "250 SMTPUTF8" and "250-SIZE 157286400" in plain
    assert wire.ask("AUTH XOAUTH2").startswith("504 5.7.4 Unrecognized authentication type")
    assert (
        wire.ask("MAIL FROM:<x@example.test>")
        == "530 5.7.57 Client not authenticated to send mail."
    )
    assert wire.ask("STARTTLS") == "220 2.0.0 SMTP server ready"
    wire.starttls()
    wire.send("EHLO client.example")
    secure = wire.until("250 ")
    assert "250-AUTH LOGIN XOAUTH2" in secure and "250-STARTTLS" not in secure
    assert wire.ask("auth xoauth2") == "334 "  # any case, no initial response
    assert wire.ask(b64(user.email, token)) == "235 2.7.0 Authentication successful"
    assert wire.ask(f"MAIL FROM:<{user.email}>") == "250 2.1.0 Sender OK"
    assert wire.ask(f"RCPT TO:<{user.email}>") == "250 2.1.5 Recipient OK"
    assert wire.ask("DATA") == "354 Start mail input; end with <CRLF>.<CRLF>"


def test_exchange_smtp_delivers_with_bcc_and_a_sent_copy(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("sender", seed=0)
    to, bcc = sims.entra_user("to", seed=0), sims.entra_user("bcc", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    conn = exchange_smtp(sims, user.email, token)
    subject = f"smtp-{time.time_ns()}"
    conn.send_message(message(user.email, to.email, subject, bcc=bcc.email))
    conn.quit()
    peers = sims.peers
    assert peers.wait_for_message(to.email, subject)
    assert peers.wait_for_message(bcc.email, subject)
    assert peers.wait_for_message(user.email, subject, mailbox="Sent")


@pytest.mark.parametrize(
    "situation, words",
    [
        ("smtp_auth_disabled_tenant", "SmtpClientAuthentication is disabled for the Tenant."),
        ("smtp_auth_disabled", "SmtpClientAuthentication is disabled for the Mailbox."),
        ("security_defaults", "user is locked by your organization's security defaults policy."),
        ("conditional_access", "the request did not meet the criteria to be authenticated"),
    ],
)
def test_exchange_smtp_policy_refusals(sims: ProviderSims, situation: str, words: str) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("policy", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    sims.entra.situation(user.email, situation)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        exchange_smtp(sims, user.email, token)
    assert refused.value.smtp_code == 535
    text = refused.value.smtp_error.decode()
    assert text.startswith("5.7.139 Authentication unsuccessful, ") and words in text


@pytest.mark.parametrize("which", ["graph", "no_smtp_scope", "shared_login"])
def test_exchange_smtp_refuses_with_5_7_3(sims: ProviderSims, which: str) -> None:
    withheld = {("exchange", "SMTP.Send")} if which == "no_smtp_scope" else set()
    app = app_with_redirect(sims, withheld=withheld)
    user = sims.entra_user("s573", seed=0)
    shared = sims.entra_user("shared573", seed=0, shared=True)
    sims.entra.grant_send_as(shared.email, user.email)
    token = sims.entra_tokens(app, user, GRAPH_SCOPE if which == "graph" else EXCHANGE_SCOPE)
    login = shared.email if which == "shared_login" else user.email
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        exchange_smtp(sims, login, token["access_token"])
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.decode().startswith("5.7.3 Authentication unsuccessful [")


def test_send_as_is_checked_after_data(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    delegate = sims.entra_user("deleg", seed=0)
    shared = sims.entra_user("team", seed=0, shared=True)
    token = sims.entra_tokens(app, delegate)["access_token"]
    conn = exchange_smtp(sims, delegate.email, token)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        conn.send_message(message(shared.email, delegate.email, "denied"))
    assert refused.value.smtp_code == 554
    assert refused.value.smtp_error.decode().startswith(
        f"5.2.252 SendAsDenied; {delegate.email} not allowed to send as {shared.email}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
    )
    sims.entra.grant_send_as(shared.email, delegate.email)
    subject = f"sendas-{time.time_ns()}"
    conn.send_message(message(shared.email, delegate.email, subject))
    conn.quit()
    assert sims.peers.wait_for_message(delegate.email, subject)


def test_a_fourth_concurrent_smtp_session_is_refused(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("conc", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    open_ = [exchange_smtp(sims, user.email, token) for _ in range(3)]
    with pytest.raises(smtplib.SMTPException) as refused:
        exchange_smtp(sims, user.email, token)
    assert "4.3.2 Concurrent connections limit exceeded." in str(refused.value)
    open_.pop().quit()
    deadline = time.monotonic() + 10  # the server counts the session closed just after QUIT
    while sims.exchange.connections.active("smtp", user.email) >= 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    exchange_smtp(sims, user.email, token).quit()
    for conn in open_:
        conn.quit()


# ---------------------------------------------------------------------------------- Graph


def graph_send(
    sims: ProviderSims, mailbox: str, token: str, raw: bytes, **headers: str
) -> requests.Response:
    return requests.post(
        f"{sims.graph.url}/v1.0/users/{mailbox}/sendMail",
        data=base64.b64encode(raw),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain", **headers},
        verify=sims.ca_file,
        timeout=30,
    )


def graph_token(sims: ProviderSims, user: Any, app: Any = None) -> str:
    app = app or app_with_redirect(sims)
    return str(sims.entra_tokens(app, user, GRAPH_SCOPE)["access_token"])


def test_graph_send_mail_delivers_bcc_and_saves_sent(sims: ProviderSims) -> None:
    user = sims.entra_user("graphsend", seed=0)
    to, bcc = sims.entra_user("gto", seed=0), sims.entra_user("gbcc", seed=0)
    token = graph_token(sims, user)
    subject = f"graph-{time.time_ns()}"
    answer = graph_send(
        sims, user.email, token, message(user.email, to.email, subject, bcc.email).as_bytes()
    )
    assert answer.status_code == 202 and answer.content == b""
    peers = sims.peers
    assert peers.wait_for_message(to.email, subject)
    assert peers.wait_for_message(bcc.email, subject)
    assert peers.wait_for_message(user.email, subject, mailbox="Sent")
    looked = requests.get(
        f"{sims.graph.url}/v1.0/users/{user.email}",
        headers={"Authorization": f"Bearer {token}"},
        verify=sims.ca_file,
        timeout=10,
    )
    assert looked.status_code == 200 and looked.json()["userPrincipalName"] == user.email


def test_graph_errors(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("graphbad", seed=0)
    other = sims.entra_user("graphother", seed=0)
    token = graph_token(sims, user, app)
    raw = message(user.email, user.email, "x").as_bytes()

    def code_of(answer: requests.Response) -> tuple[int, str]:
        return answer.status_code, answer.json()["error"]["code"]

    exchange_token = sims.entra_tokens(app, user)["access_token"]
    wrong = graph_send(sims, user.email, exchange_token, raw)
    assert code_of(wrong) == (401, "InvalidAuthenticationToken")
    assert "Invalid audience" in wrong.json()["error"]["message"]
    assert set(wrong.json()["error"]["innerError"]) == {"date", "request-id", "client-request-id"}

    spoof = message(other.email, user.email, "spoof").as_bytes()
    assert code_of(graph_send(sims, user.email, token, spoof)) == (403, "ErrorSendAsDenied")
    assert code_of(graph_send(sims, other.email, token, raw)) == (403, "ErrorAccessDenied")
    big = b"Subject: big\r\nTo: " + user.email.encode() + b"\r\n\r\n" + b"x" * (3_200_000)
    assert graph_send(sims, user.email, token, big).status_code == 413
    bad = requests.post(
        f"{sims.graph.url}/v1.0/users/{user.email}/sendMail",
        data=b"%%% not base64 %%%",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
        verify=sims.ca_file,
        timeout=10,
    )
    assert code_of(bad) == (400, "ErrorMimeContentInvalidBase64String")
    sims.entra.situation(user.email, "graph_throttled")
    throttled = graph_send(sims, user.email, token, raw)
    assert code_of(throttled) == (429, "ApplicationThrottled") and throttled.headers["Retry-After"]
    no_send = app_with_redirect(sims, withheld={("graph", "Mail.Send")})
    scopeless = sims.entra_tokens(no_send, other, "https://graph.microsoft.com/User.Read")
    assert code_of(graph_send(sims, other.email, scopeless["access_token"], raw))[0] == 403


# ---------------------------------------------------------------------------------- Google


def google_app(sims: ProviderSims, **kw: Any) -> Any:
    return sims.google.add_app(redirect_uris=[REDIRECT], **kw)


def google_refresh(sims: ProviderSims, app: Any, token: str) -> requests.Response:
    return requests.post(
        f"{sims.google.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": app.client_id,
            "client_secret": app.secret,
        },
        verify=sims.ca_file,
        timeout=10,
    )


def test_google_token_answers(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("tok", seed=0)
    body = sims.google_tokens(app, account)
    assert list(body) == ["access_token", "expires_in", "refresh_token", "scope", "token_type"]
    assert body["access_token"].startswith("ya29.") and body["refresh_token"].startswith("1//")
    assert body["expires_in"] == 3599 and body["scope"] == MAIL_SCOPE
    again = google_refresh(sims, app, body["refresh_token"])
    assert list(again.json()) == [
        "access_token",
        "expires_in",
        "scope",
        "token_type",
    ]  # no rotation
    assert google_refresh(sims, app, body["refresh_token"]).status_code == 200


@pytest.mark.parametrize("how", ["revoked", "password_changed", "testing_expiry", "cap"])
def test_google_refresh_token_ends(sims: ProviderSims, how: str) -> None:
    app = google_app(sims, testing=how == "testing_expiry")
    account = sims.google_account("ends", seed=0)
    first = sims.google_tokens(app, account)["refresh_token"]
    if how in ("revoked", "password_changed"):
        sims.google.situation(account.email, how)
    elif how == "testing_expiry":
        assert google_refresh(sims, app, first).status_code == 200
        sims.google.clock.advance(7 * 86400 + 60)
    else:
        for _ in range(100):
            sims.google_tokens(app, account, prompt="consent")
    answer = google_refresh(sims, app, first)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_grant",
        "error_description": "Token has been expired or revoked.",
    }


def test_google_client_errors(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("cl", seed=0)
    token = sims.google_tokens(app, account)["refresh_token"]
    sims.google.delete_app(app.client_id)
    answer = google_refresh(sims, app, token)
    assert answer.status_code == 401 and answer.json()["error"] == "deleted_client"
    unknown = requests.post(
        f"{sims.google.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": "nobody"},
        verify=sims.ca_file,
        timeout=10,
    )
    assert unknown.status_code == 401
    assert unknown.json() == {
        "error": "invalid_client",
        "error_description": "The OAuth client was not found.",
    }


def test_gmail_imap_wire(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("gimap")
    token = sims.google_tokens(app, account)["access_token"]
    wire = Wire(sims, sims.google.imap.port)
    assert wire.line().startswith("* OK Gimap ready for requests from 127.0.0.1 ")
    wire.send("a CAPABILITY")
    caps = wire.until("a ")
    assert caps[0].startswith("* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST")
    assert "AUTH=XOAUTH2" in caps[0] and caps[1].startswith("a OK Thats all she wrote! ")
    # failure: a base64 JSON challenge, answered with an empty line
    challenge = wire.ask(f"b AUTHENTICATE XOAUTH2 {b64(account.email, 'ya29.bad')}")
    assert challenge.startswith("+ ")
    assert json.loads(base64.b64decode(challenge[2:])) == {
        "status": "400",
        "schemes": "Bearer",
        "scope": MAIL_SCOPE,
    }
    assert wire.ask("") == "b NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    wire.ask(f"c AUTHENTICATE XOAUTH2 {b64(account.email, 'ya29.bad')}")
    assert wire.ask("x").startswith("c NO Invalid SASL argument.")
    wire.send(f"d AUTHENTICATE XOAUTH2 {b64(account.email, token)}")
    assert wire.until("d ")[-1] == f"d OK {account.email} {account.name} authenticated (Success)"
    wire.send("e SELECT INBOX")
    assert wire.until("e ")[-1].startswith("e OK")


def test_gmail_refuses_the_16th_connection(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("many")
    token = sims.google_tokens(app, account)["access_token"]

    def login() -> imaplib.IMAP4_SSL:
        conn = imaplib.IMAP4_SSL("127.0.0.1", sims.google.imap.port, ssl_context=sims.client_tls())
        conn.authenticate("XOAUTH2", lambda _: xoauth2(account.email, token).encode())
        return conn

    held = [login() for _ in range(15)]
    with pytest.raises(imaplib.IMAP4.error, match=r"\[ALERT\] Too many simultaneous connections"):
        login()
    for conn in held:
        conn.logout()


def test_gmail_smtp_and_pop3(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("gsmtp", seed=1)
    other = sims.google_account("gother", seed=0)
    token = sims.google_tokens(app, account)["access_token"]
    wire = Wire(sims, sims.google.smtp.port)
    assert wire.line().startswith("220 smtp.gmail.com ESMTP ")
    wire.send("EHLO me")
    ehlo = wire.until("250 ")
    assert ehlo[0] == "250-smtp.gmail.com at your service, [127.0.0.1]"
    assert "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH" in ehlo
    assert wire.ask(f"AUTH XOAUTH2 {b64(account.email, 'ya29.bad')}").startswith("334 eyJ")
    wire.send("")
    refusal = wire.until("535 ")
    assert refusal[0] == "535-5.7.8 Username and Password not accepted. For more information, go to"
    assert refusal[1].startswith("535 5.7.8  https://support.google.com/mail/?p=BadCredentials ")
    assert refusal[1].endswith(" - gsmtp")
    assert wire.ask(f"AUTH XOAUTH2 {b64(account.email, token)}") == "235 2.7.0 Accepted"

    conn = smtplib.SMTP("127.0.0.1", sims.google.submission.port, timeout=15)
    conn.starttls(context=sims.client_tls())
    conn.auth(
        "XOAUTH2", lambda challenge=None: xoauth2(account.email, token) if challenge is None else ""
    )
    subject = f"gmail-{time.time_ns()}"
    conn.send_message(message(other.email, account.email, subject))  # From rewritten
    conn.quit()
    assert sims.peers.wait_for_message(account.email, subject)
    assert sims.google.sent[-1][1] == account.email

    pop = Wire(sims, sims.google.pop3.port)
    assert pop.line().startswith("+OK Gpop ready for requests from 127.0.0.1 ")
    pop.send("CAPA")
    assert "X-GOOGLE-VERHOEVEN" in pop.until(".")
    assert pop.ask(f"AUTH XOAUTH2 {b64(account.email, 'ya29.bad')}").startswith("+ eyJ")
    assert pop.ask("") == "-ERR [AUTH] Invalid credentials."
    assert pop.ask(f"AUTH XOAUTH2 {b64(account.email, token)}") == "+OK Welcome."
    assert pop.ask("STAT").startswith("+OK ")


@pytest.mark.parametrize("situation", ["pop_disabled", "no_permission"])
def test_exchange_pop3_situations(sims: ProviderSims, situation: str) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("popsit", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    sims.entra.situation(user.email, situation)
    wire = Wire(sims, sims.exchange.pop3.port)
    wire.line()
    wire.ask("AUTH XOAUTH2")
    assert wire.ask(b64(user.email, token)) == (
        "-ERR Authentication failure: unknown user name or bad password."
    )


def test_google_token_faults(sims: ProviderSims) -> None:
    app = google_app(sims)
    account = sims.google_account("gfault", seed=0)
    token = sims.google_tokens(app, account)["refresh_token"]
    sims.google.token_fault("throttled", app.client_id, times=1, retry_after=5)
    answer = google_refresh(sims, app, token)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "5"
    sims.google.token_fault("no_access_token", app.client_id, times=1)
    assert "access_token" not in google_refresh(sims, app, token).json()
    assert sims.google.requests.count(client_id=app.client_id, grant_type="refresh_token") == 2
    assert google_refresh(sims, app, token).status_code == 200


def test_graph_outage(sims: ProviderSims) -> None:
    user = sims.entra_user("gout", seed=0)
    app = app_with_redirect(sims)
    token = graph_token(sims, user, app)
    sims.graph.faults.add("unavailable", app.client_id, times=1, retry_after=9)
    answer = graph_send(sims, user.email, token, message(user.email, user.email, "x").as_bytes())
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "9"
    assert answer.json()["error"]["code"] == "ServiceNotAvailable"


def test_exchange_smtp_accepts_bdat(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("bdat", seed=0)
    token = sims.entra_tokens(app, user)["access_token"]
    conn = exchange_smtp(sims, user.email, token)
    subject = f"bdat-{time.time_ns()}"
    raw = message(user.email, user.email, subject).as_bytes().replace(b"\n", b"\r\n")
    assert conn.mail(user.email)[0] == 250 and conn.rcpt(user.email)[0] == 250
    half = len(raw) // 2
    conn.send(f"BDAT {half}\r\n".encode() + raw[:half])
    assert conn.getreply()[0] == 250
    conn.send(f"BDAT {len(raw) - half} LAST\r\n".encode() + raw[half:])
    code, said = conn.getreply()
    assert code == 250 and said.startswith(b"2.0.0 OK <")
    conn.quit()
    assert sims.peers.wait_for_message(user.email, subject)


def test_more_aadsts_codes(sims: ProviderSims) -> None:
    app = app_with_redirect(sims)
    user = sims.entra_user("codes", seed=0)
    ropc = {"grant_type": "password", "username": user.email, "password": user.password}
    unknown = sims.entra_token(app, {**ropc, "scope": "https://nowhere.example/.default"})
    assert error_of(unknown) == (400, "invalid_resource", 500011)
    assert error_of(sims.entra_token(app, {**ropc, "scope": "Mail.Fly"})) == (
        400,
        "invalid_scope",
        70011,
    )
    assert (
        error_of(sims.entra_token(app, {**ropc, "password": "wrong", "scope": EXCHANGE_SCOPE}))[2]
        == 50126
    )
    spa = app_with_redirect(sims, spa=True)
    first = sims.entra_tokens(spa, user)
    sims.entra.clock.advance(86400 + 1)
    answer = sims.entra_token(
        spa, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert error_of(answer) == (400, "invalid_grant", 700084)
    other = app_with_redirect(sims)
    stolen = sims.entra_token(
        other, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert error_of(stolen) == (400, "invalid_grant", 70000)


def test_exchange_imap_without_basic_auth_says_logindisabled(sims: ProviderSims) -> None:
    sims.exchange.basic_auth_disabled = True
    wire = Wire(sims, sims.exchange.imap.port)
    wire.line()
    wire.send("a CAPABILITY")
    caps = wire.until("a ")[0]
    assert "AUTH=XOAUTH2 LOGINDISABLED" in caps and "AUTH=PLAIN" not in caps
    assert wire.ask("b LOGIN someone@example.test password") == "b NO LOGIN failed."
