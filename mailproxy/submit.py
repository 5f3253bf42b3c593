"""SMTP after AUTH when the Backend delivers the mail itself (e.g. through Microsoft Graph).

The proxy speaks SMTP to the device to the end: MAIL, RCPT and DATA are answered here, and the
reply to the final dot waits for ``Backend.deliver``, so the device learns whether its message
went out. Line ends are made CRLF (a bare LF is accepted), leading dots are unstuffed, and the
message size is bounded by ``Grant.max_message``: a bigger message is read to its end and
refused with 552, never cut short.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from .backend import DeliveryRefused, Grant
from .common import LineTooLong, one_line

if TYPE_CHECKING:
    from .smtp import SMTPSession

MAIL_RE = re.compile(rb"^FROM:\s*<([^<>]*)>\s*(.*)$", re.IGNORECASE)
RCPT_RE = re.compile(rb"^TO:\s*<([^<>]*)>\s*(.*)$", re.IGNORECASE)
MAX_RECIPIENTS = 500
#: The longest line accepted inside DATA (RFC 5322 allows 998 characters; be lenient).
MAX_DATA_LINE = 1024 * 1024


class Submission:
    """The mail transactions of one authenticated session whose Backend delivers."""

    def __init__(self, session: SMTPSession, grant: Grant):
        self.s = session
        self.grant = grant
        self.limit = grant.max_message
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.budget = session.settings.unknown_command_budget

    async def push(self, text: str) -> None:
        self.bytes_out += len(text) + 2
        await self.s.push(text)

    def reset(self) -> None:
        self.sender = None
        self.recipients = []

    async def readline(self, max_line: int | None = None) -> bytes:
        lines = self.s.lines
        saved = lines.max_line
        if max_line:
            lines.max_line = max_line
        try:
            async with asyncio.timeout(self.s.settings.idle_timeout):
                line = await lines.readline()
        finally:
            lines.max_line = saved
        self.bytes_in += len(line)
        return line

    async def run(self) -> None:
        backend, s = self.s.hub.backend, self.s
        try:
            await asyncio.to_thread(
                backend.session_opened, self.grant.account_id, "smtp", s.peer_ip
            )
        except Exception:
            s.log.exception("backend.session_opened failed")
        try:
            while True:
                try:
                    line = await self.readline()
                except TimeoutError:
                    await self.push("421 4.4.2 Idle timeout, closing connection")
                    return
                except LineTooLong:
                    await self.push("500 5.5.2 Line too long, closing connection")
                    return
                verb, rest = s.read_command(line)
                handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
                if handler is None:
                    await self.push("500 5.5.2 Command not recognized")
                    self.budget -= 1
                    if self.budget <= 0:
                        await self.push("421 4.7.0 Too many invalid commands")
                        return
                    continue
                if await handler(rest.strip()):
                    return
        finally:
            try:
                await asyncio.to_thread(
                    backend.session_closed, self.grant.account_id, "smtp", self.bytes_in,
                    self.bytes_out,
                )  # fmt: skip
            except Exception:
                s.log.exception("backend.session_closed failed")

    # ---- commands (a true result ends the session) --------------------------------------
    async def smtp_EHLO(self, rest: bytes) -> bool:
        self.reset()
        name = self.s.settings.hostname
        for extension in (name, f"SIZE {self.limit}", "8BITMIME", "SMTPUTF8", "PIPELINING"):
            await self.push(f"250-{extension}")
        await self.push("250 ENHANCEDSTATUSCODES")
        return False

    async def smtp_HELO(self, rest: bytes) -> bool:
        self.reset()
        await self.push(f"250 {self.s.settings.hostname}")
        return False

    async def smtp_NOOP(self, rest: bytes) -> bool:
        await self.push("250 2.0.0 OK")
        return False

    async def smtp_RSET(self, rest: bytes) -> bool:
        self.reset()
        await self.push("250 2.0.0 OK")
        return False

    async def smtp_VRFY(self, rest: bytes) -> bool:
        await self.push("252 2.5.0 Cannot VRFY user")
        return False

    async def smtp_HELP(self, rest: bytes) -> bool:
        await self.push("214 2.0.0 MAIL, RCPT, DATA, RSET, NOOP, QUIT")
        return False

    async def smtp_QUIT(self, rest: bytes) -> bool:
        await self.push("221 2.0.0 Bye")
        return True

    async def smtp_AUTH(self, rest: bytes) -> bool:
        await self.push("503 5.5.1 Already authenticated")
        return False

    async def smtp_STARTTLS(self, rest: bytes) -> bool:
        await self.push("503 5.5.1 STARTTLS only before AUTH")
        return False

    async def smtp_BDAT(self, rest: bytes) -> bool:
        await self.push("502 5.5.1 BDAT not supported, use DATA")
        return False

    async def smtp_MAIL(self, rest: bytes) -> bool:
        if self.sender is not None:
            await self.push("503 5.5.1 Sender already given")
            return False
        match = MAIL_RE.match(rest)
        if match is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return False
        for param in match.group(2).split():
            key, _, value = param.upper().partition(b"=")
            if key == b"SIZE" and value.isdigit():
                if self.limit and int(value) > self.limit:
                    await self.push(self._too_big(int(value)))
                    return False
            elif key == b"BODY" and value in (b"7BIT", b"8BITMIME"):
                pass
            elif key == b"SMTPUTF8" and not value:
                pass
            else:
                await self.push(f"555 5.5.4 Unsupported parameter {one_line(param.decode())}")
                return False
        self.sender = match.group(1).decode("utf-8", "replace")
        await self.push("250 2.1.0 Sender OK")
        return False

    async def smtp_RCPT(self, rest: bytes) -> bool:
        if self.sender is None:
            await self.push("503 5.5.1 Need MAIL first")
            return False
        match = RCPT_RE.match(rest)
        address = match.group(1).decode("utf-8", "replace").strip() if match else ""
        if not match or "@" not in address:
            await self.push("501 5.1.3 Syntax: RCPT TO:<address>")
            return False
        if match.group(2).strip():
            await self.push("555 5.5.4 RCPT parameters are not supported")
            return False
        if len(self.recipients) >= MAX_RECIPIENTS:
            await self.push(f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS})")
            return False
        self.recipients.append(address)
        await self.push("250 2.1.5 Recipient OK")
        return False

    def _too_big(self, size: int) -> str:
        return (
            f"552 5.3.4 Message too big ({size} bytes): this mailbox sends at most "
            f"{self.limit} bytes a message; send smaller attachments"
        )

    async def smtp_DATA(self, rest: bytes) -> bool:
        if self.sender is None:
            await self.push("503 5.5.1 Need MAIL first")
            return False
        if not self.recipients:
            await self.push("554 5.5.1 No valid recipients")
            return False
        await self.push("354 Start mail input; end with <CRLF>.<CRLF>")
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                line = await self.readline(MAX_DATA_LINE)
            except TimeoutError:
                await self.push("421 4.4.2 Timeout in DATA, the message was not sent")
                return True
            except LineTooLong:
                await self.push("500 5.5.2 Line too long, the message was not sent")
                return True
            if line.endswith(b"\r\n"):
                line = line[:-2]
            elif line.endswith(b"\n"):
                line = line[:-1]  # a bare LF: taken as a line end
            if line == b".":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line) + 2
            if not self.limit or size <= self.limit:
                parts.append(line + b"\r\n")
        sender, recipients = self.sender, self.recipients
        self.reset()
        if self.limit and size > self.limit:
            await self.push(self._too_big(size))
            return False
        reply = await self._deliver(sender, recipients, b"".join(parts))
        await self.push(reply)
        return False

    async def _deliver(self, sender: str, recipients: list[str], message: bytes) -> str:
        s = self.s
        try:
            said = await asyncio.to_thread(
                s.hub.backend.deliver, self.grant.account_id, sender, recipients, message
            )
        except DeliveryRefused as refused:
            s.log.info("delivery for %s refused: %s", self.grant.address, refused)
            return one_line(f"{refused.code} {refused.status} {refused.text}")
        except Exception:
            s.log.exception("backend.deliver failed")
            return "451 4.3.0 Internal error, the message was not sent; try again later"
        s.log.info("message of %s delivered: %d bytes", self.grant.address, len(message))
        return one_line(f"250 2.0.0 OK {said}")
