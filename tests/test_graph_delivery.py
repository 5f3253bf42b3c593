"""SMTP through Microsoft Graph when a tenant turns SMTP AUTH off: devices (``smtplib``,
``msmtp``, a raw line client) send through the proxy, Graph's ``sendMail`` simulator delivers
into the test bed's Dovecot, and the messages are read back there (Bcc included, Sent copy).
"""

from __future__ import annotations

import re
import secrets
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mailboxes import linking
from mailboxes.mailbackend import MailProxyService
from models import Account, AuditEvent, User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, make_app
from tests.helpers.graph import PASSWORD, mailbox
from tests.helpers.mail import EVERY_LISTENER_ON_A_FREE_PORT, MailClients
from tests.helpers.sims import PUBLIC
from tests.helpers.web import AuthActions, post_form
from tests.providers.plugin import ProviderSims

pytestmark = pytest.mark.peers


@pytest.fixture
def app(instance: Path, sim_settings: dict[str, Any]) -> Flask:
    app = make_app(
        instance,
        **sim_settings,
        PUBLIC_URL=PUBLIC,
        LOGIN_FAILURE_LIMIT_PER_IP=1000,
        GRAPH_TIMEOUT=2,
        GRAPH_ATTEMPTS=2,
        GRAPH_BACKOFF=0.1,
        **EVERY_LISTENER_ON_A_FREE_PORT,
    )
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


@pytest.fixture
def mail(app: Flask) -> Iterator[MailClients]:
    proxy = MailProxyService(app)
    proxy.start()
    yield MailClients(app, proxy)
    proxy.stop()
    assert proxy.controller.errors == 0, "an unexpected exception reached the proxy"


def message(sender: str, to: str, subject: str, body: str = "Scanned page attached.\n") -> Any:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def sent_folder_has(sims: ProviderSims, address: str, subject: str) -> bool:
    return sims.peers.wait_for_message(address, subject, mailbox="Sent")


def test_a_scanner_sends_through_graph_when_the_tenant_refuses_smtp_auth(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "graph", "smtp_auth_disabled_tenant")
    cc = sims.entra_user("cc", seed=1).email
    bcc = sims.entra_user("bcc", seed=1).email
    subject = f"scan-{time.time_ns()}"
    msg = message(user.email, user.email, subject, "Grüße vom Scanner.\n")
    msg["Cc"] = cc
    msg["Bcc"] = bcc
    smtp = mail.smtp(user.email, PASSWORD)
    refused = smtp.send_message(msg)  # smtplib takes Bcc into RCPT TO and drops the header
    smtp.quit()
    assert refused == {}
    for rcpt in (user.email, cc, bcc):
        assert sims.peers.wait_for_message(rcpt, subject), rcpt
    assert sent_folder_has(sims, user.email, subject)
    mailbox_, sender, recipients = sims.graph.sent[-1]
    assert (mailbox_, sender) == (user.email, user.email)
    assert sorted(recipients) == sorted([user.email, cc, bcc])
    arrived = sims.peers.doveadm(
        "fetch", "-u", cc, "text", "mailbox", "INBOX", "header", "subject", subject
    )
    assert "Grüße vom Scanner" in arrived or "R3L" in arrived or "=C3=BC" in arrived
    assert bcc not in arrived  # the Bcc header is not delivered
    with app.app_context():
        page = AuthActions(app, app.test_client())
        web = page.client
        page.login()
        account = Account.get(Account.address == user.email)
        html = web.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "through Microsoft Graph" in html


def test_an_expired_graph_token_is_renewed_once_and_the_message_still_goes(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "graph", "smtp_auth_disabled_tenant")
    smtp = mail.smtp(user.email, PASSWORD)
    smtp.send_message(message(user.email, user.email, f"first-{time.time_ns()}"))
    calls = len(sims.graph.calls)
    sims.entra.clock.advance(6 * 3600)  # Graph now sees the stored token as expired
    subject = f"renewed-{time.time_ns()}"
    smtp.send_message(message(user.email, user.email, subject))
    smtp.quit()
    assert sims.peers.wait_for_message(user.email, subject)
    statuses = [c[2] for c in sims.graph.calls[calls:] if c[1].endswith("/sendMail")]
    assert statuses == [401, 202]


def test_msmtp_sends_through_graph(
    app: Flask, sims: ProviderSims, mail: MailClients, tmp_path: Path
) -> None:
    if shutil.which("msmtp") is None:
        pytest.fail("msmtp is missing: apt-get install msmtp")
    user = mailbox(app, sims, "graph", "smtp_auth_disabled")
    other = sims.entra_user("to", seed=1).email
    subject = f"msmtp-{time.time_ns()}"
    config = tmp_path / "msmtprc"
    config.write_text(
        "account scanner\n"
        "host 127.0.0.1\n"
        f"port {mail.port('submission')}\n"
        "auth plain\n"
        f"user {user.email}\n"
        f"password {PASSWORD}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {mail.cert}\n"
        "tls_certcheck off\n"
        f"from {user.email}\n"
        "account default : scanner\n"
    )
    config.chmod(0o600)
    text = f"From: {user.email}\nTo: {other}\nSubject: {subject}\n\nScan from msmtp.\n"
    hidden = sims.entra_user("mbcc", seed=1).email
    done = subprocess.run(
        ["msmtp", "-C", str(config), "--", other, hidden],
        input=text.encode(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert sims.peers.wait_for_message(hidden, subject)  # an envelope-only (Bcc) recipient
    assert sims.peers.wait_for_message(other, subject)
    assert sent_folder_has(sims, user.email, subject)


def test_automatic_mode_switches_to_graph_after_the_first_5_7_139(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "auto", "smtp_auth_disabled_tenant")
    sent_before = len(sims.exchange.sent)
    for n in (1, 2):
        subject = f"auto-{n}-{time.time_ns()}"
        smtp = mail.smtp(user.email, PASSWORD)
        smtp.send_message(message(user.email, user.email, subject))
        smtp.quit()
        assert sims.peers.wait_for_message(user.email, subject)
    assert len(sims.exchange.sent) == sent_before
    assert [s for s in sims.graph.sent if s[0] == user.email][-1][0] == user.email
    mail.flush()
    with app.app_context():
        account = Account.get(Account.address == user.email)
        assert account.status == "active"
        assert account.smtp_auth_refused_at is not None
        assert "5.7.139" in account.smtp_auth_refused_detail
        switched = AuditEvent.get(AuditEvent.action == "mail.smtp_auth_refused")
        assert (switched.actor_email, switched.target) == (ADMIN_EMAIL, user.email)
        assert switched.detail == "switched to Microsoft Graph"
        sent = list(AuditEvent.select().where(AuditEvent.action == "mail.sent_via_graph"))
        assert [(e.actor_email, e.target) for e in sent] == [(ADMIN_EMAIL, user.email)] * 2
        assert all(re.fullmatch(r"1 recipients, \d{3,} bytes", e.detail) for e in sent), sent
        page = AuthActions(app, app.test_client())
        page.login()
        html = page.client.get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "The tenant refused SMTP AUTH on" in html
    assert "through Microsoft Graph" in html


def test_smtp_auth_mode_explains_a_refusal_by_policy_and_keeps_the_account(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "smtp", "smtp_auth_disabled_tenant")
    said = mail.refusal("smtp", user.email, PASSWORD)
    # Refused for SMTP only, with the fix an Exchange administrator applies.
    assert said.startswith("535") and "SmtpClientAuthenticationDisabled $false" in said, said
    mail.flush()  # the audit row is bookkeeping, written after the reply
    with app.app_context():
        account = Account.get(Account.address == user.email)
        assert account.status == "active"  # a tenant policy: re-authorizing cannot help
        assert account.smtp_auth_refused_at is not None
        event = AuditEvent.get(AuditEvent.action == "mail.smtp_auth_refused")
        assert event.detail.startswith("mail server: 535 5.7.139 Authentication"), event.detail


def test_the_account_page_chooses_graph_and_checks_it_without_sending(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "smtp")
    other = mailbox(app, sims, "smtp", admin_consented={("exchange", "SMTP.Send")})
    web = app.test_client()
    AuthActions(app, web).login()
    with app.app_context():
        ids = {u.email: Account.get(Account.address == u.email).id for u in (user, other)}
    page = f"/accounts/{ids[user.email]}"
    assert "goes out over SMTP AUTH" in web.get(page).get_data(as_text=True)
    chosen = post_form(web, f"{page}/delivery", {"mode": "graph"}, form_page=page)
    assert chosen.status_code == 302
    sends = len(sims.graph.sent)
    checked = post_form(web, f"{page}/delivery/test", {}, form_page=page, follow_redirects=True)
    html = checked.get_data(as_text=True)
    assert f"Microsoft Graph knows {user.email}" in html
    assert "goes out through Microsoft Graph" in html
    assert ("GET", f"/v1.0/users/{user.email}", 200) in sims.graph.calls
    assert len(sims.graph.sent) == sends  # nothing was sent
    assert post_form(web, f"{page}/delivery", {"mode": "fax"}, form_page=page).status_code == 400

    # an app without Graph's Mail.Send: the check (and a device) says which permission to add
    page = f"/accounts/{ids[other.email]}"
    post_form(web, f"{page}/delivery", {"mode": "graph"}, form_page=page)
    html = post_form(
        web, f"{page}/delivery/test", {}, form_page=page, follow_redirects=True
    ).get_data(as_text=True)
    assert "Microsoft Graph check failed" in html and "Mail.Send" in html
    smtp = mail.smtp(other.email, PASSWORD)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.send_message(message(other.email, other.email, "no permission"))
    assert refused.value.smtp_code == 550 and b"Mail.Send" in refused.value.smtp_error
    smtp.quit()


# ---------------------------------------------------------------------------------- bad input


class RawSMTP:
    """A line client over the plain-text submission port (loopback), to send exact bytes."""

    def __init__(self, port: int, address: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220")
        self.command("EHLO scanner")
        import base64

        blob = base64.b64encode(f"\0{address}\0{password}".encode()).decode()
        assert self.command(f"AUTH PLAIN {blob}").startswith("235")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            lines.append(line.strip())
            if line[3:4] != "-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, sender: str, rcpt: str, data: bytes, params: str = "") -> str:
        assert self.command(f"MAIL FROM:<{sender}>{params}").startswith("250")
        assert self.command(f"RCPT TO:<{rcpt}>").startswith("250")
        assert self.command("DATA").startswith("354")
        self.sock.sendall(data)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_bad_input_gets_protocol_correct_replies(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    user = mailbox(app, sims, "graph", "smtp_auth_disabled_tenant")
    boss = sims.entra_user("boss", seed=1).email
    smtp = mail.smtp(user.email, PASSWORD)

    # 40 MB: smtplib announces SIZE, refused at MAIL before any byte of it is sent
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 40_000
    with pytest.raises(smtplib.SMTPSenderRefused) as too_big:
        smtp.sendmail(user.email, [user.email], big)
    assert too_big.value.smtp_code == 552 and b"at most" in too_big.value.smtp_error

    # a From the mailbox may not send as: 550 5.7.60 with the fix
    smtp.rset()
    with pytest.raises(smtplib.SMTPDataError) as send_as:
        smtp.send_message(message(boss, user.email, "not mine"))
    assert send_as.value.smtp_code == 550
    assert b"5.7.60" in send_as.value.smtp_error
    assert b"Add-RecipientPermission" in send_as.value.smtp_error
    assert f"may not send as {boss}".encode() in send_as.value.smtp_error  # the envelope's

    # Graph throttles: 451 4.7.0 with when to try again
    sims.entra.situation(user.email, "graph_throttled")
    with pytest.raises(smtplib.SMTPDataError) as throttled:
        smtp.send_message(message(user.email, user.email, "throttled"))
    assert throttled.value.smtp_code == 451 and b"try again in 30 seconds" in (
        throttled.value.smtp_error
    )
    sims.entra.situation(user.email, "graph_throttled", clear=True)

    # Graph answers 503 every time: a bounded number of attempts, then 451
    calls = len(sims.graph.calls)
    sims.graph.faults.add("unavailable", retry_after=0)
    with pytest.raises(smtplib.SMTPDataError) as unavailable:
        smtp.send_message(message(user.email, user.email, "graph-503"))
    assert unavailable.value.smtp_code == 451 and b"after 2 attempts" in (
        unavailable.value.smtp_error
    )
    assert len(sims.graph.calls) - calls == 2
    sims.graph.faults.clear()

    # Graph hangs: one attempt (it may have been sent), then 451 after the timeout
    calls = len(sims.graph.calls)
    sims.graph.faults.add("hang", hang=4)
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPDataError) as hung:
        smtp.send_message(message(user.email, user.email, "graph-hangs"))
    assert hung.value.smtp_code == 451 and b"did not confirm" in hung.value.smtp_error
    assert time.monotonic() - started < 4
    sims.graph.faults.clear()
    time.sleep(3)  # let the simulator finish the hung request before counting
    assert len([c for c in sims.graph.calls[calls:] if c[1].endswith("sendMail")]) <= 1

    # the session still works afterwards
    subject = f"after-faults-{time.time_ns()}"
    smtp.send_message(message(user.email, user.email, subject))
    smtp.quit()
    assert sims.peers.wait_for_message(user.email, subject)
    for lost in ("graph-503", "not mine"):
        assert not sims.peers.wait_for_message(user.email, lost, timeout=0.5)

    raw = RawSMTP(mail.port("submission"), user.email, PASSWORD)
    # bare LF line ends: taken as line ends, the message arrives
    subject = f"bare-lf-{time.time_ns()}"
    data = f"From: {user.email}\nTo: {user.email}\nSubject: {subject}\n\nline one\n..dot\n.\n"
    assert raw.send(user.email, user.email, data.encode()).startswith("250 2.0.0")
    assert sims.peers.wait_for_message(user.email, subject)
    # 8BITMIME and SMTPUTF8: raw UTF-8 in the header and an 8bit body arrive unchanged
    subject = f"Grüße-{time.time_ns()}"
    data = (
        f"From: {user.email}\r\nTo: {user.email}\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nÄrger über Öl: 8 bit.\r\n.\r\n"
    )
    assert raw.send(user.email, user.email, data.encode(), " BODY=8BITMIME SMTPUTF8").startswith(
        "250 2.0.0"
    )
    assert sims.peers.wait_for_message(user.email, subject)
    fetched = sims.peers.doveadm(
        "fetch", "-u", user.email, "text", "mailbox", "INBOX", "header", "subject", subject
    )
    assert "Ärger über Öl: 8 bit." in fetched
    # 5 MB without SIZE: read to its end, then 552; nothing reaches Graph
    sent = len(sims.graph.sent)
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 5_000 + b".\r\n"
    assert raw.send(user.email, user.email, body).startswith("552 5.3.4")
    assert len(sims.graph.sent) == sent
    assert raw.command("QUIT").startswith("221")
    raw.close()

    # the device goes away in the middle of DATA: nothing is sent
    raw = RawSMTP(mail.port("submission"), user.email, PASSWORD)
    assert raw.command(f"MAIL FROM:<{user.email}>").startswith("250")
    assert raw.command(f"RCPT TO:<{user.email}>").startswith("250")
    assert raw.command("DATA").startswith("354")
    raw.sock.sendall(b"Subject: cut short\r\n\r\nhalf a message")
    raw.close()
    time.sleep(0.5)
    assert len(sims.graph.sent) == sent


def test_client_credentials_send_through_graph_with_the_application_permission(
    app: Flask, sims: ProviderSims, mail: MailClients
) -> None:
    """App-only: the Graph token comes from Client Credentials for graph.microsoft.com/.default."""
    from oauth import clients as oauth_clients
    from oauth import providers

    entra_app = sims.entra.add_app()
    user = sims.entra_user("apponly", seed=1)
    sims.entra.situation(user.email, "smtp_auth_disabled_tenant")
    sims.entra.grant_full_access(user.email, entra_app.client_id)
    grant, tenant = "client_credentials", sims.entra.tenant.id
    with app.app_context():
        owner = User.get(User.email == ADMIN_EMAIL)
        values = {
            "name": f"app-only {secrets.token_hex(3)}",
            "provider": "microsoft365",
            "grant": grant,
            "tenant": tenant,
            **providers.defaults_for("microsoft365", grant, tenant),
            "revocation_url": "",
            "client_id": entra_app.client_id,
            "secret_expires_on": None,
            "sasl_mechanism": "XOAUTH2",
            "smtp_delivery": "auto",
        }
        client = oauth_clients.save_client(owner, values, str(entra_app.secret))
        linked = linking.start(owner, user.email, client, PUBLIC + "/authorize")
        assert linked.done is not None and linked.done.ok, linked.done
        linking.add_password(owner, Account.get(Account.address == user.email), "Scanner", PASSWORD)
    subject = f"app-only-{time.time_ns()}"
    smtp = mail.smtp(user.email, PASSWORD)
    smtp.send_message(message(user.email, user.email, subject))
    smtp.quit()
    assert sims.peers.wait_for_message(user.email, subject)
    assert sims.entra.requests.count(client_id=entra_app.client_id, grant_type=grant) >= 2
