"""The mail proxy with the app's own Backend, in front of the real peers.

Mailboxes are linked through the product's own code (``linking``: Client Credentials, or
Authorization Code with the OAuth server's login and consent forms played over HTTP); the proxy
is ``mailbackend.MailProxyService`` on the same app, so the passwords, auth cache, throttling,
tokens and accounting are the ones users get. Mail clients are the stdlib's.
"""

from __future__ import annotations

import base64
import datetime as dt
import imaplib
import logging
import re
import secrets
import smtplib
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playhouse.shortcuts import model_to_dict

from mailboxes import mailbackend
from mailboxes.mailbackend import MailProxyService
from mailproxy.settings import LISTENER_NAMES
from models import Account, AuditEvent, MailPassword, User, utcnow
from oauth import clients as oauth_clients
from oauth import tokens
from tests.helpers.mail import (
    PASSWORD,
    PUBLIC,
    WORDS,
    WRONG,
    MailClients,
    account_row,
    closed_port,
    link_with_client_credentials,
    link_with_code,
    message,
    metric,
    read_first_message,
    wait_for_accounting,
    wait_until,
)
from tests.helpers.web import post_form

pytestmark = pytest.mark.peers


# ---------------------------------------------------------------------------- reading and sending


@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_imap_reads_the_seeded_message_with_the_mail_password(
    owner: User, peers: Any, mail: MailClients, listener: str
) -> None:
    account = link_with_client_credentials(owner, peers, f"app-{listener}")

    conn = mail.imap(account.address, PASSWORD, listener)
    body = read_first_message(conn)
    conn.logout()

    assert b"Subject: Seed message 1" in body


@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
def test_pop3_reads_the_seeded_message_with_the_mail_password(
    owner: User, peers: Any, mail: MailClients, listener: str
) -> None:
    account = link_with_client_credentials(owner, peers, f"app-{listener}")

    conn = mail.pop3(account.address, PASSWORD, listener)
    count, _ = conn.stat()
    lines = conn.retr(1)[1]
    conn.quit()

    assert count == 2
    assert b"Subject: Seed message 1" in lines


@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_smtp_sends_a_message_that_arrives(
    owner: User, peers: Any, mail: MailClients, listener: str
) -> None:
    account = link_with_client_credentials(owner, peers, f"app-{listener}")
    subject = f"through the app {secrets.token_hex(4)}"

    conn = mail.smtp(account.address, PASSWORD, listener)
    conn.send_message(message(account.address, subject))
    conn.quit()

    assert peers.wait_for_message(account.address, subject)


# ---------------------------------------------------------------------------------- passwords


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_wrong_password_is_refused_in_the_protocols_words(
    owner: User, peers: Any, mail: MailClients, protocol: str
) -> None:
    account = link_with_client_credentials(owner, peers, f"wrong-{protocol}")

    said = mail.refusal(protocol, account.address, WRONG)

    assert WORDS["credentials"][protocol] in said
    mail.flush()
    failed = AuditEvent.get(AuditEvent.action == "mail.login_failed")
    assert (failed.target, failed.detail, failed.ip) == (account.address, protocol, "127.0.0.1")


def test_unknown_address_is_refused_like_a_wrong_password(mail: MailClients) -> None:
    said = mail.refusal("imap", "nobody-here@example.test", PASSWORD)
    assert WORDS["credentials"]["imap"] in said


def test_revoked_password_is_refused_at_once_though_the_auth_cache_had_it(
    app: Flask, owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    account = link_with_client_credentials(owner, peers, "revoked")
    mail.imap(account.address, PASSWORD).logout()  # now in the auth cache
    assert mail.service.backend.cache.get(account.address, PASSWORD) is not None
    row = MailPassword.get(MailPassword.account == account)

    answer = post_form(
        web,
        f"/accounts/{account.id}/passwords/{row.id}/revoke",
        {},
        form_page=f"/accounts/{account.id}",
    )

    assert answer.status_code == 302
    for protocol in ("imap", "pop3", "smtp"):
        assert WORDS["credentials"][protocol] in mail.refusal(protocol, account.address, PASSWORD)


def test_a_second_device_password_works_too_and_each_shows_its_last_use(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    account = link_with_client_credentials(owner, peers, "devices")
    phone = "phone-" + secrets.token_hex(6)
    added = post_form(
        web,
        f"/accounts/{account.id}/passwords",
        {"label": "Phone", "password": phone, "confirm": phone},
        form_page=f"/accounts/{account.id}",
    )
    assert added.status_code == 302

    read_first_message(mail.imap(account.address, PASSWORD))
    conn = mail.pop3(account.address, phone)
    assert conn.stat()[0] == 2
    conn.quit()
    mail.flush()

    used = {p.label: p for p in MailPassword.select().where(MailPassword.account == account)}
    assert set(used) == {"Laptop", "Phone"}
    for row in used.values():
        assert row.last_used_at is not None and row.last_used_ip == "127.0.0.1"
    page = web.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert page.count("from 127.0.0.1") >= 3  # the account, and each of the two passwords


def test_warm_login_skips_the_hash_but_a_changed_password_is_refused(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = link_with_client_credentials(owner, peers, "warm")
    hashed: list[str] = []
    real = mailbackend.verify_password

    def counting(stored: str | None, password: str) -> bool:
        hashed.append(password)
        return real(stored, password)

    monkeypatch.setattr(mailbackend, "verify_password", counting)

    mail.imap(account.address, PASSWORD).logout()
    cold = len(hashed)
    mail.imap(account.address, PASSWORD).logout()
    mail.pop3(account.address, PASSWORD).quit()
    warm = len(hashed) - cold

    # The user replaces the password: a new one added, the old one revoked.
    new = "new-laptop-" + secrets.token_hex(6)
    post_form(
        web,
        f"/accounts/{account.id}/passwords",
        {"label": "New laptop", "password": new, "confirm": new},
        form_page=f"/accounts/{account.id}",
    )
    old = MailPassword.get((MailPassword.account == account) & (MailPassword.label == "Laptop"))
    post_form(
        web,
        f"/accounts/{account.id}/passwords/{old.id}/revoke",
        {},
        form_page=f"/accounts/{account.id}",
    )
    before_refusal = len(hashed)
    said = mail.refusal("imap", account.address, PASSWORD)
    mail.imap(account.address, new).logout()

    assert cold >= 1 and warm == 0
    assert WORDS["credentials"]["imap"] in said
    assert len(hashed) > before_refusal  # the stale cache entry led to a real check


def test_failed_logins_throttle_the_address_with_a_retry_time_and_lift(
    owner: User, peers: Any, mail: MailClients
) -> None:
    account = link_with_client_credentials(owner, peers, "throttled")
    other = link_with_client_credentials(owner, peers, "bystander")
    for _ in range(3):  # LOGIN_FAILURE_LIMIT
        assert WORDS["credentials"]["imap"] in mail.refusal("imap", account.address, WRONG)

    said = {p: mail.refusal(p, account.address, PASSWORD) for p in ("imap", "pop3", "smtp")}
    mail.imap(other.address, PASSWORD).logout()  # per address: others are not blocked

    for protocol, text in said.items():
        assert WORDS["unavailable"][protocol] in text, text
        assert "Too many failed logins" in text
    wait = int(re.search(r"retry in (\d+) seconds", said["imap"]).group(1))  # type: ignore[union-attr]
    assert 1 <= wait <= 7

    def lifted() -> bool:
        try:
            mail.imap(account.address, PASSWORD).logout()
        except imaplib.IMAP4.error:
            time.sleep(0.5)  # still blocked (a blocked attempt does not count as a failure)
            return False
        return True

    wait_until(lifted, timeout=wait + 30, what="the block to lift")


# ---------------------------------------------------------------------------------- account state


def test_needs_reauthorization_names_the_page_keeps_tokens_and_shows_on_the_accounts_page(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    # Access tokens of 30 s are never fresh enough (60 s margin): each login refreshes.
    account = link_with_code(owner, peers, "reauth", access_token_ttl=30)
    mail.imap(account.address, PASSWORD).logout()  # works, with a refresh behind it
    kept = Account.get_by_id(account.id)
    peers.revoke_grants(email=account.address)

    said = {p: mail.refusal(p, account.address, PASSWORD) for p in ("imap", "pop3", "smtp")}

    page_url = f"{PUBLIC}/accounts/{account.id}"
    for protocol, text in said.items():
        assert WORDS["reauth"][protocol] in text and page_url in text, text
    assert "invalid_grant" in said["imap"]
    after = Account.get_by_id(account.id)
    assert after.status == "needs_reauth"
    assert after.refresh_token == kept.refresh_token  # kept until a new authorization
    assert after.access_token == kept.access_token
    page = web.get("/").get_data(as_text=True)
    assert "needs re-authorization" in page
    assert "Needs re-authorization" in account_row(page, account)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_upstream_down_is_unavailable_naming_the_server(
    owner: User, peers: Any, mail: MailClients, protocol: str
) -> None:
    account = link_with_client_credentials(owner, peers, f"down-{protocol}")
    port = closed_port()
    client = account.client
    values = {name: getattr(client, name) for name in oauth_clients.EDITABLE}
    values.update({f"{p}_port": port for p in ("imap", "pop3", "smtp")})
    oauth_clients.save_client(owner, values, client=client)  # the admin points it at a dead server

    said = mail.refusal(protocol, account.address, PASSWORD)

    assert WORDS["unavailable"][protocol] in said and str(port) in said, said
    assert Account.get_by_id(account.id).status == "active"  # nothing for the user to fix


# ---------------------------------------------------------------------------------- accounting


def test_a_session_is_accounted_on_the_accounts_page_and_in_the_audit_log(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    account = link_with_client_credentials(owner, peers, "accounting")
    assert account.last_used_at is None and account.bytes_relayed == 0
    assert "never" in account_row(web.get("/").get_data(as_text=True), account)

    conn = mail.imap(account.address, PASSWORD)
    read_first_message(conn)
    wait_until(
        lambda: (
            "Mail sessions open</th><td>1<"
            in web.get(f"/accounts/{account.id}").get_data(as_text=True)
        ),
        what="the open session on the account page",
    )
    assert "· 1 open" in account_row(web.get("/").get_data(as_text=True), account)
    conn.logout()
    mail.refusal("smtp", account.address, WRONG)

    used = wait_for_accounting(account)
    assert used.last_used_at is not None and used.last_used_ip == "127.0.0.1"
    assert used.bytes_relayed > 200  # at least the message it read
    row = account_row(web.get("/").get_data(as_text=True), account)
    assert "from 127.0.0.1" in row and "never" not in row
    assert "0 bytes" not in row and re.search(r"\d+(\.\d)? (bytes|kB)", row)
    detail = web.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "from 127.0.0.1" in detail
    assert "Mail sessions open</th><td>0<" in detail

    mail.flush()
    login = AuditEvent.get(AuditEvent.action == "mail.login")
    assert (login.target, login.detail, login.ip) == (account.address, "imap", "127.0.0.1")
    assert login.actor_id == owner.id
    assert AuditEvent.get(AuditEvent.action == "mail.login_failed").detail == "smtp"
    for event in AuditEvent.select():
        text = " ".join(str(v) for v in model_to_dict(event, recurse=False).values())
        assert PASSWORD not in text and WRONG not in text
    audit_page = web.get("/admin/audit").get_data(as_text=True)
    assert "mail.login" in audit_page and PASSWORD not in audit_page


def test_metrics_move_after_a_proxied_session(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    account = link_with_client_credentials(owner, peers, "metrics")

    def snapshot() -> dict[str, float]:
        return {
            "ok": metric(web, "mailproxy_logins_total", protocol="imap", result="ok"),
            "failed": metric(web, "mailproxy_logins_total", protocol="imap", result="credentials"),
            "in": metric(web, "mailproxy_relayed_bytes_total", protocol="imap", direction="in"),
            "out": metric(web, "mailproxy_relayed_bytes_total", protocol="imap", direction="out"),
            "open": metric(web, "mailproxy_sessions_open", protocol="imap"),
        }

    before = snapshot()
    conn = mail.imap(account.address, PASSWORD)
    during = snapshot()
    read_first_message(conn)
    conn.logout()
    mail.refusal("imap", account.address, WRONG)
    wait_for_accounting(account)
    after = wait_until(
        lambda: (s := snapshot())["open"] == before["open"] and s, what="sessions to close"
    )

    assert during["open"] == before["open"] + 1
    assert during["ok"] == before["ok"] + 1
    assert after["ok"] == before["ok"] + 1
    assert after["failed"] == before["failed"] + 1
    assert after["in"] > before["in"] and after["out"] > before["out"] + 200
    text = web.get("/metrics").get_data(as_text=True)
    assert account.address not in text and PASSWORD not in text


def test_a_whole_session_at_debug_level_logs_no_password_and_no_token(
    owner: User,
    peers: Any,
    mail: MailClients,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in [None, *logging.root.manager.loggerDict]:
        caplog.set_level(logging.DEBUG, logger=name)
    handed_out: list[str] = []
    real_get = tokens.get_access_token

    def recording(account_id: int, force_refresh: bool = False) -> str:
        token = real_get(account_id, force_refresh=force_refresh)
        handed_out.append(token)
        handed_out.append(str(Account.get_by_id(account_id).refresh_token))
        return token

    monkeypatch.setattr(tokens, "get_access_token", recording)
    # Linking inside the capture too: code exchange, verification, rotating refreshes.
    account = link_with_code(owner, peers, "debuglog", access_token_ttl=30)
    linked = Account.get_by_id(account.id)
    handed_out += [str(linked.access_token), str(linked.refresh_token)]
    address = account.address

    def expire() -> None:  # each login renews the token (with rotation) inside the capture
        Account.update(token_expires_at=utcnow() - dt.timedelta(minutes=1)).where(
            Account.id == account.id
        ).execute()

    expire()
    read_first_message(mail.imap(address, PASSWORD, "imaps"))
    expire()
    conn = imaplib.IMAP4("127.0.0.1", mail.port("imap"), timeout=20)
    conn.starttls(ssl_context=mail.tls())
    conn.authenticate("PLAIN", lambda _: f"\0{address}\0{PASSWORD}".encode())
    conn.logout()
    expire()
    pop = mail.pop3(address, PASSWORD)
    pop.retr(1)
    pop.quit()
    expire()
    smtp = smtplib.SMTP("127.0.0.1", mail.port("submission"), timeout=20)
    smtp.starttls(context=mail.tls())
    smtp.ehlo()
    smtp.user, smtp.password = address, PASSWORD
    smtp.auth("LOGIN", smtp.auth_login)
    smtp.send_message(message(address, f"debug log {secrets.token_hex(4)}"))
    smtp.quit()
    mail.refusal("imap", address, WRONG)
    wait_for_accounting(account)
    final = Account.get_by_id(account.id)
    handed_out += [str(final.access_token), str(final.refresh_token)]

    text = caplog.text
    assert "LOGIN ****" in text or "AUTHENTICATE XOAUTH2 ****" in text  # the talk is logged
    assert len(set(handed_out)) >= 6  # several refreshes with rotation happened
    forbidden = {PASSWORD, WRONG, account.client.client_secret}
    forbidden.add(base64.b64encode(f"\0{address}\0{PASSWORD}".encode()).decode())
    forbidden.add(base64.b64encode(PASSWORD.encode()).decode())
    for token in set(handed_out):
        forbidden.add(token)
        raw = f"user={address}\x01auth=Bearer {token}\x01\x01".encode()
        forbidden.add(base64.b64encode(raw).decode())
    leaked = [s[:12] + "..." for s in forbidden if s and s in text]
    assert not leaked, f"secrets in the DEBUG log: {leaked}"


# ---------------------------------------------------------------------------------- health


def test_healthz_is_ok_while_the_proxy_runs_and_503_after_it_stops(app: Flask) -> None:
    web = app.test_client()
    service = MailProxyService(app)
    service.start()
    try:
        running = web.get("/healthz")
    finally:
        service.stop()
    stopped = web.get("/healthz")

    assert running.status_code == 200, running.get_json()
    checks = running.get_json()["checks"]
    assert checks == {"database": True, **dict.fromkeys(LISTENER_NAMES, True)}
    assert stopped.status_code == 503
    assert stopped.get_json()["checks"]["imap"] is False


def test_mail_client_settings_show_the_ports_the_proxy_listens_on(
    owner: User, peers: Any, mail: MailClients, web: FlaskClient
) -> None:
    account = link_with_client_credentials(owner, peers, "settings")
    page = web.get(f"/accounts/{account.id}/mail-client").get_data(as_text=True)
    for listener in LISTENER_NAMES:
        assert re.search(rf"<td[^>]*>{mail.port(listener)}</td>", page), listener
