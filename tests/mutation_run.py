"""Run mutmut over one module against the test files that cover it (see tests/MUTATION.md).

Usage: ``.venv/bin/python tests/mutation_run.py mailproxy/pop3.py [max_children] [NAME...]``
(a script, not ``-m tests.mutation_run``: see tests/MUTATION.md).
``NAME`` (mutmut's names or globs, e.g. ``'oauth.tokens.x_expiry_of*'``) runs those mutants only,
keeping the results of the others: a module too slow for one session is finished in parts.

``[tool.mutmut]`` in pyproject.toml names every module and every test file; mutmut's stats run
over all of them takes long and reaches the real peers for every mutant. This runs one module
at a time: the same configuration with ``only_mutate`` narrowed to the module and the test
selection narrowed to the files listed for it below. mutmut resets its cached results when the
test selection changes, so each module's results are copied to ``mutants/<module>.txt``
(``mutmut results --all true``) at the end of its run; ``tests/mutation_score.py`` reads them.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

PROXY_IN_PROCESS = [
    "tests/relay/test_proxy_relay.py",
    "tests/test_proxy_prelogin.py",
    "tests/test_proxy_fuzz.py",
    "tests/test_proxy_protocol.py",
    "tests/test_proxy_limits.py",
    "tests/test_proxy_pool.py",
]
PROXY_NEW = ["tests/relay/test_proxy_dialogues.py"]
PROXY_WITH_PEERS = [
    "tests/test_proxy_e2e.py",
    "tests/mail/test_upstream_refusals.py",
    "tests/mail/test_mail_backend_guards.py",
]
# oauth/tokens.py on its own: the files that exercise the lifecycle, on SQLite only (its
# PostgreSQL paths are the same code; the claim's contention test contends on SQLite too).
# With PostgreSQL and the device/public-client files a survivor cost 20-90 s on the shared
# machine, and the module could not finish in a session (tests/MUTATION.md).
TOKENS_ONLY = [
    "tests/tokens/test_tokens.py",
    "tests/tokens/test_token_guards.py",
    "tests/tokens/test_token_refusals_said.py",
    "tests/test_token_renewal.py",
]
NOT_POSTGRES = ["-p", "no:cacheprovider", "-q", "--timeout", "120"]
NOT_POSTGRES += ["-m", "not browser and not postgres"]
# The proxy's own modules: the descriptor-squeeze test runs the proxy in a child process (the
# accept loop of controller.py, not these modules) and timed out twice in mutmut's traced stats
# run on the loaded machine, which stops the whole run (2026-12-02).
NOT_SQUEEZED = ["-p", "no:cacheprovider", "-q", "--timeout", "120", "-m", "not browser"]
NOT_SQUEEZED += [
    "--deselect",
    "tests/test_proxy_limits.py::test_out_of_file_descriptors_pauses_accepting_with_one_log_line",
]
# mailboxes/mailbackend.py: the files that call the backend in-process first (the real backend
# and database, no proxy), then the guard tests through the proxy and the peers. With the mail
# files of the peers (test_mail_through_app.py, test_upstream_refusals.py) a survivor of the
# login path cost a minute, and the module's 866 mutants could not finish in a session. The
# Graph (deliver, the SMTP switch) and notification (_note_use) paths are left to the recheck
# of the survivors with test_graph_delivery.py and test_notifications.py (tests/MUTATION.md).
BACKEND = [
    "tests/test_mailbackend.py",
    "tests/test_hardening_login.py",
    "tests/mail/test_login_shortcuts.py",
    "tests/mail/test_mail_backend_guards.py",
]
EXTRA_ARGS: dict[str, list[str]] = {
    "oauth/tokens.py": NOT_POSTGRES,
    "mailboxes/mailbackend.py": NOT_POSTGRES,
    "oauth/grants.py": NOT_POSTGRES,
    "mailproxy/imap.py": NOT_SQUEEZED,
    "mailproxy/session.py": NOT_SQUEEZED,
}

SELECTION: dict[str, list[str]] = {
    "store/vault.py": [
        "tests/test_vault.py",
        "tests/test_rotation_and_migrations.py",
        "tests/test_mutation_kills.py",
    ],
    "mailproxy/pop3.py": PROXY_IN_PROCESS + PROXY_NEW + PROXY_WITH_PEERS,
    "mailproxy/smtp.py": PROXY_IN_PROCESS
    + PROXY_NEW
    + PROXY_WITH_PEERS
    + ["tests/test_graph_delivery.py"],
    # In-process only: with the peers' files each surviving mutant took minutes on the shared
    # machine (2026-12-02); the dialogue tests script the upstream's every answer instead.
    "mailproxy/imap.py": PROXY_IN_PROCESS + PROXY_NEW,
    # In-process and dialogue files; the survivors are then run against PROXY_WITH_PEERS by
    # name (tests.mutation_recheck), not every mutant (tests/MUTATION.md, 2026-12-02).
    "mailproxy/session.py": PROXY_IN_PROCESS + PROXY_NEW,
    "oauth/tokens.py": TOKENS_ONLY,
    # grants.py: the in-process grant tests of test_tokens.py first; the files that make each
    # grant against the peers' OAuth server; SQLite only (EXTRA_ARGS).
    "oauth/grants.py": [
        "tests/tokens/test_tokens.py",
        "tests/tokens/test_token_refusals_said.py",
        "tests/test_device_flow.py",
        "tests/test_public_clients.py",
        "tests/test_linking.py",
        "tests/test_provider_fidelity.py",
    ],
    "mailboxes/mailbackend.py": BACKEND,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SELECTION:
        modules = ", ".join(SELECTION)
        print(f"usage: python tests/mutation_run.py MODULE [CHILDREN] [NAME...]; MODULE: {modules}")
        return 2
    module = argv[0]
    children = argv[1] if len(argv) > 1 else "1"
    names = argv[2:]

    from mutmut import configuration
    from mutmut.__main__ import cli

    read = configuration._config_reader
    override = {
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": SELECTION[module],
    }
    if module in EXTRA_ARGS:
        override["pytest_add_cli_args"] = EXTRA_ARGS[module]

    def narrowed() -> Any:
        plain = read()
        return lambda key, default: override[key] if key in override else plain(key, default)

    configuration._config_reader = narrowed
    configuration.reset_config()
    with contextlib.suppress(SystemExit):
        cli(["run", "--max-children", children, *names])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli(["results", "--all", "true"])
    target = Path("mutants") / (module.replace("/", ".") + ".txt")
    target.write_text(out.getvalue())
    print(f"results: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
