"""SMTP submission before AUTH (our own safe EHLO set, STARTTLS, AUTH PLAIN/LOGIN) and EHLO,
STARTTLS, AUTH XOAUTH2/OAUTHBEARER to the upstream server before the relay."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable

from .backend import Grant
from .common import (
    Upstream,
    UpstreamError,
    connect_upstream,
    count_login,
    decode_challenge,
    sasl_initial_response,
)
from .plain import decode_plain
from .session import DeliverInstead, Session, one_line
from .submit import Submission

#: Exchange's "SMTP AUTH is disabled" (tenant, mailbox, security defaults, Conditional Access).
POLICY_REFUSAL = "535 5.7.139"

NEED_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "ETRN", "EXPN"})


class SMTPSession(Session):
    protocol = "smtp"
    REFUSAL = {"credentials": "535 5.7.8", "denied": "535 5.7.8", "temporary": "454 4.7.0"}
    log = logging.getLogger("mailproxy.smtp")

    greeted = False

    async def greet(self) -> None:
        await self.push(f"220 {self.settings.hostname} ESMTP Auth-Email ready")

    async def say_bye(self, why: str) -> None:
        await self.push(f"421 4.7.0 {why}")

    async def handle_line(self, line: bytes) -> None:
        name, rest = self.read_command(line)
        handler = COMMANDS.get(name)
        if handler is not None:
            await handler(self, rest.strip())
            return
        if name in NEED_AUTH:
            await self.push("530 5.7.0 Authentication required")
        else:
            await self.push("500 5.5.2 Command not recognized")
        if not await self.unknown():
            await self.push("421 4.7.0 Too many invalid commands")
            self.done = True

    async def smtp_HELO(self, rest: bytes) -> None:
        if not rest:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self.greeted = True
        await self.push(f"250 {self.settings.hostname}")

    async def smtp_EHLO(self, rest: bytes) -> None:
        if not rest:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self.greeted = True
        lines = [self.settings.hostname, "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.can_starttls:
            lines.append("STARTTLS")
        if self.credentials_allowed:
            lines.append("AUTH PLAIN LOGIN")
        for extension in lines[:-1]:
            await self.push(f"250-{extension}")
        await self.push(f"250 {lines[-1]}")

    async def smtp_STARTTLS(self, rest: bytes) -> None:
        if not self.can_starttls:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        await self.start_tls()
        self.greeted = False

    async def smtp_NOOP(self, rest: bytes) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_RSET(self, rest: bytes) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_VRFY(self, rest: bytes) -> None:
        await self.push("252 2.5.0 Cannot VRFY user")

    async def smtp_HELP(self, rest: bytes) -> None:
        await self.push("214 2.0.0 Log in with AUTH, then send mail")

    async def smtp_QUIT(self, rest: bytes) -> None:
        await self.push("221 2.0.0 Bye")
        self.done = True

    async def smtp_AUTH(self, rest: bytes) -> None:
        args = rest.split()
        if not self.greeted:
            await self.push("503 5.5.1 Send EHLO first")
            return
        if not self.credentials_allowed:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mech = args[0].upper()
        try:
            if mech == b"PLAIN":
                response = args[1] if len(args) == 2 else await self._ask("")
                if response is None:
                    return
                user, password = decode_plain(response)
            elif mech == b"LOGIN":
                raw_user = args[1] if len(args) == 2 else await self._ask("VXNlcm5hbWU6")
                if raw_user is None:
                    return
                raw_pass = await self._ask("UGFzc3dvcmQ6")
                if raw_pass is None:
                    return
                user = base64.b64decode(raw_user, validate=True).decode("utf-8")
                password = base64.b64decode(raw_pass, validate=True).decode("utf-8")
            else:
                await self.push("504 5.5.4 Unrecognized authentication type")
                return
        except (ValueError, binascii.Error):
            await self.push("501 5.5.2 Cannot decode the response")
            return
        await self.login(user, password)

    async def _ask(self, challenge: str) -> bytes | None:
        await self.push(f"334 {challenge}")
        response = await self.read_secret_line()
        if response == b"*":
            await self.push("501 5.7.0 Authentication cancelled")
            return None
        return response

    # ---- login outcome ---------------------------------------------------------------------
    async def accept_login(self, up: Upstream | None) -> None:
        await self.push("235 2.7.0 Authentication successful")

    async def deliver_instead(self, grant: Grant) -> None:
        self.log.info("login %s from %s, mail goes to the backend", grant.address, self.peer_ip)
        count_login(self.protocol, "ok")
        await self.accept_login(None)
        self.done = True
        await Submission(self, grant).run()

    async def _upstream_login(self, grant: Grant) -> Upstream:
        """As for every protocol; a refusal by policy (5.7.139) may switch to ``deliver``."""
        try:
            return await super()._upstream_login(grant)
        except UpstreamError as exc:
            if exc.reason != "policy":
                raise
            backend = self.hub.backend
            instead = await asyncio.to_thread(
                backend.smtp_auth_refused, grant.account_id, exc.message
            )
            if instead is None:
                raise
            if self.upstream is not None:
                self.upstream.close()  # the refused SMTP session is not needed any more
                self.upstream = None
            raise DeliverInstead(instead) from None

    async def _reply(self, up: Upstream) -> tuple[int, str]:
        """A whole (multi-line) upstream reply: (code, text of its last line)."""
        for _ in range(100):
            line = await up.readline()
            if len(line) < 3 or not line[:3].isdigit():
                raise UpstreamError("protocol", f"mail server: {one_line(line)}")
            if line[3:4] != "-":
                return int(line[:3]), line
        raise UpstreamError("protocol", "mail server sent too many lines")

    async def _ehlo(self, up: Upstream) -> None:
        await up.send(f"EHLO {self.settings.hostname}")
        code, line = await self._reply(up)
        if code != 250:
            raise UpstreamError("protocol", f"mail server refused EHLO: {one_line(line)}")

    async def open_upstream(self, grant: Grant) -> Upstream:
        up = await connect_upstream(self.hub, grant.upstream, self.log)
        code, line = await self._reply(up)
        if code != 220:
            raise UpstreamError("protocol", f"mail server greeting: {one_line(line)}")
        await self._ehlo(up)
        if grant.upstream.security == "starttls":
            await up.send("STARTTLS")
            code, line = await self._reply(up)
            if code != 220:
                raise UpstreamError("tls", f"mail server refused STARTTLS: {one_line(line)}")
            await up.starttls(self.hub.upstream_ssl)
            await self._ehlo(up)
        return up

    async def upstream_auth(self, up: Upstream, grant: Grant, token: str) -> tuple[bool, str]:
        ir = sasl_initial_response(grant, token)
        await up.send(f"AUTH {grant.mechanism} {ir}", secret=True)
        detail = ""
        challenged = False
        for _ in range(3):
            code, line = await self._reply(up)
            if code == 235:
                return True, ""
            if code == 334:
                challenged = True
                detail = decode_challenge(line[4:])
                await up.send("")
                continue
            if line.startswith(POLICY_REFUSAL):
                # No token can change a tenant's policy: neither refresh nor re-authorize.
                raise UpstreamError("policy", f"mail server: {one_line(line)}")
            if code == 535 or challenged:
                return False, one_line(f"{line} {detail}")
            # 454, 421, 530, 550...: the server refused the session, not the token.
            raise UpstreamError("refused", f"mail server: {one_line(line)}")
        raise UpstreamError("protocol", "mail server did not finish authentication")


COMMANDS: dict[str, Callable[..., Awaitable[None]]] = {
    name[len("smtp_") :]: fn for name, fn in vars(SMTPSession).items() if name.startswith("smtp_")
}
