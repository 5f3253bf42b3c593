"""The six benchmarks. Each runs its contenders interleaved over several rounds and returns rows
for the results table plus the targets it checks."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from bench.bed import ADMIN_EMAIL, ADMIN_PASSWORD, Bed, log
from bench.clients import IdleSession, Target, bulk_fetch, login_cycle, smtp_send


@dataclass
class Result:
    rows: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    targets: list[tuple[str, str, bool]] = field(default_factory=list)  # (target, measured, met)
    data: dict[str, Any] = field(default_factory=dict)

    def row(self, label: str, value: str) -> None:
        self.rows.append((label, value))
        log(f"  {label}: {value}")

    def target(self, what: str, measured: str, met: bool) -> None:
        self.targets.append((what, measured, met))
        log(f"  TARGET {'met' if met else 'MISSED'}: {what} ({measured})")


@dataclass
class Options:
    rounds: int = 3
    bulk_messages: int = 2000
    bulk_size: int = 25_000
    logins: int = 20  # login cycles per contender and round
    cold_logins: int = 5  # cold-cache logins per round
    burst: int = 50
    idle: int = 1000
    smtp_messages: int = 500
    smtp_size: int = 50_000
    smtp_nagle_rounds: int = 1
    herd: int = 100
    web_clients: int = 20
    web_requests: int = 40  # per client and page
    web_rate: float = 20.0  # requests/s of the open-loop run
    web_seconds: float = 15.0
    web_cpu_samples: int = 100  # per page, in-process, single-threaded
    emailproxy: bool = True


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def rotate(items: list[Any], r: int) -> list[Any]:
    """Round ``r``'s order: every contender goes first in some round."""
    k = r % len(items)
    return items[k:] + items[:k]


# ------------------------------------------------------------------------------------ 1 bulk


def bulk(bed: Bed, o: Options) -> Result:
    res = Result()
    names = ["direct", "proxy"] + (["emailproxy"] if o.emailproxy else [])
    targets: dict[str, Target] = {
        "direct": bed.direct("bulk"),
        "proxy": bed.proxy("bulk"),
    }
    if o.emailproxy:
        targets["emailproxy"] = bed.emailproxy_target("bulk")
    times: dict[str, list[float]] = {n: [] for n in names}
    size = 0
    for n in names:  # warm-up: page cache, Dovecot's index, caches of both proxies
        bulk_fetch(targets[n], bed.ctx, o.bulk_messages)
    for r in range(o.rounds):
        for n in rotate(names, r):
            t, size = bulk_fetch(targets[n], bed.ctx, o.bulk_messages)
            times[n].append(t)
        log(f"  bulk round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    med = {n: statistics.median(times[n]) for n in names}
    mb = size / 1e6
    res.data = {"times": times, "bytes": size, "messages": o.bulk_messages}
    res.row(
        "Bulk IMAP, messages × size",
        f"{o.bulk_messages} × {size // o.bulk_messages:,} B "
        f"({mb:.1f} MB literal data), {o.rounds} rounds",
    )
    for n in names:
        res.row(f"Bulk IMAP, {n}", f"{med[n]:.3f} s, {mb / med[n]:.1f} MB/s")
    res.row("Bulk IMAP, proxy / direct", ratio(med["proxy"], med["direct"]))
    per_round = [d / p for d, p in zip(times["direct"], times["proxy"], strict=True)]
    res.target(
        "Bulk IMAP proxy ≥ 0.95× direct's throughput in every round",
        ", ".join(f"{x:.2f}×" for x in per_round),
        min(per_round) >= 0.95,
    )
    if o.emailproxy:
        res.row("Bulk IMAP, emailproxy / direct", ratio(med["emailproxy"], med["direct"]))
        res.row("Bulk IMAP, proxy / emailproxy", ratio(med["proxy"], med["emailproxy"]))
        res.target(
            "Bulk IMAP proxy faster than emailproxy",
            ratio(med["proxy"], med["emailproxy"]),
            med["proxy"] < med["emailproxy"],
        )
    return res


# ------------------------------------------------------------------------------------ 2 logins


def logins(bed: Bed, o: Options) -> Result:
    res = Result()
    names = ["direct", "proxy warm"] + (["emailproxy"] if o.emailproxy else [])
    targets = {"direct": bed.direct("small"), "proxy warm": bed.proxy("small")}
    if o.emailproxy:
        targets["emailproxy"] = bed.emailproxy_target("small")
    samples: dict[str, list[float]] = {n: [] for n in [*names, "proxy cold"]}
    for n in names:  # warm-up (fills the auth cache, emailproxy's token)
        login_cycle(targets[n], bed.ctx)
    import psutil

    assert bed.serve is not None
    serve = psutil.Process(bed.serve.pid)
    cpu = 0.0  # serve.py's CPU seconds (user + system, all threads) during warm logins
    per_thread: dict[int, float] = {}
    for r in range(o.rounds):
        for n in rotate(names, r):
            before = serve.cpu_times()
            threads_before = thread_cpu(bed.serve.pid)
            for _ in range(o.logins):
                samples[n].append(login_cycle(targets[n], bed.ctx))
            if n == "proxy warm":
                after = serve.cpu_times()
                cpu += after.user + after.system - before.user - before.system
                for tid, t in thread_cpu(bed.serve.pid).items():
                    per_thread[tid] = per_thread.get(tid, 0.0) + t - threads_before.get(tid, 0.0)
        for _ in range(o.cold_logins):  # a new password each time: the auth cache misses
            password = bed.new_password("small")
            samples["proxy cold"].append(
                login_cycle(bed.proxy("small", password=password), bed.ctx)
            )
        # the warm target's password again (a new row: one untimed login warms the cache)
        restore_password(bed, "small")
        login_cycle(targets["proxy warm"], bed.ctx)
    p50 = {n: pct(v, 50) for n, v in samples.items()}
    p95 = {n: pct(v, 95) for n, v in samples.items()}
    res.data = {"samples": samples}
    for n in ["direct", "proxy cold", "proxy warm", *(["emailproxy"] if o.emailproxy else [])]:
        res.row(
            f"Login (connect+TLS, LOGIN, SELECT, LOGOUT), {n}",
            f"p50 {ms(p50[n])}, p95 {ms(p95[n])} (n={len(samples[n])})",
        )
    extra = p50["proxy warm"] - p50["direct"]
    warm_n = len(samples["proxy warm"])
    res.data["cpu_per_warm_login"] = cpu / warm_n
    res.row(
        "Login, serve.py CPU per warm login (user + system, all threads; psutil)",
        f"{cpu / warm_n * 1000:.1f} ms (n={warm_n})",
    )
    named = thread_names(bed.serve.pid)
    by_name: dict[str, float] = {}
    for tid, t in per_thread.items():
        name = named.get(tid, "other").rstrip("0123456789").rstrip("_")
        by_name[name] = by_name.get(name, 0.0) + t
    res.data["cpu_per_warm_login_by_thread"] = {k: v / warm_n for k, v in by_name.items()}
    res.row(
        "Login, serve.py CPU per warm login by thread (/proc task stats; names from py-spy dump)",
        ", ".join(
            f"{k} {v / warm_n * 1000:.1f} ms"
            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
            if v / warm_n >= 0.00005
        ),
    )
    res.row(
        "Login, proxy warm − direct (p50)",
        f"{extra * 1000:+.1f} ms ({ratio(p50['proxy warm'], p50['direct'])})",
    )
    res.row(
        "Login, proxy cold − direct (p50)", f"{(p50['proxy cold'] - p50['direct']) * 1000:+.1f} ms"
    )
    if o.emailproxy:
        res.row("Login, emailproxy / proxy warm (p50)", ratio(p50["emailproxy"], p50["proxy warm"]))
    res.target("Warm login p50 ≤ direct + 3 ms", f"{extra * 1000:+.1f} ms", extra <= 0.003)
    return res


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, from /proc."""
    import os
    from pathlib import Path

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id (py-spy dump; empty when it cannot attach)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        text = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(t): name for t, name in re.findall(r'Thread (\d+) \([^)]*\): "([^"]+)"', text)}


def restore_password(bed: Bed, box: str) -> None:
    """Put the standard bench password back (the other benchmarks log in with it)."""
    from bench.bed import MAIL_PASSWORD
    from mailboxes import linking
    from models import Account, MailPassword

    with bed.app.app_context():
        account = Account.get_by_id(bed.boxes[box].account_id)
        MailPassword.delete().where(MailPassword.account == account).execute()
        linking.add_password(bed.user, account, "bench", MAIL_PASSWORD)


@dataclass
class BurstCpu:
    """CPU seconds spent during one burst: by the whole machine (every process, ours too) and by
    serve.py alone. Over the burst's wall time, they say how many of the cores were busy."""

    machine: float = 0.0
    serve: float = 0.0


def busy_seconds() -> float:
    """The machine's CPU seconds spent so far, every core, idle and I/O wait left out."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)


def run_burst(
    target: Target, ctx: Any, n: int, serve_pid: int | None = None, cpu: BurstCpu | None = None
) -> tuple[int, float, list[str]]:
    """``n`` threads start a login cycle at the same moment: (succeeded, total seconds, errors).
    With ``cpu``, the machine's and serve.py's CPU seconds during the burst are added to it."""
    import psutil

    barrier = threading.Barrier(n + 1)
    errors: list[str] = []
    ends: list[float] = []

    def one() -> None:
        barrier.wait()
        try:
            login_cycle(target, ctx)
            ends.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    serve = psutil.Process(serve_pid) if cpu is not None and serve_pid else None
    serve_before = sum(serve.cpu_times()[:2]) if serve else 0.0
    machine_before = busy_seconds()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    if cpu is not None:
        cpu.machine += busy_seconds() - machine_before
        cpu.serve += sum(serve.cpu_times()[:2]) - serve_before if serve else 0.0
    total = (max(ends) - t0) if ends else float("nan")
    return len(ends), total, errors


def burst(bed: Bed, o: Options) -> Result:
    res = Result()
    names = ["direct", "proxy warm"] + (["emailproxy"] if o.emailproxy else [])
    targets = {"direct": bed.direct("small"), "proxy warm": bed.proxy("small")}
    if o.emailproxy:
        targets["emailproxy"] = bed.emailproxy_target("small")
    for n in names:
        login_cycle(targets[n], bed.ctx)  # warm
    runs: dict[str, list[tuple[int, float, list[str]]]] = {n: [] for n in [*names, "proxy cold"]}
    assert bed.serve is not None
    cpu = {n: BurstCpu() for n in names}
    for r in range(o.rounds):
        for n in rotate(names, r):
            runs[n].append(run_burst(targets[n], bed.ctx, o.burst, bed.serve.pid, cpu[n]))
        password = bed.new_password("small")  # all 50 with a password not checked yet
        runs["proxy cold"].append(
            run_burst(bed.proxy("small", password=password), bed.ctx, o.burst)
        )
        restore_password(bed, "small")
        login_cycle(targets["proxy warm"], bed.ctx)
    res.data = {n: [(ok, t, e[:3]) for ok, t, e in v] for n, v in runs.items()}
    for n, v in runs.items():
        oks = [ok for ok, _, _ in v]
        med = statistics.median(t for _, t, _ in v)
        errs = sorted({e for _, _, es in v for e in es})
        res.row(
            f"Burst of {o.burst} logins, {n}",
            f"{min(oks)}–{max(oks)}/{o.burst} ok, all done in {med:.2f} s (median of {len(v)})"
            + (f"; errors: {errs[:2]}" if errs else ""),
        )
    cores = os.cpu_count() or 1
    for n in names:
        wall = sum(t for _, t, _ in runs[n])
        res.row(
            f"Burst of {o.burst} logins, {n}: CPU",
            f"machine {cpu[n].machine / o.rounds:.2f} s a burst ({cpu[n].machine / wall:.1f} of "
            f"{cores} cores busy), serve.py {cpu[n].serve / o.rounds:.2f} s "
            f"({cpu[n].serve / o.rounds / o.burst * 1000:.1f} ms a login)",
        )
    # The direct burst's CPU plus serve.py's own, spread over every core at once: no proxy on
    # this machine can finish its burst sooner, however its work were divided.
    floor = (cpu["direct"].machine + cpu["proxy warm"].serve) / o.rounds / cores
    res.data["cpu"] = {n: (c.machine / o.rounds, c.serve / o.rounds) for n, c in cpu.items()}
    res.row(
        f"Burst of {o.burst} logins: lower bound for the proxy on {cores} cores",
        f"(direct's CPU + serve.py's) / cores = {floor:.2f} s",
    )
    warm = runs["proxy warm"]
    worst_ok = min(ok for ok, _, _ in warm)
    worst_t = max(t for _, t, _ in warm)
    direct_t = statistics.median(t for _, t, _ in runs["direct"])
    warm_t = statistics.median(t for _, t, _ in warm)
    res.target(
        f"{o.burst} simultaneous logins (proxy, warm cache) ≤ 1.3× direct, all ok",
        f"{worst_ok}/{o.burst} ok, {ratio(warm_t, direct_t)} (slowest round {worst_t:.2f} s)",
        worst_ok == o.burst and warm_t <= 1.3 * direct_t,
    )
    cold = runs["proxy cold"]
    res.target(
        f"All {o.burst} burst logins (proxy, cold cache: new password) within 1 s",
        f"{min(ok for ok, _, _ in cold)}/{o.burst} ok, slowest round "
        f"{max(t for _, t, _ in cold):.2f} s",
        min(ok for ok, _, _ in cold) == o.burst and max(t for _, t, _ in cold) <= 1.0,
    )
    return res


# ------------------------------------------------------------------------------------ 3 IDLE


class RSSWatch:
    """Samples a process's RSS (and its children's none: serve.py has none) every 50 ms."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.start_rss = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - process gone
                return
            time.sleep(0.05)

    def sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def vm_hwm(pid: int) -> int:
    text = open(f"/proc/{pid}/status").read()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else 0


async def hold_idle(
    bed: Bed, target: Target, n: int, box: str, rss_of: int = 0, watch: RSSWatch | None = None
) -> dict[str, Any]:
    """``n`` sessions IDLE at once; with ``rss_of`` (a pid) that process's RSS is noted when
    1,000, 5,000 and 9,000 sessions are up; with ``watch``, its peak before the sessions close
    (held and notified) apart from the peak of closing them all at once."""
    sessions = [IdleSession(target, bed.ctx) for _ in range(n)]
    gate = asyncio.Semaphore(64)  # TLS handshakes in flight at once from this client
    checkpoints = {c for c in (1000, 5000, 9000) if c <= n}
    rss_at: dict[int, int] = {}
    up_count = 0

    async def open_one(s: IdleSession) -> None:
        nonlocal up_count
        async with gate:
            try:
                await asyncio.wait_for(s.open(), 120)
            except Exception as exc:  # noqa: BLE001 - counted
                s.error = f"{type(exc).__name__}: {exc}"[:200]
                return
        up_count += 1
        if rss_of and up_count in checkpoints:
            import psutil

            rss_at[up_count] = psutil.Process(rss_of).memory_info().rss

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(s) for s in sessions))
    established = time.perf_counter() - t0
    up = [s for s in sessions if not s.error]
    await asyncio.sleep(1.0)  # let every IDLE settle on the server side
    subject = f"IDLE wake-up {time.time()}"
    t_deliver = time.perf_counter()
    await asyncio.to_thread(bed.peers.seed, bed.boxes[box].address, [_small(bed, box, subject)])
    t_saved = time.perf_counter()
    waiting = [s.done.wait() for s in up]
    try:
        await asyncio.wait_for(asyncio.gather(*waiting), 60)
    except TimeoutError:
        pass
    seen = [s.notified_at - t_deliver for s in up if s.notified_at is not None]
    errors = sorted({s.error for s in sessions if s.error and s.notified_at is None})
    if watch is not None:
        watch.sample()
    held_peak = watch.peak if watch is not None else 0
    await asyncio.gather(*(s.close() for s in sessions))
    return {
        "rss_peak_held": held_peak,
        "established_s": established,
        "up": len(up),
        "notified": len(seen),
        "save_s": t_saved - t_deliver,
        "all_notified_s": max(seen) if len(seen) == len(up) and seen else float("nan"),
        "p50_notified_s": pct(seen, 50) if seen else float("nan"),
        "errors": errors[:5],
        "rss_at": rss_at,
    }


def _small(bed: Bed, box: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "seed@example.test"
    msg["To"] = bed.boxes[box].address
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content("new mail for the IDLE benchmark\n")
    return msg.as_bytes()


def inotify_limit() -> int:
    try:
        return int(open("/proc/sys/fs/inotify/max_user_instances").read())
    except OSError:
        return 0


def idle(bed: Bed, o: Options) -> Result:
    res = Result()
    limit = inotify_limit()
    if limit < o.idle + 50:
        res.row(
            "IDLE, note",
            f"fs.inotify.max_user_instances = {limit} < {o.idle}: Dovecot's imap "
            "processes beyond it fall back to polling every 30 s (mailbox_idle_check_interval); "
            "run with --raise-inotify",
        )
    assert bed.serve is not None
    out: dict[str, dict[str, Any]] = {}
    for n in ["direct", "proxy"]:
        target = bed.direct("idle") if n == "direct" else bed.proxy("idle")
        if n == "proxy":
            login_cycle(target, bed.ctx)  # warm auth cache, as a running instance would be
            before = RSSWatch(bed.serve.pid)
            base = before.start_rss
        pid = bed.serve.pid if n == "proxy" else 0
        watch = before if n == "proxy" else None
        out[n] = asyncio.run(hold_idle(bed, target, o.idle, "idle", rss_of=pid, watch=watch))
        if n == "proxy":
            peak = before.stop()
            out[n]["rss_closed"] = before.proc.memory_info().rss
            out[n]["rss_base"] = base
            out[n]["rss_peak"] = max(peak, 0)
            out[n]["vmhwm"] = vm_hwm(bed.serve.pid)
        time.sleep(2)  # sessions wind down at Dovecot before the next contender
    res.data = out
    for n, d in out.items():
        res.row(
            f"{o.idle} IDLE sessions, {n}",
            f"{d['up']}/{o.idle} up in {d['established_s']:.2f} s; "
            f"{d['notified']}/{d['up']} notified, all within {d['all_notified_s']:.2f} s "
            f"(p50 {d['p50_notified_s']:.2f} s; doveadm save took {d['save_s']:.2f} s)"
            + (f"; errors: {d['errors'][:2]}" if d["errors"] else ""),
        )
    p = out["proxy"]
    mib = 1024 * 1024
    res.row(
        "IDLE, serve.py RSS",
        f"{p['rss_base'] / mib:.0f} MiB before → peak {p['rss_peak'] / mib:.0f} "
        f"MiB with {p['up']} sessions (VmHWM since start {p['vmhwm'] / mib:.0f} MiB); "
        f"≈{(p['rss_peak'] - p['rss_base']) / max(p['up'], 1) / 1024:.0f} KiB per session",
    )
    res.row(
        "IDLE, serve.py RSS peak by phase",
        f"held and notified {p['rss_peak_held'] / mib:.0f} MiB; with every session closing at "
        f"once {p['rss_peak'] / mib:.0f} MiB; after {p['rss_closed'] / mib:.0f} MiB",
    )
    if p["rss_at"]:
        res.row(
            "IDLE, serve.py RSS with N sessions up",
            ", ".join(f"{k:,}: {v / mib:.0f} MiB" for k, v in sorted(p["rss_at"].items())),
        )
    res.row(
        "IDLE, establish proxy / direct", ratio(p["established_s"], out["direct"]["established_s"])
    )
    # The target is about sessions held and notified; closing them all in the same instant
    # (every client gone at once) is reported beside it, in the row above.
    per = (p["rss_peak_held"] - p["rss_base"]) / max(p["up"], 1)
    at_9000 = p["rss_base"] + 9000 * per
    res.target(
        f"serve.py under 900 MB RSS with 9,000 IDLE sessions held and notified (measured "
        f"{o.idle}, extrapolated from the per-session figure when fewer)",
        f"{p['rss_peak_held'] / 1e6:.0f} MB at {p['up']}; {at_9000 / 1e6:.0f} MB at 9,000",
        p["up"] == o.idle and at_9000 < 900e6,
    )
    d = out["direct"]
    res.target(
        f"All {o.idle} IDLE sessions notified within 2 s of direct's time",
        f"{p['notified']}/{p['up']} in {p['all_notified_s']:.2f} s (direct "
        f"{d['all_notified_s']:.2f} s)",
        p["notified"] == o.idle and p["all_notified_s"] <= d["all_notified_s"] + 2.0,
    )
    return res


# ------------------------------------------------------------------------------------ 4 SMTP


def smtp(bed: Bed, o: Options) -> Result:
    res = Result()
    names = ["direct", "proxy"] + (["emailproxy"] if o.emailproxy else [])
    sender = bed.boxes["small"].address
    rcpt = bed.boxes["sink"].address
    targets = {"direct": bed.direct("small", smtp=True), "proxy": bed.proxy("small", smtp=True)}
    if o.emailproxy:
        targets["emailproxy"] = bed.emailproxy_target("small", smtp=True)
    from bench.bed import base64_lines

    body = base64_lines(o.smtp_size // 78, 76).replace(b"\n", b"\r\n")
    messages = [
        (
            f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <smtp-bench-{i}-{time.time_ns()}@example.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + body
        for i in range(o.smtp_messages)
    ]
    for n in names:
        smtp_send(targets[n], bed.ctx, sender, rcpt, messages[:3])  # warm-up
    mb = len(messages) * len(messages[0]) / 1e6
    # Two clients: smtplib as it is (Nagle on, like many mail clients) and with TCP_NODELAY.
    # The Nagle client gets fewer rounds: it is slow through either proxy (see README).
    variants = [
        ("client TCP_NODELAY", True, o.rounds),
        ("client with Nagle", False, o.smtp_nagle_rounds),
    ]
    all_times: dict[str, dict[str, list[float]]] = {}
    for label, nodelay, rounds in variants:
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in rotate(names, r):
                times[n].append(smtp_send(targets[n], bed.ctx, sender, rcpt, messages, nodelay))
            log(
                f"  smtp ({label}) round {r + 1}: "
                + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names)
            )
        all_times[label] = times
        med = {n: statistics.median(v) for n, v in times.items()}
        for n in names:
            res.row(
                f"SMTP {o.smtp_messages} × {len(messages[0]) // 1000} KB, {label}, {n}",
                f"{med[n]:.2f} s ({o.smtp_messages / med[n]:.0f} msg/s, {mb / med[n]:.1f} MB/s)",
            )
        res.row(f"SMTP, {label}, proxy / direct", ratio(med["proxy"], med["direct"]))
        if o.emailproxy:
            res.row(f"SMTP, {label}, emailproxy / direct", ratio(med["emailproxy"], med["direct"]))
        res.target(
            f"SMTP proxy ≤ 1.05× direct ({label})",
            ratio(med["proxy"], med["direct"]),
            med["proxy"] <= 1.05 * med["direct"],
        )
    res.data = {"times": all_times}
    return res


# ------------------------------------------------------------------------------------ 5 herd


def herd(bed: Bed, o: Options) -> Result:
    res = Result()
    box = bed.boxes["herd"]
    target = bed.proxy("herd")
    login_cycle(target, bed.ctx)  # the auth cache is warm: the herd is about the token
    before = bed.peers.token_requests(box.product_client_id)
    bed.expire_token("herd")
    ok, total, errors = run_burst(target, bed.ctx, o.herd)
    time.sleep(0.5)
    after = bed.peers.token_requests(box.product_client_id)
    requests_made = after - before
    res.data = {"ok": ok, "total_s": total, "token_requests": requests_made, "errors": errors[:5]}
    res.row(
        f"Refresh herd: {o.herd} concurrent logins, expired token",
        f"{ok}/{o.herd} ok in {total:.2f} s; {requests_made} token request(s) at the OAuth server"
        + (f"; errors: {sorted(set(errors))[:2]}" if errors else ""),
    )
    res.target(
        "Refresh herd causes exactly 1 token request",
        f"{requests_made} request(s), {ok}/{o.herd} logins ok",
        requests_made == 1 and ok == o.herd,
    )
    return res


# ------------------------------------------------------------------------------------ 6 web


def web(bed: Bed, o: Options) -> Result:
    import requests

    res = Result()
    base = f"http://127.0.0.1:{bed.ports['web']}"
    s = requests.Session()
    page = s.get(f"{base}/login", timeout=30).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
    assert token, "no CSRF token on the login page"
    answer = s.post(
        f"{base}/login",
        data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token.group(1)},
        timeout=30,
    )
    assert answer.ok and "/login" not in answer.url, f"sign-in failed: {answer.status_code}"
    cookies = s.cookies.get_dict()
    account = bed.boxes["small"]
    pages = {
        "accounts page (/)": "/",
        "authorization page (/accounts/new)": f"/accounts/new?address={account.address}",
        "account page (/accounts/<id>)": f"/accounts/{account.account_id}",
    }
    every = {**pages, **more_pages(bed, account)}
    for path in every.values():  # warm-up, and check each answers 200 signed in
        r = s.get(base + path, timeout=30, allow_redirects=False)
        assert r.status_code == 200, f"{path}: {r.status_code}"
    lat: dict[str, list[float]] = {k: [] for k in pages}
    lock = threading.Lock()

    def client(i: int) -> None:
        sess = requests.Session()
        sess.cookies.update(cookies)
        mine: dict[str, list[float]] = {k: [] for k in pages}
        for j in range(o.web_requests):
            for name, path in rotate(list(pages.items()), i + j):
                t0 = time.perf_counter()
                r = sess.get(base + path, timeout=30, allow_redirects=False)
                mine[name].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code}")
        with lock:
            for k, v in mine.items():
                lat[k].extend(v)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(o.web_clients) as pool:
        list(pool.map(client, range(o.web_clients)))
    wall = time.perf_counter() - t0
    total = sum(len(v) for v in lat.values())
    res.data = {"latency": lat}
    for name, v in lat.items():
        res.row(
            f"Web at {o.web_clients} clients, {name}", f"p50 {ms(pct(v, 50))}, p95 {ms(pct(v, 95))}"
        )
    res.row(
        "Web, throughput", f"{total / wall:.0f} requests/s over {wall:.1f} s ({total} requests)"
    )
    worst = max(pct(v, 95) for v in lat.values())
    res.row("Web p95 at 20 closed-loop clients (worst page)", ms(worst))
    open_loop(base, cookies, every, o, res)
    page_cpu(bed, every, o, res)
    return res


def more_pages(bed: Bed, account: Any) -> dict[str, str]:
    """The other main pages, as the bench's admin sees them (the account's own client)."""
    from models import Account

    with bed.app.app_context():
        client_id = Account.get_by_id(account.account_id).client_id
    return {
        "mail client settings (/accounts/<id>/mail-client)": (
            f"/accounts/{account.account_id}/mail-client"
        ),
        "account settings (/settings/)": "/settings/",
        "client editor (/settings/clients/<id>/edit)": f"/settings/clients/{client_id}/edit",
        "notifications (/settings/notifications)": "/settings/notifications",
        "admin: users (/admin/users)": "/admin/users",
        "admin: instance settings (/admin/settings)": "/admin/settings",
        "admin: audit log (/admin/audit)": "/admin/audit",
        "admin: health (/admin/health)": "/admin/health",
        "admin: notifications (/admin/notifications)": "/admin/notifications",
    }


def open_loop(
    base: str, cookies: dict[str, str], pages: dict[str, str], o: Options, res: Result
) -> None:
    """Requests sent at a fixed rate whatever the answers' latency (a page per request in
    turn); latency from the planned send time, so queueing in the client counts too."""
    import requests

    n = int(o.web_rate * o.web_seconds)
    local = threading.local()
    lat: dict[str, list[float]] = {k: [] for k in pages}
    errors: list[str] = []
    start = time.perf_counter() + 0.2
    items = list(pages.items())

    def one(i: int) -> None:
        name, path = items[i % len(items)]
        planned = start + i / o.web_rate
        delay = planned - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sess = getattr(local, "s", None)
        if sess is None:
            sess = local.s = requests.Session()
            sess.cookies.update(cookies)
        r = sess.get(base + path, timeout=30, allow_redirects=False)
        lat[name].append(time.perf_counter() - planned)
        if r.status_code != 200:
            errors.append(f"{path}: {r.status_code}")

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(n)))
    allv = [x for v in lat.values() for x in v]
    for name, v in lat.items():
        res.row(
            f"Web at {o.web_rate:.0f} requests/s (open loop, pages in turn), {name}",
            f"p50 {ms(pct(v, 50))}, p95 {ms(pct(v, 95))} (target p95 < 50 ms)",
        )
    p95 = pct(allv, 95)
    res.data["open_loop"] = {"latency": lat, "errors": errors}
    res.target(
        f"Web p95 < 50 ms at {o.web_rate:.0f} requests/s ({n} requests, all pages)",
        ms(p95) + (f", {len(errors)} errors" if errors else ""),
        p95 < 0.050 and not errors,
    )


def page_cpu(bed: Bed, pages: dict[str, str], o: Options, res: Result) -> None:
    """CPU per page in the bench process (Flask test client on the same instance, one
    thread): thread_time() around each request, so other processes' load does not count
    (though it still slows the core it shares). Pages in turn, so drifting load is shared."""
    import peewee

    app = bed.app
    c = app.test_client()
    page = c.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
    assert token, "no CSRF token on the login page"
    c.post(
        "/login",
        data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token.group(1)},
    )
    queries = {name: count_queries(peewee, c, path) for name, path in pages.items()}
    cpu: dict[str, list[float]] = {name: [] for name in pages}
    for path in pages.values():
        for _ in range(5):
            assert c.get(path).status_code == 200, path
    for _ in range(o.web_cpu_samples):
        for name, path in pages.items():
            t0 = time.thread_time()
            c.get(path)
            cpu[name].append(time.thread_time() - t0)
    worst = 0.0
    for name, v in cpu.items():
        med = pct(v, 50)
        worst = max(worst, med)
        res.row(
            f"Web CPU per request, single thread, {name}",
            f"median {ms(med)}, p10 {ms(pct(v, 10))}, {queries[name]} queries (target ≤ 3 ms)",
        )
    res.data["cpu"] = cpu
    res.data["queries"] = queries
    res.target("Each page <= 3 ms of CPU single-threaded (median)", ms(worst), worst <= 0.003)


def count_queries(peewee: Any, client: Any, path: str) -> int:
    """The SQL statements one request runs (peewee's execute_sql, counted)."""
    counted = [0]
    original = peewee.Database.execute_sql

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return original(self, *args, **kwargs)

    peewee.Database.execute_sql = counting
    try:
        client.get(path)
    finally:
        peewee.Database.execute_sql = original
    return counted[0]


# In the order they run. IDLE goes last: thousands of sessions leave serve.py's and the bench's
# heaps grown and the instance with thousands more audit rows and login outcomes, which the
# pages then show (after a 9,000-session run, SMTP and page CPU came out 1.3-2x slower).
BENCHES: dict[str, Callable[[Bed, Options], Result]] = {
    "bulk": bulk,
    "logins": logins,
    "burst": burst,
    "smtp": smtp,
    "herd": herd,
    "web": web,
    "idle": idle,
}
