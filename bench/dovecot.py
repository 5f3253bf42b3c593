"""A Dovecot of the bench's own, beside the peers' one (``--bench-dovecot``).

Same mail folders, certificate and token check (introspection at the peers' OAuth server) as the
test suite's Dovecot, but IMAP only and configured so that Dovecot is not what the bench
measures: each ``imap`` process serves up to 1,000 sessions (the suite's serves one, ~5 MB and a
fork each), the login processes up to 2,000 connections each, and one user may hold 10,000
sessions from one IP. Its own folder, ports and log; the suite's peers are not touched. Messages
saved with the peers' ``doveadm`` reach its IDLE sessions too (the same Maildir; checked every
second, see OVERRIDES).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

SESSIONS_PER_PROCESS = 1000
MAX_SESSIONS = 10_000

OVERRIDES = f"""
# --- bench overrides (bench/dovecot.py) ---
# Sessions of one mailbox in one process share its inotify watch, and the first of them to end
# removes it for all (the others then wait for the 30 s check): check every second instead.
mailbox_idle_check_interval = 1 secs
protocol imap {{
  mail_max_userip_connections = {MAX_SESSIONS}
}}
service imap {{
  service_count = 0
  vsz_limit = 0
  client_limit = {SESSIONS_PER_PROCESS}
  process_limit = {MAX_SESSIONS // SESSIONS_PER_PROCESS + 8}
}}
service anvil {{
  client_limit = {MAX_SESSIONS + 1000}
}}
"""


def derive(conf: str, work: Path, ports: dict[str, int]) -> str:
    """The bench's config from the peers' one: own instance name, folders and ports; IMAP only;
    many sessions per process (OVERRIDES replace the ``service imap`` block)."""
    out = re.sub(r"(?m)^instance_name = .*$", "instance_name = auth-email-bench", conf)
    out = re.sub(r"(?m)^base_dir = .*$", f"base_dir = {work}/run", out)
    out = re.sub(r"(?m)^state_dir = .*$", f"state_dir = {work}/lib", out)
    out = re.sub(r"(?m)^(info_)?log_path = .*$", rf"\g<1>log_path = {work}/dovecot.log", out)
    out = re.sub(r"(?m)^protocols = .*$", "protocols = imap", out)
    out = re.sub(r"(?m)^default_client_limit = .*$", f"default_client_limit = {MAX_SESSIONS}", out)
    out = re.sub(r"(?ms)^protocol imap \{.*?^\}\n", "", out)
    out = re.sub(r"(?ms)^service imap \{.*?^\}\n", "", out)
    out = re.sub(r"(?ms)^service anvil \{.*?^\}\n", "", out)
    out = re.sub(r"(?ms)^(service imap-login \{.*?client_limit = )\d+", rf"\g<1>{2 * 1000}", out)
    for name, port in ports.items():
        out = re.sub(
            rf"(inet_listener {name} \{{\s*address = [^\n]+\n\s*port = )\d+", rf"\g<1>{port}", out
        )
    return out + OVERRIDES


class BenchDovecot:
    """Starts and stops the bench's Dovecot (``dovecot -c``), on the peers' mail address."""

    def __init__(self, peers: Any, work: Path) -> None:
        from bench.bed import free_port

        self.peers = peers
        self.work = work / "dovecot"
        self.host = peers.mail_host
        self.ports = {"imap": free_port(), "imaps": free_port()}
        self.conf = self.work / "dovecot.conf"

    @property
    def imaps_port(self) -> int:
        return self.ports["imaps"]

    def start(self) -> None:
        from bench.bed import log

        base = Path(self.peers.state_dir) / "dovecot" / "dovecot.conf"
        for sub in ("run", "lib"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(derive(base.read_text(), self.work, self.ports))
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True, timeout=30)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.imaps_port), 0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"bench Dovecot did not listen; see {self.work}/dovecot.log")
        log(f"bench Dovecot on {self.host}:{self.imaps_port} ({self.conf})")

    def stop(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], capture_output=True, timeout=30)
