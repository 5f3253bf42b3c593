"""Gmail IMAP / POP3 / SMTP front ends (a test double of imap/pop/smtp.gmail.com).

What WIRE.md F2-F4 has: greetings and capabilities, a failed XOAUTH2 login answered with a
base64 JSON challenge that the client answers with an empty line, the 16th simultaneous IMAP
session refused, SMTP rewriting a From the account may not use. The decisions come from
:class:`tests.providers.google_sim.GoogleSim` (``check_login``, ``account``).
"""

from __future__ import annotations

import base64
import json
import secrets
from email.parser import BytesParser
from email.policy import SMTP
from email.utils import getaddresses

from tests.providers.mailfront import Verdict
from tests.providers.mailsessions import ImapSession, Pop3Session, SmtpSession

MAIL_SCOPE = "https://mail.google.com/"
CHALLENGE = base64.b64encode(
    json.dumps(
        {"status": "400", "schemes": "Bearer", "scope": MAIL_SCOPE}, separators=(",", ":")
    ).encode()
).decode()
IMAP_CAPS = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR "
    "AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER AUTH=XOAUTH"
)
IMAP_CAPS_AUTHED = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS "
    "COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS "
    "LITERAL- SPECIAL-USE APPENDLIMIT=35651584"
)


def sid() -> str:
    return secrets.token_hex(8)[:14]


class GmailImap(ImapSession):
    def greeting(self) -> str:
        return f"* OK Gimap ready for requests from {self.client_ip} {sid()}"

    def capabilities(self) -> str:
        return IMAP_CAPS_AUTHED if self.verdict else IMAP_CAPS

    def capability_done(self, tag: str) -> str:
        return f"{tag} OK Thats all she wrote! {sid()}"

    def logout(self, tag: str) -> list[str]:
        return ["* BYE LOGOUT Requested", f"{tag} OK 73 good day (Success) {sid()}"]

    def invalid_state(self, tag: str) -> str:
        return f"{tag} BAD Unknown command {sid()}"

    def login_refused(self, tag: str) -> str:
        return f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"

    def accepted(self, tag: str, verdict: Verdict) -> list[str]:
        account = self.sim.account(verdict.mailbox)
        name = account.name if account else ""
        return [
            f"* CAPABILITY {IMAP_CAPS_AUTHED}",
            f"{tag} OK {verdict.mailbox} {name} authenticated (Success)",
        ]

    async def refuse(self, tag: str, verdict: Verdict) -> bool:
        if verdict.refusal == "too_many":
            self.push(f"{tag} NO [ALERT] Too many simultaneous connections. (Failure)")
            return False
        if verdict.refusal == "imap_disabled":
            self.push(
                f"{tag} NO [ALERT] Your account is not enabled for IMAP use. Please visit "
                f"your Gmail settings page and enable your account for IMAP access. (Failure)"
            )
            return False
        self.push(f"+ {CHALLENGE}")
        answer = await self.readline()
        if answer is None:
            return True
        if answer.strip():
            self.push(f"{tag} NO Invalid SASL argument. {sid()}")
        else:
            self.push(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)")
        return False


class GmailPop3(Pop3Session):
    def greeting(self) -> str:
        return f"+OK Gpop ready for requests from {self.client_ip} {sid()}"

    def capa(self) -> list[str]:
        return [
            "USER",
            "RESP-CODES",
            "EXPIRE 0",
            "LOGIN-DELAY 300",
            "TOP",
            "UIDL",
            "X-GOOGLE-VERHOEVEN",
            "SASL PLAIN XOAUTH2",
        ]

    def accepted(self) -> str:
        return "+OK Welcome."

    def quit(self) -> str:
        return f"+OK Farewell. {sid()}"

    def unknown(self) -> str:
        return "-ERR bad command"

    def basic_refused(self, verb: str) -> str:
        return (
            "+OK send PASS" if verb == "USER" else "-ERR [AUTH] Username and password not accepted."
        )

    async def refuse(self, verdict: Verdict) -> bool:
        if verdict.refusal == "pop_disabled":
            self.push(
                "-ERR [SYS/PERM] Your account is not enabled for POP access. Please visit "
                "your Gmail settings page and enable your account for POP access."
            )
            return False
        self.push(f"+ {CHALLENGE}")
        answer = await self.readline()
        if answer is None:
            return True
        self.push("-ERR [AUTH] Invalid credentials.")
        return False


class GmailSmtp(SmtpSession):
    def greeting(self) -> str:
        return f"220 smtp.gmail.com ESMTP {sid()} - gsmtp"

    def ehlo(self, name: str) -> list[str]:
        middle = (
            ["250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH"]
            if self.tls
            else ["250-STARTTLS"]
        )
        return [
            f"250-smtp.gmail.com at your service, [{self.client_ip}]",
            "250-SIZE 35882577",
            "250-8BITMIME",
            *middle,
            "250-ENHANCEDSTATUSCODES",
            "250-PIPELINING",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]

    def starttls_ready(self) -> str:
        return "220 2.0.0 Ready to start TLS"

    def auth_ok(self) -> str:
        return "235 2.7.0 Accepted"

    def auth_before_tls(self) -> str:
        return f"530 5.7.0 Must issue a STARTTLS command first. {sid()} - gsmtp"

    def unknown_mechanism(self) -> str:
        return f"504 5.7.4 Unrecognized authentication type. {sid()} - gsmtp"

    def not_authenticated(self) -> str:
        return (
            f"530-5.7.0 Authentication Required. For more information, go to\r\n530 5.7.0  "
            f"https://support.google.com/mail/?p=WantAuthError {sid()} - gsmtp"
        )

    def sender_ok(self) -> str:
        return f"250 2.1.0 OK {sid()} - gsmtp"

    def recipient_ok(self) -> str:
        return f"250 2.1.5 OK {sid()} - gsmtp"

    def start_data(self) -> str:
        return f"354 Go ahead {sid()} - gsmtp"

    def queued(self, message_id: str) -> str:
        return f"250 2.0.0 OK  {int(self.sim.clock.now())} {sid()} - gsmtp"

    def goodbye(self) -> str:
        return f"221 2.0.0 closing connection {sid()} - gsmtp"

    async def refuse(self, verdict: Verdict) -> bool:
        self.push(f"334 {CHALLENGE}")
        answer = await self.readline()
        if answer is None:
            return True
        self.push(
            "535-5.7.8 Username and Password not accepted. For more information, go to",
            f"535 5.7.8  https://support.google.com/mail/?p=BadCredentials {sid()} - gsmtp",
        )
        return False

    def prepare(self, message: bytes) -> bytes:
        """Gmail rewrites a From the account may not use to the account's own address."""
        assert self.verdict is not None
        parsed = BytesParser(policy=SMTP).parsebytes(message)
        account = self.sim.account(self.verdict.mailbox)
        found = getaddresses(parsed.get_all("From", []))
        sender = found[0][1].lower() if found else ""
        allowed = {self.verdict.mailbox} | (account.aliases if account else set())
        if sender in allowed:
            return message
        del parsed["From"]
        parsed["From"] = self.verdict.mailbox
        return parsed.as_bytes()
