"""The shape of an IMAP, POP3 and SMTP session; the provider modules fill in the words.

Each class here runs the protocol's state machine and calls methods a provider overrides for
what differs between Exchange and Gmail: greeting, capabilities, how a refused XOAUTH2 login
sounds (Exchange says NO at once, Gmail sends a JSON challenge first), and the SMTP replies.
"""

from __future__ import annotations

import asyncio
import re
import secrets

from tests.providers.mailfront import Session, Verdict, header_from, split_command

# ------------------------------------------------------------------------------------ IMAP


class ImapSession(Session):
    def greeting(self) -> str:
        raise NotImplementedError

    def capabilities(self) -> str:
        raise NotImplementedError

    def capability_done(self, tag: str) -> str:
        return f"{tag} OK CAPABILITY completed."

    def continuation(self) -> str:
        return "+ "

    def logout(self, tag: str) -> list[str]:
        return ["* BYE logging out", f"{tag} OK LOGOUT completed."]

    def invalid_state(self, tag: str) -> str:
        return f"{tag} BAD Command received in Invalid state."

    def login_refused(self, tag: str) -> str:
        return f"{tag} NO LOGIN failed."

    def accepted(self, tag: str, verdict: Verdict) -> list[str]:
        return [f"{tag} OK AUTHENTICATE completed."]

    async def refuse(self, tag: str, verdict: Verdict) -> bool:
        """Refuse a login (True ends the connection)."""
        raise NotImplementedError

    def rewrite(self, line: bytes) -> bytes:
        """A line from Dovecot as this provider would say it."""
        if line.startswith(b"* CAPABILITY "):
            return f"* CAPABILITY {self.capabilities()}\r\n".encode()
        return line

    async def serve(self) -> None:
        self.push(self.greeting())
        while True:
            line = await self.readline()
            if line is None:
                return
            tag, _, rest = line.partition(" ")
            verb, _, args = rest.partition(" ")
            verb = verb.upper()
            if verb == "CAPABILITY":
                self.push(f"* CAPABILITY {self.capabilities()}", self.capability_done(tag))
            elif verb == "NOOP":
                self.push(f"{tag} OK NOOP completed.")
            elif verb == "ID":
                self.push("* ID NIL", f"{tag} OK ID completed.")
            elif verb == "LOGOUT":
                self.push(*self.logout(tag))
                return
            elif verb == "LOGIN":
                self.push(self.login_refused(tag))
            elif verb == "AUTHENTICATE":
                if await self.authenticate(tag, args):
                    return
            else:
                self.push(self.invalid_state(tag))

    async def authenticate(self, tag: str, args: str) -> bool:
        mech, _, initial = args.partition(" ")
        if mech.upper() != "XOAUTH2":
            return await self.refuse(tag, Verdict(False, "mechanism"))
        if not initial:
            self.push(self.continuation())
            answer = await self.readline()
            if answer is None:
                return True
            initial = answer
        verdict = await self.check("imap", initial.encode())
        if not verdict.ok:
            return await self.refuse(tag, verdict)
        return await self.open_mailbox(tag, verdict)

    async def open_mailbox(self, tag: str, verdict: Verdict) -> bool:
        try:
            backend = await self.store.open_imap(verdict.mailbox)
        except (OSError, ConnectionError):
            self.push(f"{tag} NO [UNAVAILABLE] the simulator could not reach its mail store")
            return True
        self.push(*self.accepted(tag, verdict))
        self.after_login()
        await self.relay(backend, self.client_command, self.rewrite)
        return True

    def after_login(self) -> None:
        pass

    async def client_command(self, raw: bytes) -> bool:
        tag, _, rest = raw.decode(errors="replace").strip().partition(" ")
        if rest.upper() == "LOGOUT":
            self.kill(*self.logout(tag))
            return True
        return False


# ------------------------------------------------------------------------------------ POP3


class Pop3Session(Session):
    def greeting(self) -> str:
        raise NotImplementedError

    def capa(self) -> list[str]:
        raise NotImplementedError

    def accepted(self) -> str:
        raise NotImplementedError

    async def refuse(self, verdict: Verdict) -> bool:
        raise NotImplementedError

    async def initial_response(self, blob: str) -> bool:
        """AUTH XOAUTH2 with the response on the same line (True ends the connection)."""
        return await self.login(blob)

    def unknown(self) -> str:
        return "-ERR Command is not valid in this state."

    def quit(self) -> str:
        return "+OK signing off."

    async def serve(self) -> None:
        self.push(self.greeting())
        while True:
            line = await self.readline()
            if line is None:
                return
            verb, args = split_command(line)
            if verb == "CAPA":
                self.push("+OK", *self.capa(), ".")
            elif verb == "QUIT":
                self.push(self.quit())
                return
            elif verb == "NOOP":
                self.push("+OK")
            elif verb in ("USER", "PASS"):
                self.push(self.basic_refused(verb))
            elif verb == "AUTH":
                mech, _, blob = args.partition(" ")
                if mech.upper() != "XOAUTH2":
                    self.push(self.basic_refused("AUTH"))
                elif blob:
                    if await self.initial_response(blob):
                        return
                else:
                    self.push("+ ")
                    answer = await self.readline()
                    if answer is None or await self.login(answer):
                        return
            else:
                self.push(self.unknown())

    def basic_refused(self, verb: str) -> str:
        return "+OK" if verb == "USER" else "-ERR Authentication failure."

    async def login(self, blob: str) -> bool:
        verdict = await self.check("pop3", blob.encode())
        if not verdict.ok:
            return await self.refuse(verdict)
        try:
            backend = await self.store.open_pop3(verdict.mailbox)
        except (OSError, ConnectionError):
            self.push("-ERR [SYS/TEMP] the simulator could not reach its mail store")
            return True
        self.push(self.accepted())
        await self.relay(backend, self.client_command, lambda line: line)
        return True

    async def client_command(self, raw: bytes) -> bool:
        if raw.strip().upper() == b"QUIT":
            self.kill(self.quit())
            return True
        return False


# ------------------------------------------------------------------------------------ SMTP


class SmtpSession(Session):
    """SMTP submission: EHLO, STARTTLS, AUTH XOAUTH2, MAIL/RCPT/DATA/BDAT, delivered to Postfix."""

    starttls_offered = True

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.chunks: list[bytes] = []

    # words (override)
    def greeting(self) -> str:
        raise NotImplementedError

    def ehlo(self, name: str) -> list[str]:
        raise NotImplementedError

    def starttls_ready(self) -> str:
        return "220 2.0.0 SMTP server ready"

    def auth_ok(self) -> str:
        return "235 2.7.0 Authentication successful"

    def auth_before_tls(self) -> str:
        raise NotImplementedError

    def unknown_mechanism(self) -> str:
        raise NotImplementedError

    def not_authenticated(self) -> str:
        raise NotImplementedError

    def sender_ok(self) -> str:
        return "250 2.1.0 Sender OK"

    def recipient_ok(self) -> str:
        return "250 2.1.5 Recipient OK"

    def start_data(self) -> str:
        return "354 Start mail input; end with <CRLF>.<CRLF>"

    def queued(self, message_id: str) -> str:
        return f"250 2.0.0 OK {message_id}"

    def goodbye(self) -> str:
        return "221 2.0.0 Service closing transmission channel"

    async def refuse(self, verdict: Verdict) -> bool:
        raise NotImplementedError

    def send_refusal(self, message: bytes) -> str | None:
        """A refusal of an accepted DATA (SendAs), or None to deliver."""
        return None

    def prepare(self, message: bytes) -> bytes:
        """The message as the provider stores it (Gmail rewrites From)."""
        return message

    async def serve(self) -> None:
        self.push(self.greeting())
        while True:
            line = await self.readline(timeout=600)
            if line is None:
                return
            verb, args = split_command(line)
            if verb in ("EHLO", "HELO"):
                self.push(*self.ehlo(args))
            elif verb == "STARTTLS" and not self.tls and self.starttls_offered:
                self.push(self.starttls_ready())
                await self.starttls()
            elif verb == "AUTH":
                if await self.auth(args):
                    return
            elif verb == "MAIL":
                self.mail(args)
            elif verb == "RCPT":
                self.rcpt(args)
            elif verb == "DATA":
                if self.verdict is None or not self.recipients:
                    self.push(
                        self.not_authenticated()
                        if self.verdict is None
                        else "503 5.5.1 Bad sequence of commands"
                    )
                    continue
                self.push(self.start_data())
                body = await self.read_data()
                if body is None:
                    return
                await self.finish(body)
            elif verb == "BDAT":
                if not await self.bdat(args):
                    return
            elif verb == "RSET":
                self.reset()
                self.push("250 2.0.0 Resetting")
            elif verb == "NOOP":
                self.push("250 2.0.0 OK")
            elif verb == "QUIT":
                self.push(self.goodbye())
                return
            else:
                self.push("500 5.3.3 Unrecognized command")

    async def auth(self, args: str) -> bool:
        mech, _, initial = args.partition(" ")
        if not self.tls:
            self.push(self.auth_before_tls())
            return False
        if mech.upper() != "XOAUTH2":
            self.push(self.unknown_mechanism())
            return False
        if not initial:
            self.push("334 ")
            answer = await self.readline()
            if answer is None:
                return True
            initial = answer
        verdict = await self.check("smtp", initial.encode())
        if not verdict.ok:
            return await self.refuse(verdict)
        self.push(self.auth_ok())
        return False

    def mail(self, args: str) -> None:
        if self.verdict is None:
            self.push(self.not_authenticated())
            return
        found = re.match(r"FROM:\s*<([^>]*)>", args, re.I)
        if not found:
            self.push("501 5.5.4 Invalid arguments")
            return
        self.reset()
        self.sender = found.group(1)
        self.push(self.sender_ok())

    def rcpt(self, args: str) -> None:
        found = re.match(r"TO:\s*<([^>]+)>", args, re.I)
        if self.sender is None:
            self.push("503 5.5.1 Bad sequence of commands")
        elif not found:
            self.push("501 5.5.4 Invalid arguments")
        else:
            self.recipients.append(found.group(1))
            self.push(self.recipient_ok())

    def reset(self) -> None:
        self.sender = None
        self.recipients = []
        self.chunks = []

    async def read_data(self) -> bytes | None:
        lines = []
        while True:
            raw = await self.reader.readline()
            if not raw:
                return None
            if raw.rstrip(b"\r\n") == b".":
                return b"".join(lines)
            lines.append(raw[1:] if raw.startswith(b"..") else raw)

    async def bdat(self, args: str) -> bool:
        size, _, last = args.partition(" ")
        if not size.isdigit():
            self.push("501 5.5.4 Invalid arguments")
            return True
        chunk = await self.reader.readexactly(int(size))
        if self.verdict is None or not self.recipients:
            self.push(
                self.not_authenticated()
                if self.verdict is None
                else "503 5.5.1 Bad sequence of commands"
            )
            return True
        self.chunks.append(chunk)
        if last.upper() == "LAST":
            await self.finish(b"".join(self.chunks))
        else:
            self.push(f"250 2.0.0 {size} bytes received")
        return True

    async def finish(self, message: bytes) -> None:
        assert self.verdict is not None and self.sender is not None
        refusal = self.send_refusal(message)
        if refusal:
            self.reset()
            self.push(refusal)
            return
        message = self.prepare(message)
        await asyncio.to_thread(self.store.deliver, self.sender, self.recipients, message)
        await asyncio.to_thread(self.store.save_sent, self.verdict.mailbox, message)
        self.sim.sent.append((self.verdict.principal, header_from(message), list(self.recipients)))
        self.reset()
        self.push(self.queued(f"<{secrets.token_hex(8)}@simulator>"))
