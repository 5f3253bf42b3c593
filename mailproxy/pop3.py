"""POP3 before login (CAPA, STLS, USER/PASS, AUTH PLAIN) and AUTH XOAUTH2/OAUTHBEARER to the
upstream server before the relay."""

from __future__ import annotations

import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .backend import Endpoint, Grant
from .common import (
    Upstream,
    UpstreamError,
    connect_upstream,
    decode_challenge,
    sasl_initial_response,
)
from .plain import decode_plain
from .session import Session, one_line

if TYPE_CHECKING:
    from .controller import Hub


class POP3Session(Session):
    protocol = "pop3"
    REFUSAL = {
        "credentials": "-ERR [AUTH]",
        "denied": "-ERR [AUTH]",
        "temporary": "-ERR [SYS/TEMP]",
    }
    log = logging.getLogger("mailproxy.pop3")

    user: str | None = None

    async def greet(self) -> None:
        await self.push("+OK Auth-Email POP3 proxy ready")

    async def say_bye(self, why: str) -> None:
        await self.push(f"-ERR {why}")

    async def handle_line(self, line: bytes) -> None:
        name, rest = self.read_command(line)
        handler = COMMANDS.get(name)
        if handler is None:
            await self.push("-ERR Unknown command or not valid before login")
            if not await self.unknown():
                await self.push("-ERR Too many invalid commands")
                self.done = True
            return
        await handler(self, rest)

    async def pop3_CAPA(self, rest: bytes) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.can_starttls:
            caps.append("STLS")
        if self.credentials_allowed:
            caps += ["USER", "SASL PLAIN"]
        caps.append("IMPLEMENTATION Auth-Email")
        await self.push("+OK Capability list follows\r\n" + "\r\n".join(caps) + "\r\n.")

    async def pop3_STLS(self, rest: bytes) -> None:
        if not self.can_starttls:
            await self.push("-ERR STLS not available")
            return
        await self.push("+OK Begin TLS negotiation")
        await self.start_tls()

    async def pop3_QUIT(self, rest: bytes) -> None:
        await self.push("+OK Bye")
        self.done = True

    async def pop3_NOOP(self, rest: bytes) -> None:
        await self.push("-ERR Log in first")

    async def pop3_USER(self, rest: bytes) -> None:
        if not self.credentials_allowed:
            await self.push("-ERR [AUTH] Use STLS before logging in")
            return
        if not rest.strip():
            await self.push("-ERR Missing user name")
            return
        self.user = rest.strip().decode("utf-8", "replace")
        await self.push("+OK Send the password")

    async def pop3_PASS(self, rest: bytes) -> None:
        if self.user is None:
            await self.push("-ERR USER first")
            return
        user, self.user = self.user, None
        await self.login(user, rest.decode("utf-8", "replace"))

    async def pop3_AUTH(self, rest: bytes) -> None:
        args = rest.split()
        if not args:
            mechs = "PLAIN\r\n" if self.credentials_allowed else ""
            await self.push("+OK Mechanisms follow\r\n" + mechs + ".")
            return
        if args[0].upper() != b"PLAIN" or len(args) > 2:
            await self.push("-ERR Only AUTH PLAIN is supported")
            return
        if not self.credentials_allowed:
            await self.push("-ERR [AUTH] Use STLS before logging in")
            return
        if len(args) == 2:
            response = args[1]
        else:
            await self.push("+ ")
            response = await self.read_secret_line()
            if response == b"*":
                await self.push("-ERR Authentication cancelled")
                return
        try:
            user, password = decode_plain(response)
        except (ValueError, binascii.Error):
            await self.push("-ERR Invalid SASL PLAIN response")
            return
        await self.login(user, password)

    # ---- login outcome ---------------------------------------------------------------------
    async def accept_login(self, up: Upstream) -> None:
        await self.push("+OK Logged in")

    poolable = True

    @staticmethod
    async def connect_greeted(hub: Hub, ep: Endpoint, log: logging.Logger) -> Upstream:
        up = await connect_upstream(hub, ep, log)
        try:
            greeting = await up.readline()
            if not greeting.startswith("+OK"):
                raise UpstreamError("protocol", f"mail server greeting: {one_line(greeting)}")
            if ep.security == "starttls":
                await up.send("STLS")
                line = await up.readline()
                if not line.startswith("+OK"):
                    raise UpstreamError("tls", f"mail server refused STLS: {one_line(line)}")
                await up.starttls(hub.upstream_ssl)
        except BaseException:
            up.close()
            raise
        return up

    async def upstream_auth(self, up: Upstream, grant: Grant, token: str) -> tuple[bool, str]:
        # Always two steps (RFC 5034): Exchange Online refuses an initial response on the AUTH
        # line, and RFC 2449 limits that line to 255 octets anyway.
        await up.send(f"AUTH {grant.mechanism}")
        line = await up.readline()
        if not line.startswith("+") or line.startswith("+OK"):
            raise UpstreamError("refused", f"mail server refused AUTH: {one_line(line)}")
        await up.send(sasl_initial_response(grant, token), secret=True)
        detail = ""
        challenged = False
        for _ in range(3):
            line = await up.readline()
            if line.startswith("+OK"):
                return True, ""
            if line.startswith("+"):
                challenged = True
                detail = decode_challenge(line[1:])
                await up.send("")
                continue
            if challenged or token_refused(line):
                return False, one_line(f"{line} {detail}")
            raise UpstreamError("refused", f"mail server: {one_line(line)}")
        raise UpstreamError("protocol", "mail server did not finish authentication")


def token_refused(line: str) -> bool:
    """An -ERR that refuses the credentials, not the session (in use, outages, policy)."""
    lower = line.lower()
    return any(
        words in lower
        for words in (
            "[auth]",
            "authentication failed",
            "auth failed",
            "authentication failure",  # Exchange
            "not enabled for pop",  # Gmail: POP is off for this account
        )
    )


COMMANDS: dict[str, Callable[..., Awaitable[None]]] = {
    name[len("pop3_") :]: fn for name, fn in vars(POP3Session).items() if name.startswith("pop3_")
}
