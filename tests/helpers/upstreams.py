"""Scripted loopback upstreams (IMAP, POP3, SMTP) the proxy relays to, named as fakes: they
play a mail server's lines, with switches for the refusals a test needs."""

from __future__ import annotations

import asyncio
import base64
import threading

from prometheus_client import REGISTRY

CHALLENGE = b"+ eyJzdGF0dXMiOiI0MDAifQ==\r\n"  # {"status":"400"}, as Google sends it


class FakeServer:
    """A scripted upstream on its own loop and thread; subclasses answer in their protocol."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.reset()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(5)

    def reset(self) -> None:
        """Forget what a test scripted."""
        self.unavailable = False
        #: lines to answer every authentication with instead of checking the token
        self.auth_script: list[str] | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._guard, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _guard(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await self._serve(r, w)
        except (OSError, AssertionError):
            pass
        w.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def good(self, b64: str) -> bool:
        payload = base64.b64decode(b64).decode()
        self.payloads.append(payload)
        return "auth=Bearer good\x01" in payload

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class FakeIMAP(FakeServer):
    """Accepts the token 'good', challenges anything else, and after login answers every
    command with OK, except EXPIRE (BYE and close) and SLOW (no answer)."""

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] fake ready\r\n")
        while line := await r.readline():
            tag, _, rest = line.strip().decode().partition(" ")
            if rest.startswith("AUTHENTICATE"):
                good = self.good(rest.split()[2])
                if self.auth_script is not None:
                    for scripted in self.auth_script:
                        w.write(scripted.format(tag=tag).encode() + b"\r\n")
                elif self.unavailable:
                    w.write(f"{tag} NO [UNAVAILABLE] token service down\r\n".encode())
                elif good:
                    w.write(f"{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n".encode())
                else:
                    w.write(CHALLENGE)
                    await w.drain()
                    assert await r.readline() == b"\r\n"
                    w.write(f"{tag} NO [AUTHENTICATIONFAILED] bad token\r\n".encode())
            elif rest == "EXPIRE":
                w.write(b"* BYE token expired\r\n")
                await w.drain()
                break
            elif rest != "SLOW":
                w.write(f"{tag} OK {rest} done\r\n".encode())
            await w.drain()


class FakePOP3(FakeServer):
    """Like Exchange Online: AUTH with an initial response on the same line is a protocol
    error that closes the connection; AUTH XOAUTH2, '+', then the response works."""

    def reset(self) -> None:
        super().reset()
        self.one_line_auths = 0

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"+OK fake POP3 ready\r\n")
        while line := await r.readline():
            words = line.strip().decode().split()
            verb = words[0].upper() if words else ""
            if verb == "AUTH" and len(words) > 2:
                self.one_line_auths += 1
                w.write(b"-ERR Protocol error. Connection is closed.\r\n")
                await w.drain()
                break
            if verb == "AUTH":
                w.write(b"+ \r\n")
                await w.drain()
                good = self.good((await r.readline()).strip().decode())
                if self.auth_script is not None:
                    for scripted in self.auth_script:
                        w.write(scripted.encode() + b"\r\n")
                elif good:
                    w.write(b"+OK Logged in\r\n")
                else:
                    w.write(CHALLENGE)
                    await w.drain()
                    assert await r.readline() == b"\r\n"
                    w.write(b"-ERR [AUTH] Authentication failed.\r\n")
            elif verb == "QUIT":
                w.write(b"+OK Bye\r\n")
                await w.drain()
                break
            elif verb == "STAT":
                w.write(b"+OK 2 320\r\n")
            else:
                w.write(b"+OK\r\n")
            await w.drain()


class FakeSMTP(FakeServer):
    """EHLO, AUTH XOAUTH2 with an initial response; Gmail's 334 challenge and 535 for a bad
    token; after login every command gets 250."""

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 fake ESMTP\r\n")
        while line := await r.readline():
            words = line.strip().decode().split()
            verb = words[0].upper() if words else ""
            if verb == "EHLO":
                w.write(b"250-fake\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")
            elif verb == "AUTH":
                good = self.good(words[2])
                if self.auth_script is not None:
                    for scripted in self.auth_script:
                        w.write(scripted.encode() + b"\r\n")
                elif good:
                    w.write(b"235 2.7.0 Accepted\r\n")
                else:
                    w.write(b"334 eyJzdGF0dXMiOiI0MDAifQ==\r\n")
                    await w.drain()
                    assert await r.readline() == b"\r\n"
                    w.write(b"535 5.7.8 Username and Password not accepted\r\n")
            elif verb == "QUIT":
                w.write(b"221 Bye\r\n")
                await w.drain()
                break
            else:
                w.write(b"250 OK\r\n")
            await w.drain()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
