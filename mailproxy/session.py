"""The base class of a client connection: the command loop, the one write path, the login flow
(password check, token, upstream SASL, one forced refresh) and the relay that follows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, ClassVar

from .backend import Endpoint, Grant, ProxyAuthError
from .common import (
    PRELOGIN_READ,
    BoundedReads,
    ClientNotReading,
    LineReader,
    LineTooLong,
    PeerGone,
    TLSOnPlainPort,
    Upstream,
    UpstreamError,
    count_login,
    count_upstream_error,
    is_loopback,
    mask_tail,
    one_line,
)
from .relay import Relay, pending

if TYPE_CHECKING:
    from .controller import Hub


class Session:
    """One client connection. Subclasses implement the protocol's own words."""

    protocol: ClassVar[str] = ""
    log: ClassVar[logging.Logger] = logging.getLogger("mailproxy")

    def __init__(
        self,
        hub: Hub,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: bool,
        accepted: float | None = None,
    ):
        """``accepted``: loop time of accept(), where the pre-login lifetime starts."""
        self.hub = hub
        self.settings = hub.settings
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer_ip: str = peer[0] if isinstance(peer, tuple) else "unknown"
        self.lines = LineReader(reader, self.settings.max_line, not tls, PRELOGIN_READ)
        self.tls = tls
        self.budget = self.settings.unknown_command_budget
        self.commands = 0  # before login
        started = asyncio.get_running_loop().time() if accepted is None else accepted
        self.login_deadline = started + self.settings.prelogin_lifetime
        self.auth_failures = 0
        self.done = False
        self.logged_in = False  # from the login's success (or SMTP's delivery instead) on
        self.upstream: Upstream | None = None

    # ---- what subclasses provide -------------------------------------------------------
    async def greet(self) -> None:
        raise NotImplementedError

    async def handle_line(self, line: bytes) -> None:
        raise NotImplementedError

    async def say_bye(self, why: str) -> None:
        """Tell the client the connection ends (idle timeout, line too long, busy)."""
        raise NotImplementedError

    #: The protocol's words for a refused login: wrong credentials, an account that needs a
    #: person to act (re-authorize, enable), and a temporary failure.
    REFUSAL: ClassVar[dict[str, str]] = {}

    def refusal(self, err: ProxyAuthError) -> str:
        """The reply to a failed login, with a reason a person can act on."""
        msg = one_line(err.message)
        if err.kind == "credentials":
            return f"{self.REFUSAL['credentials']} {msg or 'Invalid address or password'}"
        if err.kind in ("reauth", "disabled", "refused"):
            return f"{self.REFUSAL['denied']} {msg}"
        if err.kind == "throttled" and err.retry_after:
            return f"{self.REFUSAL['temporary']} {msg} (retry in {err.retry_after} seconds)"
        return f"{self.REFUSAL['temporary']} {msg or 'Temporary failure, try again later'}"

    async def refuse(self, err: ProxyAuthError) -> None:
        """Answer a failed login in the protocol's own words."""
        await self.push(self.refusal(err))

    #: Whether logins may take a pooled connection (made by ``connect_greeted``, see pool.py).
    poolable: ClassVar[bool] = False

    @staticmethod
    async def connect_greeted(hub: Hub, ep: Endpoint, log: logging.Logger) -> Upstream:
        """Connect, read the greeting and start TLS where the endpoint wants it."""
        raise NotImplementedError

    async def open_upstream(self, grant: Grant) -> Upstream:
        """A new greeted upstream connection (TLS started where the endpoint wants it)."""
        return await self.connect_greeted(self.hub, grant.upstream, self.log)

    async def first_upstream(self, grant: Grant) -> Upstream:
        """A pooled connection when one is ready, else a new one."""
        pool = self.hub.pool
        if self.poolable and pool is not None:
            hub, ep, log = self.hub, grant.upstream, self.log
            up = pool.take((self.protocol, ep), lambda: self.connect_greeted(hub, ep, log))
            if up is not None:
                return up
        return await self.open_upstream(grant)

    async def upstream_auth(self, up: Upstream, grant: Grant, token: str) -> tuple[bool, str]:
        """SASL XOAUTH2/OAUTHBEARER upstream: (accepted, detail of a rejection).

        (False, detail) only when the server refused the token itself (a SASL failure
        challenge or the protocol's own authentication-failed answer); any other refusal
        raises UpstreamError('refused') with the server's text, so that it neither forces a
        refresh nor marks the account for re-authorization."""
        raise NotImplementedError

    async def accept_login(self, up: Upstream) -> None:
        """Answer the client's successful login."""
        raise NotImplementedError

    async def deliver_instead(self, grant: Grant) -> None:
        """SMTP: accept the login and take the mail to ``Backend.deliver`` (no upstream)."""
        raise NotImplementedError

    # ---- the write path ------------------------------------------------------------------
    async def push(self, text: str, secret: bool = False) -> None:
        """The one way to write a line to the client; secret lines are masked in the log."""
        self.log.debug("S: %s", mask_tail(text) if secret else text)
        self.writer.write(text.encode("utf-8") + b"\r\n")
        if self.logged_in:
            await self.writer.drain()
            return
        # Before login the client's reading is bounded like its writing: one that sends commands
        # and never reads the answers would otherwise hold the session in drain() for ever.
        try:
            async with self.prelogin_timeout():
                await self.writer.drain()
        except TimeoutError:
            raise ClientNotReading from None

    def read_command(self, line: bytes) -> tuple[str, bytes]:
        """Log a client line (masked) and split it into its upper-case verb and the rest."""
        self.log_client_line(line)
        verb, _, rest = line.rstrip(b"\r\n").partition(b" ")
        return verb.decode("ascii", "replace").upper(), rest

    def log_client_line(self, line: bytes) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            words = text.split(None, 3)  # any blanks: "a  LOGIN" and tabs hide a password too
            if any(w.upper() in ("LOGIN", "AUTHENTICATE", "AUTH", "PASS") for w in words[:2]):
                text = mask_tail(text)
            self.log.debug("C: %s", text)

    @property
    def credentials_allowed(self) -> bool:
        """Credentials travel only over TLS, or in the clear from loopback if allowed."""
        return self.tls or (
            self.settings.allow_plaintext_from_loopback and is_loopback(self.peer_ip)
        )

    @property
    def can_starttls(self) -> bool:
        return not self.tls and self.hub.server_ssl is not None

    def prelogin_timeout(self) -> asyncio.Timeout:
        """Waiting for the client before login: the idle timeout, cut short by the pre-login
        lifetime (a client may not keep a connection forever with a NOOP a minute)."""
        idle_end = asyncio.get_running_loop().time() + self.settings.idle_timeout_prelogin
        return asyncio.timeout_at(min(idle_end, self.login_deadline))

    async def readline(self) -> bytes:
        """Next client line, bounded in length and in waiting time."""
        async with self.prelogin_timeout():
            return await self.lines.readline()

    async def readexactly(self, n: int) -> bytes:
        async with self.prelogin_timeout():
            return await self.lines.readexactly(n)

    async def read_secret_line(self) -> bytes:
        """A SASL response line: never logged."""
        line = await self.readline()
        self.log.debug("C: ****")
        return line.rstrip(b"\r\n")

    async def unknown(self) -> bool:
        """Spend one unit of the unknown-command budget; False once it is used up."""
        self.budget -= 1
        return self.budget > 0

    async def start_tls(self) -> None:
        if self.lines.buf:
            # Plain text pipelined after STARTTLS would be read as if it came over TLS.
            self.log.info("%s: data after STARTTLS, closing", self.peer_ip)
            self.done = True
            return
        assert self.hub.server_ssl is not None
        await self.writer.start_tls(
            self.hub.server_ssl, ssl_handshake_timeout=self.settings.handshake_timeout
        )
        # Bounded reads over TLS too (the new transport was given the StreamReaderProtocol).
        transport = self.writer.transport
        protocol = transport.get_protocol()
        if isinstance(protocol, asyncio.StreamReaderProtocol):
            transport.set_protocol(BoundedReads(protocol, self.hub.read_buffer))
        self.tls = True
        self.lines.sniff_tls = False

    # ---- the connection's life -------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self.greet()
            while not self.done:
                line = await self.readline()
                self.commands += 1
                if self.commands > self.settings.max_prelogin_commands:
                    await self.say_bye("Too many commands without logging in")
                    break
                await self.handle_line(line)
        except TimeoutError:
            loop = asyncio.get_running_loop()
            if loop.time() >= self.login_deadline:
                why = "Too long without logging in, closing connection"
            else:
                why = "Idle timeout, closing connection"
            await self._quietly(self.say_bye(why))
        except LineTooLong:
            await self._quietly(self.say_bye("Line too long"))
        except TLSOnPlainPort:
            self.log.info("%s: TLS handshake on a plain-text port, closing", self.peer_ip)
        except ClientNotReading:
            self.log.info("%s: does not read the answers, closing", self.peer_ip)
        except (PeerGone, OSError):
            pass
        finally:
            if self.upstream is not None:
                self.upstream.close()
            await self._close()

    async def _quietly(self, coro: Awaitable[None]) -> None:
        """A goodbye: the client may be gone, or not read it (``push`` bounds that before login)."""
        try:
            await coro
        except (OSError, ClientNotReading):
            pass

    async def _close(self) -> None:
        """Close; before login, cut the connection if it is not closed within the goodbye's
        bound: close() would otherwise wait as long as the client leaves the last answers (or a
        TLS close_notify) unread, holding the descriptor."""
        self.writer.close()
        if self.logged_in:
            return
        try:
            async with asyncio.timeout(self.settings.goodbye_timeout):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            self.writer.transport.abort()

    async def login(self, address: str, password: str) -> None:
        """Check the password, log in upstream with a token, answer the client, then relay."""
        backend = self.hub.backend
        try:
            grant = await asyncio.to_thread(
                backend.authenticate, self.protocol, address, password, self.peer_ip
            )
        except ProxyAuthError as err:
            await self._refused(address, err)
            return
        except Exception:
            self.log.exception("backend.authenticate failed")
            internal = ProxyAuthError("unavailable", "Internal error, try again later")
            await self._refused(address, internal)
            return
        try:
            if grant.deliver:
                raise DeliverInstead(grant)
            up = await self._upstream_login(grant)
        except DeliverInstead as instead:
            self.logged_in = True
            await self.deliver_instead(instead.grant)
            return
        except ProxyAuthError as err:
            await self._refused(address, err)
            return
        except UpstreamError as exc:
            count_upstream_error(self.protocol, exc.reason)
            self.log.warning("upstream for %s unavailable: %s", address, exc.message)
            await self._refused(address, ProxyAuthError("unavailable", exc.message))
            return
        except Exception:
            # A backend (access_token, token_rejected) or protocol bug: answer, keep the
            # connection usable. The traceback carries no token: it is never in a message.
            self.log.exception("upstream login of account %s failed", grant.account_id)
            internal = ProxyAuthError("unavailable", "Internal error, try again later")
            await self._refused(address, internal)
            return
        count_login(self.protocol, "ok")
        self.log.info("login %s from %s", grant.address, self.peer_ip)
        self.logged_in = True
        await self.accept_login(up)
        await self._relay(grant, up)

    async def _refused(self, address: str, err: ProxyAuthError) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        count_login(self.protocol, err.kind)
        self.log.info("login refused for %r from %s: %s", address, self.peer_ip, err.kind)
        self.auth_failures += 1
        await self.refuse(err)
        if self.auth_failures >= self.settings.max_auth_failures:
            await self.say_bye("Too many failed logins")
            self.done = True

    async def _upstream_login(self, grant: Grant) -> Upstream:
        backend = self.hub.backend
        # The token (often an HTTP call) is fetched while the upstream connection is made,
        # unless the password check found a fresh one.
        fetch: asyncio.Future[str] | None = None
        if not grant.token:
            fetch = asyncio.ensure_future(asyncio.to_thread(backend.access_token, grant.account_id))
            fetch.add_done_callback(_consume)
        try:
            self.upstream = up = await self.first_upstream(grant)
        except BaseException:
            if fetch is not None:
                fetch.cancel()
            raise
        up.count(self.protocol)
        token = grant.token if fetch is None else await fetch
        try:
            ok, detail = await self.upstream_auth(up, grant, token)
        except UpstreamError as exc:
            if not up.pooled or exc.reason not in ("protocol", "timeout"):
                raise
            # The server dropped the pooled connection meanwhile: once more on a new one.
            self.log.info("pooled connection to %s lost, connecting anew", grant.upstream.host)
            up.close()
            self.upstream = up = await self.open_upstream(grant)
            up.count(self.protocol)
            ok, detail = await self.upstream_auth(up, grant, token)
        if ok:
            up.keep_tls_session(self.hub.upstream_ssl)
            return up
        up.close()
        self.upstream = None
        # Raises when a new token cannot help (a policy refusal, or one already recorded for
        # this very token): no token request for it.
        await asyncio.to_thread(backend.upstream_refused, grant.account_id, self.protocol, detail)
        self.log.info("upstream rejected the token of %s, refreshing: %s", grant.address, detail)
        fresh = await asyncio.to_thread(backend.access_token, grant.account_id, True)
        if fresh != token:
            self.upstream = up = await self.open_upstream(grant)
            ok, detail = await self.upstream_auth(up, grant, fresh)
            if ok:
                return up
            up.close()
            self.upstream = None
        count_upstream_error(self.protocol, "token_rejected")
        self.log.warning("upstream rejected a fresh token of %s: %s", grant.address, detail)
        reason = await asyncio.to_thread(
            backend.token_rejected, grant.account_id, self.protocol, detail
        )
        if reason:
            raise ProxyAuthError("refused", reason)
        raise ProxyAuthError("reauth", self.settings.reauth_message)

    async def _relay(self, grant: Grant, up: Upstream) -> None:
        backend, proto = self.hub.backend, self.protocol
        self.upstream = None  # the relay owns it now
        self.done = True
        try:
            backend.session_opened(grant.account_id, proto, self.peer_ip)
        except Exception:
            self.log.exception("backend.session_opened failed")
        relay = Relay(self.writer.transport, up.writer.transport, proto, self.settings.idle_timeout)
        try:
            # Bytes read past the login on either side go first.
            from_client, client_eof = pending(self.reader)
            from_up, up_eof = pending(up.reader)
            relay.start(
                self.lines.take() + from_client, up.lines.take() + from_up, client_eof, up_eof
            )
            try:
                await relay.done
            finally:
                relay.close()
        finally:
            into, out = relay.bytes
            self.log.info("session of %s ended: %d bytes in, %d out", grant.address, into, out)
            try:
                backend.session_closed(grant.account_id, proto, into, out)
            except Exception:
                self.log.exception("backend.session_closed failed")


class DeliverInstead(Exception):
    """The Backend delivers this session's mail itself (``Grant.deliver``)."""

    def __init__(self, grant: Grant):
        super().__init__(grant.address)
        self.grant = grant


def _consume(task: asyncio.Future[str]) -> None:
    """Mark a background result as seen, so an abandoned failure is not reported as an error."""
    if not task.cancelled():
        task.exception()


__all__ = ["DeliverInstead", "Session", "one_line"]
