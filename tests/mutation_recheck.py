"""Run the surviving mutants of a mutmut run against given test files (see tests/MUTATION.md).

Usage: ``.venv/bin/python -m tests.mutation_recheck mutants/<module>.txt TEST_FILE...``
``[-- PYTEST_ARGS]``.

mutmut resets every result when its test selection changes, so tests written after a run to
kill its survivors are checked here instead: each mutant that survived (or had no test) is
switched on in the mutated copy under ``mutants/`` (``MUTANT_UNDER_TEST``, as mutmut does) and
the test files run with ``-x``; a failing run kills it. The test files are copied into
``mutants/tests/`` first. Prints one line a mutant ("killed NAME" or "ALIVE NAME") and writes
the same lines to ``mutants/<module>.recheck.txt``, which tests/mutation_score.py reads.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ALIVE = {"survived", "no tests"}


def main(argv: list[str]) -> int:
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    else:
        extra = []
    if len(argv) < 2:
        print(__doc__)
        return 2
    results, tests = Path(argv[0]), argv[1:]
    alive = []
    for raw in results.read_text().splitlines():
        name, sep, status = raw.strip().rpartition(": ")
        if sep and "__mutmut_" in name and status in ALIVE:
            alive.append(name)
    for test in tests:
        shutil.copy(test, Path("mutants") / test)
    # As mutmut does: import once, then fork a child per mutant (pytest's start-up, the app's
    # imports, cost seconds each on a loaded machine).
    os.chdir("mutants")
    sys.path.insert(0, os.getcwd())
    for loaded in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        del sys.modules[loaded]  # this script's own package: pytest imports mutants/tests
    import pytest

    import app  # noqa: F401  (the heavy imports, once; the test files stay for pytest)
    import mailproxy  # noqa: F401

    still = []
    verdicts = []
    for name in alive:
        pid = os.fork()
        if pid == 0:
            os.environ["MUTANT_UNDER_TEST"] = name
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests, *extra])
            os._exit(int(code))
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        killed = code == 1
        verdicts.append(f"{'killed' if killed else 'ALIVE'} {name}\n")
        print(
            verdicts[-1] if code in (0, 1) else f"error {code}: {verdicts[-1]}", end="", flush=True
        )
        if not killed:
            still.append(name)
    os.chdir("..")
    out = results.with_suffix(".recheck.txt")
    out.write_text("".join(verdicts))
    print(f"{len(alive) - len(still)} of {len(alive)} killed; verdicts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
