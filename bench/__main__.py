"""Benchmarks of Auth-Email against a direct connection and against emailproxy.

    make bench                          # the full run (a few minutes)
    make bench BENCH_ARGS=--smoke       # everything, tiny, in seconds: checks the bench works
    .venv/bin/python -m bench --only bulk,logins --rounds 5
    .venv/bin/python -m bench --only idle --raise-inotify --profile idle

Needs root (the peers: tests/peers/up.sh). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bed import PeersSession, ensure_deps, log, new_bed  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="everything, tiny (seconds)")
    ap.add_argument(
        "--only", default="", help="comma list of: bulk,logins,burst,idle,smtp,herd,web"
    )
    ap.add_argument("--rounds", type=int, help="rounds per benchmark (default 3; smoke 1)")
    ap.add_argument("--messages", type=int, help="bulk IMAP messages (default 2000)")
    ap.add_argument("--idle", type=int, help="IDLE sessions (default 1000)")
    ap.add_argument("--cold", type=int, help="cold-cache logins per round (default 5)")
    ap.add_argument("--no-emailproxy", action="store_true", help="leave emailproxy out")
    ap.add_argument(
        "--bench-dovecot",
        action="store_true",
        help="IMAP from a Dovecot of the bench's own that serves many sessions per process "
        "(bench/dovecot.py) instead of the test suite's",
    )
    ap.add_argument(
        "--raise-inotify",
        action="store_true",
        help="raise fs.inotify.max_user_instances for the IDLE run (restored after)",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="comma list of benchmarks to run under py-spy (serve.py is sampled)",
    )
    ap.add_argument("--out", default="", help="write results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, instance)")
    return ap.parse_args(argv)


def options(args: argparse.Namespace) -> Any:
    from bench.runs import Options

    o = Options()
    if args.smoke:
        o = Options(
            rounds=1,
            bulk_messages=50,
            logins=3,
            cold_logins=1,
            burst=5,
            idle=20,
            smtp_messages=5,
            herd=10,
            web_clients=3,
            web_requests=3,
        )
    if args.rounds:
        o.rounds = args.rounds
    if args.messages:
        o.bulk_messages = args.messages
    if args.idle:
        o.idle = args.idle
    if args.cold is not None:
        o.cold_logins = args.cold
    o.emailproxy = not args.no_emailproxy
    return o


@contextlib.contextmanager
def raised_inotify(enabled: bool, need: int):
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    old = int(path.read_text()) if path.exists() else 0
    if not enabled or old >= need:
        yield
        return
    log(f"raising fs.inotify.max_user_instances {old} -> {need} for the IDLE run")
    path.write_text(str(need))
    try:
        yield
    finally:
        path.write_text(str(old))
        log(f"fs.inotify.max_user_instances restored to {old}")


@contextlib.contextmanager
def profiled(enabled: bool, pid: int, name: str, work: Path):
    """py-spy samples serve.py while the benchmark runs; a summary is printed after."""
    if not enabled:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = work / f"profile-{name}.txt"
    svg = work / f"profile-{name}.svg"
    procs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-r",
                "250",
                "--format",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [spy, "record", "-p", str(pid), "-r", "100", "-o", str(svg), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        summarize_profile(raw, name)
        log(f"profile of {name}: {raw} (collapsed stacks), {svg} (flame graph)")


PRODUCT_FILES = (
    {p.name for p in ROOT.glob("*.py")}
    | {f"mailproxy/{p.name}" for p in (ROOT / "mailproxy").glob("*.py")}
    | {p.name for p in (ROOT / "mailproxy").glob("*.py")}
)


def _file_of(frame: str) -> str:
    inside = frame.rpartition("(")[2]
    return inside.partition(":")[0]


def summarize_profile(raw: Path, name: str, top: int = 20) -> None:
    """Leaf frames, and the deepest product frame of each sample (where the time goes)."""
    if not raw.exists():
        log(f"py-spy wrote no profile for {name} (ptrace not permitted?)")
        return
    own: Counter[str] = Counter()
    deepest: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2].rstrip("-0123456789") or frames[0]
        frames = frames[1:] or frames
        total += n
        own[f"[{thread}] {frames[-1]}"] += n
        mine = [f for f in frames if _file_of(f) in PRODUCT_FILES]
        if mine:
            deepest[f"[{thread}] {mine[-1]} -> {frames[-1]}"] += n
            for f in set(mine):
                incl[f] += n
    print(
        f"\n--- py-spy: serve.py during {name}: {total} samples (250 Hz, all threads; "
        "idle threads not sampled) ---"
    )
    print("top leaf frames [thread] function (file:line):")
    for f, n in own.most_common(top):
        print(f"  {100 * n / max(total, 1):5.1f}%  {f}")
    print("deepest product frame -> leaf:")
    for f, n in deepest.most_common(top):
        print(f"  {100 * n / max(total, 1):5.1f}%  {f}")
    print("product functions, inclusive:")
    for f, n in incl.most_common(top):
        print(f"  {100 * n / max(total, 1):5.1f}%  {f}")


def main(argv: list[str]) -> int:
    args = parse(argv)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # the IDLE run's client holds a socket per session
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ensure_deps()
    from bench.runs import BENCHES, Result

    o = options(args)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHES)
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    prof = {b.strip() for b in args.profile.split(",") if b.strip()}
    results: dict[str, Result] = {}
    t_all = time.perf_counter()
    with PeersSession() as peers:
        bed = new_bed(peers, args.keep)
        try:
            if args.bench_dovecot:
                from bench.dovecot import BenchDovecot

                bed.dovecot = BenchDovecot(peers, bed.work)
                bed.dovecot.start()
            boxes = {"bulk": o.bulk_messages, "small": 3, "idle": 3, "herd": 3, "sink": 0}
            bed.make_instance(boxes, o.bulk_size)
            bed.start_serve()
            if o.emailproxy:
                bed.start_emailproxy()
            for name in chosen:
                log(f"== {name}")
                t0 = time.perf_counter()
                assert bed.serve is not None
                with (
                    raised_inotify(args.raise_inotify and name == "idle", o.idle + 200),
                    profiled(name in prof, bed.serve.pid, name, bed.work),
                ):
                    results[name] = BENCHES[name](bed, o)
                log(f"   ({time.perf_counter() - t0:.1f} s)")
        finally:
            bed.close()
            if not args.keep and not prof:
                shutil.rmtree(bed.work, ignore_errors=True)
            elif prof:
                log(f"work folder kept for the profiles: {bed.work}")
    print_table(results, o, time.perf_counter() - t_all)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    k: {"rows": v.rows, "targets": v.targets, "data": v.data}
                    for k, v in results.items()
                },
                indent=1,
                default=str,
            )
        )
    missed = [t for r in results.values() for t in r.targets if not t[2]]
    # smoke runs are too small to judge targets: they only show that everything runs
    return 1 if missed and not args.smoke else 0


def print_table(results: dict[str, Any], o: Any, seconds: float) -> None:
    print(f"\n## Results ({o.rounds} rounds, medians; {seconds:.0f} s in all)\n")
    print("| measurement | result |\n|---|---|")
    for r in results.values():
        for label, value in r.rows:
            print(f"| {label} | {value} |")
    print("\n## Targets\n\n| target | measured | |\n|---|---|---|")
    for r in results.values():
        for what, measured, met in r.targets:
            print(f"| {what} | {measured} | {'met' if met else '**missed**'} |")
    print()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main(sys.argv[1:]))
