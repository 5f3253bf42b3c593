"""Per-module mutation scores from ``mutmut results --all true`` output (see tests/MUTATION.md).

Usage: ``.venv/bin/python -m tests.mutation_score mutants/results.txt [equivalent.txt]``.
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


def scores(lines: list[str], equivalent: set[str]) -> dict[str, Counter[str]]:
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
    print(
        f"{'module':24} {'killed':>7} {'survived':>8} {'equiv.':>6} {'unchecked':>9} {'score':>6}"
    )
    for module, c in sorted(scores(lines, equivalent).items()):
        judged = c["killed"] + c["survived"]
        score = f"{100 * c['killed'] / judged:.0f} %" if judged else "-"
        print(
            f"{module:24} {c['killed']:7} {c['survived']:8} {c['equivalent']:6} "
            f"{c['unchecked']:9} {score:>6}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
