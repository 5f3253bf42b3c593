"""Load tests of the proxy's instance-wide limits against a flood from many client addresses:
the global connection limit, and the failed-login limit per address from all IPs together.

Each attacker address is a distinct loopback source (``bind()`` to 127.0.x.y), so the per-IP
limits are never what stops them; ``python serve.py`` runs as in ``test_proxy_load``, with a
mailbox linked at the real peers. Bounded in count and time; only counts are asserted. The
figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import imaplib
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mailproxy.settings import LISTENER_NAMES, ProxySettings
from models import Account, AuditEvent, Throttle, User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, FAST_HASHING, make_app
from tests.helpers.linking import PeerInfo, token_requests
from tests.helpers.mail import PASSWORD, link_with_client_credentials
from tests.helpers.serving import free_port, serve_env, start_limited, wait_healthy

pytestmark = [pytest.mark.peers, pytest.mark.load]

OPEN_FILES = (1024, 1024)
MAX_CONNECTIONS, PER_IP = 120, 4  # the global connection limit, and each address's share
CONNECTING_SOURCES = 50  # x PER_IP connections each: 200, of which 80 over the global limit
GUESSING_SOURCES = 40  # x 2 connections x 3 wrong passwords: 240 guesses for one address
ADDRESS_LIMIT = 100  # LOGIN_FAILURE_LIMIT_PER_ADDRESS, the default
BACKEND_THREADS = ProxySettings().backend_threads  # password checks run on at most this many
MiB = 1 << 20
BUSY = b"* BYE Too many connections, try again later"


def source(block: int, n: int) -> str:
    """The n-th attacker address of a block: 127.0.<block>.<n>, never the real client's."""
    return f"127.0.{block}.{n}"


@dataclass
class Served:
    process: Any
    log: Path
    ports: dict[str, int]
    victim: Account  # the address the guessers aim at
    bystander: Account  # another user's mailbox on the same instance
    bed: PeerInfo

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}"

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(self.base + "/metrics", timeout=10).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.metric("mailproxy_sessions_open") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert self.metric("mailproxy_sessions_open") == 0

    def threads(self) -> int:
        return len(list(Path(f"/proc/{self.process.pid}/task").iterdir()))

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())


class IMAPFrom(imaplib.IMAP4):
    """Plain IMAP (allowed from loopback) from a chosen source address."""

    def __init__(self, source_ip: str, port: int) -> None:
        self.source_ip = source_ip
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source_ip, 0)
        )


def real_login(served: Served, account: Account, source_ip: str) -> str:
    """A real mail client with the right password: 'ok', or the proxy's words when refused."""
    try:
        conn = IMAPFrom(source_ip, served.ports["imap"])
    except (OSError, imaplib.IMAP4.error) as error:
        return f"greeting: {error}"
    try:
        conn.login(account.address, PASSWORD)
        typ, _ = conn.select("INBOX", readonly=True)
        conn.logout()
        return "ok" if typ == "OK" else f"select: {typ}"
    except imaplib.IMAP4.error as error:
        return str(error)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("flood")
    instance = tmp / "instance"
    app = make_app(instance, UPSTREAM_CA_FILE=peers.ca_file)
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
        other = users.create_user("bystander@example.org", "bystander-password-1", False)
    admin = User.get(User.email == ADMIN_EMAIL)
    victim = link_with_client_credentials(admin, peers, "victim")
    bystander = link_with_client_credentials(other, peers, "bystander")
    ports = {name: free_port() for name in ("web", *LISTENER_NAMES)}
    env = serve_env(
        instance,
        BIND=f"127.0.0.1:{ports['web']}",
        PUBLIC_URL=f"http://127.0.0.1:{ports['web']}",
        UPSTREAM_CA_FILE=peers.ca_file,
        CUSTOM_CLIENT_LOOPBACK="true",
        MAIL_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        MAIL_MAX_CONNECTIONS_PER_IP=str(PER_IP),
        **{name: str(value) for name, value in FAST_HASHING.items()},
        **{f"{n.upper()}_LISTEN": f"127.0.0.1:{ports[n]}" for n in LISTENER_NAMES},
    )
    log = tmp / "serve.log"
    process = start_limited(env, log, OPEN_FILES)
    try:
        served = Served(process, log, ports, victim, bystander, PeerInfo(peers))
        wait_healthy(served.base, process, log)
        # /healthz connects to every listener from 127.0.0.1: those count against the per-IP
        # limit until the proxy has accepted them and seen them close (a moment, under load)
        served.wait_idle()
        for _ in range(20):
            warm = real_login(served, bystander, "127.0.0.1")
            if "Too many connections" not in warm:
                break
            time.sleep(0.5)
        assert warm == "ok"  # the first login's imports and caches are not the flood
        yield served
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# ---- the global connection limit ----------------------------------------------------------------
async def hold_one(source_ip: str, port: int, held: list[asyncio.StreamWriter]) -> str:
    """Connect from ``source_ip`` and read the greeting: 'greeted' (kept open in ``held``),
    'busy' (the proxy's documented refusal), or what else happened."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0)), 10
        )
    except (OSError, TimeoutError) as error:
        return f"connect {type(error).__name__}"
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, TimeoutError) as error:
        writer.close()
        return f"greeting {type(error).__name__}"
    if line.startswith(b"* OK"):
        held.append(writer)
        return "greeted"
    writer.close()
    return "busy" if line.startswith(BUSY) else f"other {line[:60]!r}"


async def connection_flood(port: int, held: list[asyncio.StreamWriter]) -> list[str]:
    return await asyncio.gather(
        *(
            hold_one(source(3, n), port, held)
            for n in range(1, CONNECTING_SOURCES + 1)
            for _ in range(PER_IP)
        )
    )


def test_a_connection_flood_from_many_addresses_stops_at_the_global_limit(
    served: Served,
) -> None:
    served.wait_idle()
    before = served.rss()
    refused_before = served.metric("mailproxy_connections_refused_total", reason="limit")
    log_before = served.log_lines()

    async def flood_then_look() -> tuple[list[str], float, str]:
        held: list[asyncio.StreamWriter] = []
        try:
            outcomes = await connection_flood(served.ports["imap"], held)
            await asyncio.sleep(0.5)
            open_now = await asyncio.to_thread(served.metric, "mailproxy_sessions_open")
            fresh = await asyncio.to_thread(real_login, served, served.victim, source(4, 1))
        finally:
            for writer in held:
                writer.close()
        return outcomes, open_now, fresh

    outcomes, open_during, during = asyncio.run(flood_then_look())
    served.wait_idle()
    after_flood = real_login(served, served.victim, source(4, 2))
    refused = served.metric("mailproxy_connections_refused_total", reason="limit") - refused_before
    time.sleep(0.5)
    after = served.rss()
    counts = Counter(outcomes)
    logged = served.log_lines() - log_before
    print(
        f"\nFLOOD connections: {len(outcomes)} from {CONNECTING_SOURCES} addresses "
        f"({PER_IP} each, the per-address limit), global limit {MAX_CONNECTIONS}: "
        f"{dict(counts)}; sessions open during the flood {open_during:.0f}; refused for the "
        f"global limit (metric) {refused:.0f}; a real client from a fresh address during the "
        f"flood: {during!r}, after it: {after_flood!r}; RSS {before / MiB:.1f} -> "
        f"{after / MiB:.1f} MiB (+{(after - before) / MiB:.1f}); log +{logged} lines"
    )
    assert counts["greeted"] == MAX_CONNECTIONS
    assert counts["busy"] == len(outcomes) - MAX_CONNECTIONS
    assert open_during == MAX_CONNECTIONS
    assert "Too many connections, try again later" in during  # the documented refusal
    assert refused == counts["busy"] + 1  # each refusal counted once: none retried
    assert after_flood == "ok"
    assert after - before < 20 * MiB
    assert logged < 20  # refusals are logged once a minute, not once each


# ---- failed logins from many addresses, for one address ------------------------------------------
async def guess(source_ip: str, port: int, address: str, tag: str) -> list[str]:
    """One connection from ``source_ip`` guessing 3 different wrong passwords (the proxy's
    per-connection cap); the answer to each, as 'wrong', 'throttled' or what else came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0))
    answers: list[str] = []
    try:
        await asyncio.wait_for(reader.readline(), 10)
        for n in range(3):
            writer.write(f'a{n} LOGIN "{address}" "wrong-{tag}-{n}"\r\n'.encode())
            await writer.drain()
            line = b""
            while not line.startswith(f"a{n} ".encode()):
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    answers.append("closed")
                    return answers
            text = line.decode(errors="replace")
            if "Too many failed logins; try again in" in text:
                answers.append("throttled")
            elif "[AUTHENTICATIONFAILED]" in text or "Wrong address or password" in text:
                answers.append("wrong")
            else:
                answers.append(text.strip()[:80])
        rest = await asyncio.wait_for(reader.read(), 10)  # the proxy ends the connection
        answers.append("bye" if b"Too many failed logins" in rest else "no bye")
    except (OSError, TimeoutError) as error:
        answers.append(type(error).__name__)
    finally:
        writer.close()
    return answers


async def warm_up(port: int) -> None:
    """The same flood at an address nobody has, from other sources: the first one loads code,
    starts the worker threads and fills their caches, so the main flood shows what it adds."""
    await asyncio.gather(
        *(guess(source(7, n), port, "nobody@example.test", f"w{n}") for n in range(1, 41))
    )


async def guess_flood(port: int, address: str) -> list[list[str]]:
    async def one_source(n: int) -> list[str]:
        ip = source(5, n)
        first = await guess(ip, port, address, f"{n}a")
        return first + await guess(ip, port, address, f"{n}b")

    return await asyncio.gather(*(one_source(n) for n in range(1, GUESSING_SOURCES + 1)))


def test_failed_logins_from_many_addresses_stop_at_the_address_limit(served: Served) -> None:
    served.wait_idle()
    cold, cold_threads = served.rss(), served.threads()
    asyncio.run(warm_up(served.ports["imap"]))
    served.wait_idle()
    before = served.rss()
    log_before = served.log_lines()
    rows_before = Throttle.select().count()
    client_id = str(served.victim.client.client_id)
    token_asks_before = token_requests(served.bed, client_id)

    flood = asyncio.run(guess_flood(served.ports["imap"], served.victim.address))
    answers = [answer for per_source in flood for answer in per_source]

    throttle_rows = Throttle.select().count() - rows_before
    served.wait_idle()
    victim_fresh = real_login(served, served.victim, source(6, 1))
    bystander = real_login(served, served.bystander, source(6, 2))
    time.sleep(0.5)
    after = served.rss()
    counts = Counter(answers)
    address_row = Throttle.get_or_none(Throttle.key == f"mail:addr:{served.victim.address}")
    audited = wait_for_count(
        lambda: (
            AuditEvent.select()
            .where(
                (AuditEvent.action == "mail.login_failed")
                & (AuditEvent.target == served.victim.address)
            )
            .count()
        ),
        counts["wrong"],
    )
    token_asks = token_requests(served.bed, client_id) - token_asks_before
    logged = served.log_lines() - log_before
    print(
        f"\nFLOOD guesses: {GUESSING_SOURCES} addresses x 2 connections x 3 wrong passwords "
        f"for one mailbox (limits: 5 per address and IP, 20 per IP, {ADDRESS_LIMIT} per "
        f"address from all IPs): {dict(counts)}; verified and refused as wrong: "
        f"{counts['wrong']}, audited {audited}; the address's count "
        f"{address_row.failures if address_row else None}, blocked "
        f"{address_row is not None and address_row.blocked_until is not None}; throttle rows "
        f"{throttle_rows} new; token requests meanwhile {token_asks}; the right password from a "
        f"fresh address: {victim_fresh!r}; another user's mailbox: {bystander!r}; RSS "
        f"{cold / MiB:.1f} MiB ({cold_threads} threads) before a first flood of the same size "
        f"(at an unknown address), then ({served.threads()} threads, at most "
        f"{BACKEND_THREADS} for password checks) "
        f"{before / MiB:.1f} -> {after / MiB:.1f} MiB (+{(after - before) / MiB:.1f}); "
        f"log +{logged} lines"
    )
    guesses = GUESSING_SOURCES * 2 * 3
    assert counts["wrong"] == ADDRESS_LIMIT  # exactly the limit was ever verified
    assert counts["throttled"] == guesses - ADDRESS_LIMIT
    assert counts["bye"] == GUESSING_SOURCES * 2  # every connection ended after 3 failures
    assert audited == ADDRESS_LIMIT
    assert address_row is not None and address_row.failures == ADDRESS_LIMIT
    assert address_row.blocked_until is not None
    assert throttle_rows <= 2 * GUESSING_SOURCES + 1  # per IP, per (IP, address), the address
    # The address is paused for everyone: the documented refusal, with the wait to retry.
    assert "Too many failed logins; try again in" in victim_fresh and "retry in" in victim_fresh
    assert bystander == "ok"  # the limit is the address's, not the instance's
    assert token_asks == 0  # a failed login costs the provider nothing
    assert after - before < 20 * MiB  # the first flood's one-time cost is the threads', below
    assert served.threads() <= cold_threads + BACKEND_THREADS
    assert logged <= guesses + 20  # one line per refused login at most, no retry loops


def wait_for_count(count: Any, expected: int, timeout: float = 15) -> int:
    """``count()`` once it reaches ``expected`` (bookkeeping writes land a little later)."""
    deadline = time.monotonic() + timeout
    value = count()
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        value = count()
    return int(value)
