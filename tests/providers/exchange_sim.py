"""Exchange Online IMAP / POP3 / SMTP simulator (a test double of outlook.office365.com).

Tokens are the Entra simulator's; the words are Exchange's (WIRE.md sections C, D, E): no JSON
challenge ever, ``NO AUTHENTICATE failed.``, "User is authenticated but not connected." for a
mailbox the principal cannot open, two-step POP3 AUTH, the 535 5.7.139 family, 535 5.7.3,
554 5.2.252 SendAsDenied after DATA, 432 4.3.2 above 3 SMTP sessions per mailbox, and
``* BYE Session invalidated - AccessTokenExpired`` when the token runs out mid-session.
Behind the front end is the test bed's Dovecot (see ``mailstore``).
"""

from __future__ import annotations

import base64
import ssl
from typing import Any

from tests.providers.entra_sim import EXCHANGE_RESOURCES, EntraSim
from tests.providers.mailfront import ConnectionCounter, Loop, MailServer, Verdict, header_from
from tests.providers.mailsessions import ImapSession, Pop3Session, SmtpSession
from tests.providers.mailstore import DovecotStore

BACKEND = "MN2PR01CA0007"
HOST = "SN2PR00CA0018.namprd00.prod.outlook.com"
IMAP_CAPS = (
    "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE "
    "NAMESPACE LITERAL+"
)
IMAP_CAPS_AUTHED = (
    "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES "
    "CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+"
)
SMTP_LIMIT = 3  # concurrent SMTP sessions per mailbox (EXO-THR)
NEEDS = {
    "imap": ("IMAP.AccessAsUser.All", "IMAP.AccessAsApp"),
    "pop3": ("POP.AccessAsUser.All", "POP.AccessAsApp"),
    "smtp": ("SMTP.Send", "SMTP.SendAsApp"),
}
SMTP_139 = {
    "smtp_auth_disabled_tenant": (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
    ),
    "smtp_auth_disabled": (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
    ),
    "security_defaults": (
        "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security "
        "defaults policy. Contact your administrator."
    ),
    "conditional_access": (
        "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        "authenticated successfully. Contact your administrator."
    ),
    "mfa_required": (
        "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        "authenticated successfully. Contact your administrator."
    ),
}


def host_tag(host: str = BACKEND) -> str:
    """The greeting's ``[...]``: the backend host name, UTF-16LE, base64."""
    return base64.b64encode(host.encode("utf-16-le")).decode()


class ExchangeImap(ImapSession):
    def greeting(self) -> str:
        return f"* OK The Microsoft Exchange IMAP4 service is ready. [{host_tag()}]"

    def capabilities(self) -> str:
        caps = IMAP_CAPS_AUTHED if self.verdict else IMAP_CAPS
        if self.sim.basic_auth_disabled:  # tenants without basic auth (imapflow#392)
            caps = caps.replace("AUTH=PLAIN AUTH=XOAUTH2", "AUTH=XOAUTH2 LOGINDISABLED")
        return caps

    def continuation(self) -> str:
        return "+"  # Exchange's FirstAuthenticateResponse: a bare "+"

    def logout(self, tag: str) -> list[str]:
        return [
            "* BYE Microsoft Exchange Server IMAP4 server signing off.",
            f"{tag} OK LOGOUT completed.",
        ]

    async def refuse(self, tag: str, verdict: Verdict) -> bool:
        if verdict.refusal == "not_connected":
            return await self.not_connected(tag)
        self.push(f"{tag} NO AUTHENTICATE failed.")
        return False

    async def not_connected(self, tag: str) -> bool:
        """Exchange accepts the login, then cannot open the mailbox: BAD to every command,
        and after the second one BYE and close."""
        self.push(f"{tag} OK AUTHENTICATE completed.")
        strikes = 0
        while True:
            line = await self.readline(timeout=1800)
            if line is None:
                return True
            tag, _, rest = line.partition(" ")
            if rest.upper() == "LOGOUT":
                self.push(*self.logout(tag))
                return True
            strikes += 1
            self.push(f"{tag} BAD User is authenticated but not connected.")
            if strikes >= 2:
                self.push("* BYE Connection closed. 14")
                return True

    def after_login(self) -> None:
        self.watch_expiry("* BYE Session invalidated - AccessTokenExpired")


class ExchangePop3(Pop3Session):
    def greeting(self) -> str:
        return f"+OK The Microsoft Exchange POP3 service is ready. [{host_tag()}]"

    def capa(self) -> list[str]:
        return ["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"]

    def accepted(self) -> str:
        return "+OK User successfully authenticated."

    def quit(self) -> str:
        return "+OK Microsoft Exchange Server POP3 server signing off."

    def basic_refused(self, verb: str) -> str:
        return "+OK" if verb == "USER" else "-ERR Logon failure: unknown user name or bad password."

    async def initial_response(self, blob: str) -> bool:
        # the initial response on the AUTH line reportedly fails (jakartaee/mail-api#461)
        self.push("-ERR Authentication failure: unknown user name or bad password.")
        return False

    async def refuse(self, verdict: Verdict) -> bool:
        self.push("-ERR Authentication failure: unknown user name or bad password.")
        return False


class ExchangeSmtp(SmtpSession):
    def greeting(self) -> str:
        return (
            f"220 {HOST.split('.')[0]}.outlook.office365.com Microsoft ESMTP MAIL Service ready "
            f"at {self.sim.now_text()} [08DDD30471EE4ED5]"
        )

    def ehlo(self, name: str) -> list[str]:
        middle = "250-AUTH LOGIN XOAUTH2" if self.tls else "250-STARTTLS"
        return [
            f"250-{HOST} Hello [{self.client_ip}]",
            "250-SIZE 157286400",
            "250-PIPELINING",
            "250-DSN",
            "250-ENHANCEDSTATUSCODES",
            middle,
            "250-8BITMIME",
            "250-BINARYMIME",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]

    def auth_before_tls(self) -> str:
        return f"504 5.7.4 Unrecognized authentication type [{HOST}]"

    def unknown_mechanism(self) -> str:
        return f"504 5.7.4 Unrecognized authentication type [{HOST}]"

    def not_authenticated(self) -> str:
        return "530 5.7.57 Client not authenticated to send mail."

    def queued(self, message_id: str) -> str:
        return f"250 2.0.0 OK {message_id} [Hostname={HOST.split('.')[0]}]"

    async def auth(self, args: str) -> bool:
        if args.upper().startswith("LOGIN") and self.tls:
            self.push(
                "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. ["
                + HOST
                + "]"
            )
            return False
        return await super().auth(args)

    async def refuse(self, verdict: Verdict) -> bool:
        if verdict.refusal in SMTP_139:
            self.push(SMTP_139[verdict.refusal])
        elif verdict.refusal == "too_many":
            self.push("432 4.3.2 Concurrent connections limit exceeded.")
            return True
        else:
            self.push(f"535 5.7.3 Authentication unsuccessful [{HOST}]")
        return False

    def send_refusal(self, message: bytes) -> str | None:
        assert self.verdict is not None
        sender = header_from(message) or self.sender or ""
        if self.sim.may_send_as(self.verdict, sender):
            return None
        user = self.verdict.principal
        return (
            f"554 5.2.252 SendAsDenied; {user} not allowed to send as {sender}; "
            "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
            "Failed to process message due to a permanent exception with message "
            f"[BeginDiagnosticData]Cannot submit message. [Hostname={HOST}]"
        )


class ExchangeSim:
    """The three Exchange front ends, deciding with the Entra simulator's directory."""

    def __init__(
        self, entra: EntraSim, store: DovecotStore, loop: Loop, tls: ssl.SSLContext
    ) -> None:
        self.entra = entra
        self.store = store
        self.clock = entra.clock
        self.connections = ConnectionCounter()
        self.sent: list[tuple[str, str, list[str]]] = []  # (principal, From, recipients)
        self.basic_auth_disabled = False  # IMAP shows LOGINDISABLED instead of AUTH=PLAIN
        self.imap = MailServer(loop, ExchangeImap, self, tls, implicit_tls=True)
        self.pop3 = MailServer(loop, ExchangePop3, self, tls, implicit_tls=True)
        self.smtp = MailServer(loop, ExchangeSmtp, self, tls, implicit_tls=False)

    def close(self) -> None:
        for server in (self.imap, self.pop3, self.smtp):
            server.close()

    def now_text(self) -> str:
        from email.utils import formatdate

        return formatdate(self.clock.now(), usegmt=False).replace("-0000", "+0000")

    def sessions_started(self, session: Any, protocol: str) -> None:
        self.connections.started(session, protocol)

    def sessions_ended(self, session: Any) -> None:
        self.connections.ended(session)

    def check_login(self, protocol: str, sasl_user: str, token: str) -> Verdict:
        """Exchange's decision about an XOAUTH2 login (blocking; runs in a thread)."""
        claims = self.entra.validate(token)
        if claims is None or claims.get("exp", 0) <= self.clock.now():
            return Verdict(False)
        if str(claims.get("aud", "")).rstrip("/") not in EXCHANGE_RESOURCES:
            return Verdict(False)  # a Graph token, say
        delegated, app_role = NEEDS[protocol]
        app_only = claims.get("idtyp") == "app"
        if app_only:
            if app_role not in claims.get("roles", []):
                return Verdict(False)
            principal = str(claims["appid"]).lower()
        else:
            if delegated not in str(claims.get("scp", "")).split():
                return Verdict(False)
            principal = str(claims.get("upn", "")).lower()
        mailbox = self.entra.user(sasl_user)
        me = self.entra.user(principal) if not app_only else None
        expires = float(claims["exp"])
        ok = Verdict(True, mailbox=sasl_user.lower(), principal=principal, expires_at=expires)
        if protocol == "smtp":
            who = me if me is not None else mailbox
            for situation in SMTP_139:
                if who is not None and situation in who.situations:
                    return Verdict(False, situation)
            if mailbox is None or (not app_only and sasl_user.lower() != principal):
                return Verdict(
                    False
                )  # SMTP logs in as the delegate; the shared address goes in From
            if app_only and principal not in mailbox.full_access | mailbox.send_as:
                return Verdict(False)
            if self.connections.active("smtp", sasl_user) >= SMTP_LIMIT:
                return Verdict(False, "too_many")
            return ok
        can_open = mailbox is not None and (
            (not app_only and sasl_user.lower() == principal) or principal in mailbox.full_access
        )
        if app_only and not can_open:
            return Verdict(False)  # no New-ServicePrincipal / Add-MailboxPermission
        situations = mailbox.situations if mailbox else set()
        if protocol == "imap":
            if not can_open or {"imap_disabled", "no_permission"} & situations:
                return Verdict(False, "not_connected")
            return ok
        if not can_open or {"pop_disabled", "no_permission"} & situations:
            return Verdict(False)
        return ok

    def may_send_as(self, verdict: Verdict, sender: str) -> bool:
        sender = sender.lower()
        if sender == verdict.principal or sender == verdict.mailbox:
            return True
        target = self.entra.user(sender)
        return target is not None and verdict.principal in target.send_as
