"""IMAP4rev1 before login (our own capabilities, STARTTLS, LOGIN, AUTHENTICATE PLAIN) and
AUTHENTICATE XOAUTH2/OAUTHBEARER to the upstream server before the relay."""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .backend import Endpoint, Grant, ProxyAuthError
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

TAG_RE = re.compile(rb"[A-Za-z0-9!#$&',\-./:;<=>?@\[\]^_`|~]{1,64}")
LITERAL_RE = re.compile(rb"\{(\d{1,10})(\+?)\}")
NONSYNC_LITERAL_RE = re.compile(rb"\{\d{1,10}\+\}$")
CAPS_CODE_RE = re.compile(r"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
NOT_YET = frozenset(
    {"SELECT", "EXAMINE", "LIST", "LSUB", "STATUS", "FETCH", "SEARCH", "STORE", "COPY", "UID",
     "APPEND", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "IDLE", "ENABLE",
     "CHECK", "CLOSE", "EXPUNGE", "NAMESPACE", "GETQUOTAROOT", "MOVE"}
)  # fmt: skip


def token_refused(tagged: str) -> bool:
    """A tagged NO that refuses the credentials, not the session (limits, alerts, outages)."""
    upper = tagged.upper()
    return (
        "[AUTHENTICATIONFAILED]" in upper
        or "AUTHENTICATE FAILED" in upper
        or "NOT ENABLED FOR IMAP" in upper  # Gmail: IMAP is off for this account
    )


class BadSyntax(Exception):
    pass


class LiteralTooLarge(Exception):
    """A literal over the limits of one command (its size, their number, their sum)."""

    def __init__(self, synchronizing: bool, why: str):
        super().__init__(why)
        self.synchronizing = synchronizing
        self.why = why


class IMAPSession(Session):
    protocol = "imap"
    REFUSAL = {
        "credentials": "NO [AUTHENTICATIONFAILED]",
        "denied": "NO [AUTHORIZATIONFAILED]",
        "temporary": "NO [UNAVAILABLE]",
    }
    log = logging.getLogger("mailproxy.imap")

    tag = "*"
    upstream_caps = ""

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "IDLE", "ENABLE"]
        if self.can_starttls:
            caps.append("STARTTLS")
        caps.append("AUTH=PLAIN" if self.credentials_allowed else "LOGINDISABLED")
        return " ".join(caps)

    async def greet(self) -> None:
        await self.push(f"* OK [CAPABILITY {self.capabilities()}] Auth-Email IMAP proxy ready")

    async def say_bye(self, why: str) -> None:
        await self.push(f"* BYE {why}")

    async def handle_line(self, line: bytes) -> None:
        self.log_client_line(line)
        text = line.rstrip(b"\r\n")
        tag, _, rest = text.partition(b" ")
        verb, _, rest = rest.partition(b" ")
        if not TAG_RE.fullmatch(tag) or tag == b"+":
            await self.push("* BAD Invalid tag or command")
            await self._spend()
            return
        self.tag = tag.decode("ascii")
        name = verb.decode("ascii", "replace").upper()
        handler = COMMANDS.get(name)
        if handler is None:
            why = "Log in first" if name in NOT_YET else "Unknown command"
            await self.push(f"{self.tag} BAD {why}")
            await self._spend()
            return
        try:
            await handler(self, rest)
        except BadSyntax:
            await self.push(f"{self.tag} BAD Invalid arguments")
            await self._spend()
        except LiteralTooLarge as exc:
            if exc.synchronizing:  # refused before the client sent it
                await self.push(f"{self.tag} BAD {exc.why}")
                await self._spend()
            else:  # the client is sending it anyway: the stream is lost
                await self.push(f"* BYE {exc.why}")
                self.done = True

    async def _spend(self) -> None:
        if not await self.unknown():
            await self.push("* BYE Too many invalid commands")
            self.done = True

    # ---- argument parsing (atoms, quoted strings, literals) ---------------------------------
    async def read_args(self, rest: bytes) -> list[bytes]:
        """The arguments of a command; literals are bounded in size, number and sum, so that
        one command (before login, from anyone) holds at most a few KiB."""
        args: list[bytes] = []
        pos = 0
        literals = literal_bytes = 0
        settings = self.settings
        while True:
            while pos < len(rest) and rest[pos] == 0x20:
                pos += 1
            if pos >= len(rest):
                return args
            c = rest[pos]
            if c == 0x22:  # quoted string
                out = bytearray()
                pos += 1
                while True:
                    if pos >= len(rest):
                        raise BadSyntax()
                    ch = rest[pos]
                    if ch == 0x5C and pos + 1 < len(rest):
                        out.append(rest[pos + 1])
                        pos += 2
                    elif ch == 0x22:
                        pos += 1
                        break
                    else:
                        out.append(ch)
                        pos += 1
                args.append(bytes(out))
            elif c == 0x7B:  # literal: must end the line
                m = LITERAL_RE.fullmatch(rest, pos)
                if not m:
                    raise BadSyntax()
                size, sync = int(m[1]), not m[2]
                literals += 1
                literal_bytes += size
                if size > settings.max_literal:
                    raise LiteralTooLarge(sync, "Literal too large")
                if literals > settings.max_literals_per_command:
                    raise LiteralTooLarge(sync, "Too many literals in one command")
                if literal_bytes > settings.max_literal_bytes_per_command:
                    raise LiteralTooLarge(sync, "Command too long")
                if sync:
                    await self.push("+ Ready for literal data")
                args.append(await self.readexactly(size))
                rest = (await self.readline()).rstrip(b"\r\n")
                pos = 0
            elif c in b"()":
                args.append(bytes([c]))
                pos += 1
            else:
                end = pos
                while end < len(rest) and rest[end] not in b" ()":
                    end += 1
                args.append(rest[pos:end])
                pos = end

    # ---- commands ------------------------------------------------------------------------
    async def imap_CAPABILITY(self, rest: bytes) -> None:
        await self.push(f"* CAPABILITY {self.capabilities()}")
        await self.push(f"{self.tag} OK CAPABILITY completed")

    async def imap_NOOP(self, rest: bytes) -> None:
        await self.push(f"{self.tag} OK NOOP completed")

    async def imap_LOGOUT(self, rest: bytes) -> None:
        await self.push("* BYE Logging out")
        await self.push(f"{self.tag} OK LOGOUT completed")
        self.done = True

    async def imap_ID(self, rest: bytes) -> None:
        await self.read_args(rest)
        await self.push('* ID ("name" "Auth-Email")')
        await self.push(f"{self.tag} OK ID completed")

    async def imap_STARTTLS(self, rest: bytes) -> None:
        if not self.can_starttls:
            await self.push(f"{self.tag} BAD STARTTLS not available")
            return
        await self.push(f"{self.tag} OK Begin TLS negotiation now")
        await self.start_tls()

    async def imap_LOGIN(self, rest: bytes) -> None:
        if not self.credentials_allowed:
            # Refused before any literal is asked for; one sent anyway ends the connection.
            if NONSYNC_LITERAL_RE.search(rest):
                await self.push("* BYE Use STARTTLS before logging in")
                self.done = True
            else:
                await self.push(f"{self.tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
            return
        args = await self.read_args(rest)
        if len(args) != 2:
            raise BadSyntax()
        user, password = (a.decode("utf-8", "replace") for a in args)
        await self.login(user, password)

    async def imap_AUTHENTICATE(self, rest: bytes) -> None:
        args = rest.split()
        if not args or len(args) > 2:
            raise BadSyntax()
        if args[0].upper() != b"PLAIN":
            await self.push(f"{self.tag} NO [CANNOT] Only AUTHENTICATE PLAIN is supported")
            return
        if not self.credentials_allowed:
            await self.push(f"{self.tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
            return
        if len(args) == 2:
            response = args[1]
        else:
            await self.push("+ ")
            response = await self.read_secret_line()
            if response == b"*":
                await self.push(f"{self.tag} BAD Authentication cancelled")
                return
        try:
            user, password = decode_plain(response)
        except (ValueError, binascii.Error):
            await self.push(f"{self.tag} BAD Invalid SASL PLAIN response")
            return
        await self.login(user, password)

    # ---- login outcome ---------------------------------------------------------------------
    async def refuse(self, err: ProxyAuthError) -> None:
        await self.push(f"{self.tag} {self.refusal(err)}")

    async def accept_login(self, up: Upstream) -> None:
        await self.push(f"{self.tag} OK [CAPABILITY {self.upstream_caps}] Logged in")

    poolable = True

    @staticmethod
    async def connect_greeted(hub: Hub, ep: Endpoint, log: logging.Logger) -> Upstream:
        up = await connect_upstream(hub, ep, log)
        try:
            greeting = await up.readline()
            if not greeting.upper().startswith("* OK"):
                raise UpstreamError("protocol", f"mail server greeting: {one_line(greeting)}")
            if ep.security == "starttls":
                tag = up.next_tag()
                await up.send(f"{tag} STARTTLS")
                status, line, _ = await upstream_result(up, tag)
                if status != "OK":
                    raise UpstreamError("tls", f"mail server refused STARTTLS: {one_line(line)}")
                await up.starttls(hub.upstream_ssl)
        except BaseException:
            up.close()
            raise
        return up

    async def upstream_auth(self, up: Upstream, grant: Grant, token: str) -> tuple[bool, str]:
        tag = up.next_tag()
        ir = sasl_initial_response(grant, token)
        await up.send(f"{tag} AUTHENTICATE {grant.mechanism} {ir}", secret=True)
        detail = ""
        challenged = False
        # Untagged lines (ALERTs, CAPABILITY, notices) may come before the tagged reply.
        for _ in range(100):
            line = await up.readline()
            if line.startswith("+"):
                # A failure challenge (base64 JSON): an empty response ends the exchange.
                challenged = True
                detail = decode_challenge(line[1:])
                await up.send("")
                continue
            if line.upper().startswith("* CAPABILITY "):
                self.upstream_caps = line[13:]
                continue
            if line.upper().startswith("* BYE"):
                raise UpstreamError("refused", f"mail server: {one_line(line[5:])}")
            if not line.startswith(tag + " "):
                continue
            status = line[len(tag) + 1 :].split(" ", 1)[0].upper()
            if status == "OK":
                m = CAPS_CODE_RE.search(line)
                if m:
                    self.upstream_caps = m[1]
                if not self.upstream_caps:
                    refused = await self._fetch_caps(up)
                    if refused:  # Exchange: "User is authenticated but not connected."
                        return False, refused
                return True, ""
            if challenged or token_refused(line):
                return False, one_line(f"{line} {detail}")
            text = line[len(tag) + 1 :]
            raise UpstreamError("refused", f"mail server: {one_line(text)}")
        raise UpstreamError("protocol", "mail server did not finish authentication")

    async def _fetch_caps(self, up: Upstream) -> str:
        """Ask for the capabilities after login; the refusal when the server accepted the
        login but answers no command (the mailbox cannot be opened), else ''."""
        tag = up.next_tag()
        await up.send(f"{tag} CAPABILITY")
        status, line, untagged = await upstream_result(up, tag)
        if status in ("BAD", "NO") and "not connected" in line.lower():
            return one_line(line[len(tag) + 1 :])
        for u in untagged:
            if u.upper().startswith("* CAPABILITY "):
                self.upstream_caps = u[13:]
        if not self.upstream_caps:
            self.upstream_caps = "IMAP4rev1"
        return ""


async def upstream_result(up: Upstream, tag: str) -> tuple[str, str, list[str]]:
    """Read to the tagged response: (status, tagged line, untagged lines)."""
    untagged: list[str] = []
    while True:
        line = await up.readline()
        if line.startswith(tag + " "):
            status = line[len(tag) + 1 :].split(" ", 1)[0].upper()
            return status, line, untagged
        if line.upper().startswith("* BYE"):
            raise UpstreamError("protocol", f"mail server: {one_line(line[5:])}")
        untagged.append(line)
        if len(untagged) > 1000:
            raise UpstreamError("protocol", "mail server sent too many lines")


COMMANDS: dict[str, Callable[..., Awaitable[None]]] = {
    name[len("imap_") :]: fn for name, fn in vars(IMAPSession).items() if name.startswith("imap_")
}
