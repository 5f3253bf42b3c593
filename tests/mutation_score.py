"""Per-module mutation scores from ``mutmut results --all true`` output (see tests/MUTATION.md).

Usage: ``.venv/bin/python -m tests.mutation_score mutants/results.txt [equivalent.txt]``.
Survivors that tests/mutation_recheck.py later killed ("killed NAME" lines in
``<results>.recheck.txt`` next to the results file) count as killed, in a column of their own.
A mutant counts as killed when a test failed (or timed out: the mutant hung the code) or the
type check caught it; "no tests" counts as survived (nothing would notice it). Mutants listed
in the optional file of equivalent mutants (one name per line, ``#`` comments) are left out.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
UNCHECKED = {"not checked", "check was interrupted by user", "skipped"}


def module_of(name: str) -> str:
    """``mailproxy.session.xǁSessionǁlogin__mutmut_3`` -> ``mailproxy/session.py``."""
    parts = name.split(".")
    for n, part in enumerate(parts):
        if part.startswith(("x_", "xǁ")):
            return "/".join(parts[:n]) + ".py"
    return "/".join(parts[:-1]) + ".py"


def scores(
    lines: list[str], equivalent: set[str], later: set[str] | None = None
) -> dict[str, Counter[str]]:
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        counts = by_module[module_of(name)]
        if name in equivalent:
            counts["equivalent"] += 1
        elif status in KILLED:
            counts["killed"] += 1
        elif name in (later or set()):
            counts["killed"] += 1
            counts["killed later"] += 1
        elif status in UNCHECKED:
            counts["unchecked"] += 1
        else:
            counts["survived"] += 1
    return by_module


def main(argv: list[str]) -> int:
    lines = Path(argv[0]).read_text().splitlines()
    equivalent: set[str] = set()
    if len(argv) > 1 and Path(argv[1]).exists():
        for raw in Path(argv[1]).read_text().splitlines():
            name = raw.split("#", 1)[0].strip()
            if name:
                equivalent.add(name)
    later: set[str] = set()
    recheck = Path(argv[0]).with_suffix(".recheck.txt")
    if recheck.exists():
        for raw in recheck.read_text().splitlines():
            verdict, _, name = raw.partition(" ")
            if verdict == "killed":
                later.add(name.strip())
    print(
        f"{'module':24} {'mutants':>7} {'killed':>7} {'(later)':>7} {'survived':>8} "
        f"{'equiv.':>6} {'unchecked':>9} {'score':>6}"
    )
    for module, c in sorted(scores(lines, equivalent, later).items()):
        judged = c["killed"] + c["survived"]
        total = judged + c["equivalent"] + c["unchecked"]
        score = f"{100 * c['killed'] / judged:.1f} %" if judged else "-"
        print(
            f"{module:24} {total:7} {c['killed']:7} {c['killed later']:7} {c['survived']:8} "
            f"{c['equivalent']:6} {c['unchecked']:9} {score:>6}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
