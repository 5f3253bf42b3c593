"""Re-run the table of issue 18: each one-line change must be caught by the test named for it.

Usage: ``.venv/bin/python -m tests.mutation_table [name ...]`` (with the PEERS_* environment).
Each change is applied to the working tree, the named test is run (it must fail), the file is
restored from a copy taken before, and the same test is run again (it must pass). Prints one
line per change; exits non-zero if a change survived or a test fails on the real code.
Not part of ``make test`` (see ``make mutation-table`` and tests/MUTATION.md).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Change:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


CHANGES = [
    Change(
        "disabled-owner",
        "mailboxes/mailbackend.py",
        "if not account.owner.is_enabled or account.state is AccountStatus.DISABLED:",
        "if account.state is AccountStatus.DISABLED:",
        (
            "tests/mail/test_mail_backend_guards.py::"
            "test_a_disabled_users_mailboxes_are_refused_over_imap_pop3_and_smtp",
        ),
    ),
    Change(
        "per-ip-count",
        "people/throttle.py",
        '        Key(f"{kind}:ip:{ip[:64]}", Policy(config["LOGIN_FAILURE_LIMIT_PER_IP"], block)),'
        "\n",
        "",
        (
            "tests/mail/test_mail_backend_guards.py::test_failures_from_one_ip_block_it_across_addresses",
        ),
    ),
    Change(
        "token-rejected",
        "mailboxes/mailbackend.py",
        "            stored = mailrefusals.record("
        "account_id, self._explain(account, protocol, detail))",
        "            stored = self._explain(account, protocol, detail)",
        (
            "tests/mail/test_mail_backend_guards.py::"
            "test_a_fresh_token_the_mail_server_refuses_is_recorded_for_that_protocol",
        ),
    ),
    Change(
        "rotation-drops-old-keys",
        "store/vault.py",
        "return Keyring(keys={**self.keys, **fresh.keys}, current=fresh.current)",
        "return Keyring(keys={**fresh.keys}, current=fresh.current)",
        (
            "tests/test_rotation_and_migrations.py::"
            "test_a_rotation_that_fails_midway_leaves_every_secret_readable",
        ),
    ),
    Change(
        "device-code-expiry",
        "mailboxes/linking.py",
        "    if pending.expires_at < utcnow():\n"
        "        raise AuthorizationProblem(oauth.EXPIRED)\n",
        "",
        (
            "tests/test_device_flow.py::"
            "test_an_expired_device_code_is_refused_without_asking_the_provider",
        ),
    ),
    Change(
        "imap-upstream-starttls",
        "mailproxy/imap.py",
        'if ep.security == "starttls":',
        "if False:",
        (
            "tests/mail/test_mail_backend_guards.py::test_the_upstream_starttls_comes_before_the_token",
        ),
    ),
    Change(
        "refresh-claim-cas",
        "oauth/tokens.py",
        ".where(_ID == account_id, Account.token_version == version)",
        ".where(_ID == account_id)",
        (
            "tests/tokens/test_token_guards.py::"
            "test_callers_that_load_the_same_version_at_once_make_one_refresh[sqlite]",
        ),
    ),
    Change(
        "renewal-margin",
        "oauth/tokens.py",
        "and account.token_expires_at > now + _margin(account)",
        "and account.token_expires_at > now",
        (
            "tests/tokens/test_token_guards.py::"
            "test_a_token_about_to_expire_is_renewed_before_it_is_handed_out[sqlite]",
        ),
    ),
]


def run(tests: tuple[str, ...]) -> bool:
    """Whether the tests pass."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", *tests]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return done.returncode == 0


def check(change: Change) -> tuple[bool, bool]:
    """(caught with the change, passes without it)."""
    path = ROOT / change.path
    original = path.read_text()
    if original.count(change.old) != 1:
        raise SystemExit(f"{change.name}: the line to change is not (once) in {change.path}")
    try:
        path.write_text(original.replace(change.old, change.new))
        caught = not run(change.tests)
    finally:
        path.write_text(original)
    return caught, run(change.tests)


def main(names: list[str]) -> int:
    failed = 0
    for change in CHANGES:
        if names and change.name not in names:
            continue
        caught, clean = check(change)
        verdict = "caught" if caught and clean else "SURVIVED" if clean else "TEST FAILS ON CODE"
        failed += verdict != "caught"
        print(f"{change.name:26} {change.path:20} {verdict:9} {' '.join(change.tests)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
