"""The benchmark bed: peers, a temporary Auth-Email instance with linked accounts, the serving
process (``serve.py`` as a subprocess) and ``emailproxy``, all on 127.0.0.1.

Accounts are linked through the product's own code (``linking.start`` with a client-credentials
client registered at the test OAuth server, then ``linking.add_password``), exactly as the
"Other (custom server)" screen would do it; nothing is written into the database by hand except
where a benchmark needs a state (an expired token for the refresh herd, a fresh password for a
cold login).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PY = sys.executable

ADMIN_EMAIL = "bench-admin@example.org"
ADMIN_PASSWORD = "bench-admin-password-1"
MAIL_PASSWORD = "bench-mail-" + secrets.token_hex(6)
EMAILPROXY_PASSWORD = "ep-" + secrets.token_hex(6)  # emailproxy encrypts its tokens with it
TOKEN_TTL = 3600  # emailproxy refreshes 600 s before expiry: the peers' default 600 s is too short


def log(*args: Any) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def ensure_deps() -> None:
    """Install bench/requirements.txt into this venv when something is missing."""
    missing = [m for m in ("psutil", "emailproxy") if importlib.util.find_spec(m) is None]
    if missing:
        log("installing bench requirements (missing:", ", ".join(missing) + ")")
        subprocess.run(
            [
                PY,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
                str(BENCH / "requirements.txt"),
            ],
            check=True,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port}")


# ------------------------------------------------------------------------------------- peers


class PeersSession:
    """Starts the peers with tests/peers/up.sh and registers as a user of them (like pytest).

    Other sessions' teardown then leaves them running while the bench uses them; at the end the
    last user stops them unless PEERS_KEEP=1 (the rule of tests/peerbed.py).
    """

    def __enter__(self) -> Any:
        from tests import peerbed

        self.peerbed = peerbed
        reason = peerbed._why_cannot_run()
        if reason:
            raise SystemExit(f"bench: the peers cannot run here: {reason}")
        state = peerbed.STATE
        self.me = state / "users" / str(os.getpid())
        log("starting the peers (tests/peers/up.sh)")
        with peerbed._users_lock():
            (state / "users").mkdir(parents=True, exist_ok=True)
            self.me.touch()
            rc = peerbed._run_script("up.sh", state.parent / f"{state.name}-up.log")
        if rc != 0:
            self.me.unlink(missing_ok=True)
            raise SystemExit(f"bench: tests/peers/up.sh failed (rc={rc}), see its log")
        data = json.loads((state / "peers.json").read_text())
        return peerbed.Peers(data)

    def __exit__(self, *exc: object) -> None:
        peerbed = self.peerbed
        with peerbed._users_lock():
            self.me.unlink(missing_ok=True)
            if os.environ.get("PEERS_KEEP") != "1" and not peerbed._live_users():
                log("stopping the peers (tests/peers/down.sh; PEERS_KEEP=1 keeps them)")
                state = peerbed.STATE
                peerbed._run_script("down.sh", state.parent / f"{state.name}-down.log")


def seed_bulk(peers: Any, address: str, count: int, size: int, workdir: Path) -> None:
    """``count`` messages of about ``size`` bytes into INBOX, with one ``doveadm import``."""
    box = workdir / f"mbox-{secrets.token_hex(3)}"
    box.mkdir()
    body_line = 76
    lines = max(1, size // (body_line + 2))
    with open(box / "inbox", "wb") as f:
        for i in range(count):
            f.write(b"From seed@example.test Thu Jan  1 00:00:00 2026\n")
            f.write(
                f"From: Seeder <seed@example.test>\nTo: <{address}>\nSubject: Bulk {i}\n"
                f"Message-ID: <bulk-{i}-{secrets.token_hex(4)}@example.test>\n"
                "MIME-Version: 1.0\nContent-Type: application/octet-stream\n"
                "Content-Transfer-Encoding: base64\n\n".encode()
            )
            blob = base64_lines(lines, body_line)
            f.write(blob)
            f.write(b"\n")
    shutil.chown(box, "vmail", "vmail")
    shutil.chown(box / "inbox", "vmail", "vmail")
    peers.doveadm(
        "import",
        "-u",
        address,
        "-s",
        f"mbox:{box}:INBOX={box / 'inbox'}",
        "",
        "mailbox",
        "INBOX",
        "all",
    )
    shutil.rmtree(box, ignore_errors=True)
    got = peers.message_count(address)
    if got != count:
        raise RuntimeError(f"seeded {got} messages into {address}, expected {count}")


def base64_lines(lines: int, width: int) -> bytes:
    import base64

    raw = base64.b64encode(os.urandom(lines * width * 3 // 4 + 3))
    return b"\n".join(raw[i * width : (i + 1) * width] for i in range(lines)) + b"\n"


# ------------------------------------------------------------------------------------- the bed


@dataclass
class Mailbox:
    """One test mailbox: its Auth-Email account, and clients registered for it at the peer."""

    address: str
    account_id: int = 0
    product_client_id: str = ""  # the OAuth client the product's account uses
    ep_client_id: str = ""  # emailproxy's own client for the same mailbox
    ep_client_secret: str = ""
    token: str = ""  # a token for direct XOAUTH2 logins


@dataclass
class Bed:
    peers: Any
    work: Path
    ctx: ssl.SSLContext
    app: Any = None
    user: Any = None
    boxes: dict[str, Mailbox] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    serve: subprocess.Popen[bytes] | None = None
    emailproxy: subprocess.Popen[bytes] | None = None
    ep_config: Path | None = None
    dovecot: Any = None  # bench.dovecot.BenchDovecot with --bench-dovecot: IMAP goes there

    @property
    def imap_server(self) -> tuple[str, int]:
        """Where IMAP is served: the bench's own Dovecot, or the peers' one."""
        if self.dovecot is not None:
            return self.dovecot.host, self.dovecot.imaps_port
        return self.peers.mail_host, self.peers.imaps_port

    # -------------------------------------------------------------- instance and accounts
    def make_instance(self, boxes: dict[str, int], bulk_size: int) -> None:
        """A fresh instance with an admin and one linked account per entry of ``boxes``.

        ``boxes`` maps a name to the number of messages its INBOX gets (the bulk mailbox gets
        messages of ``bulk_size`` bytes, the others small ones).
        """
        from app import create_app

        self.ports = {
            name: free_port()
            for name in ("web", "imap", "imaps", "submission", "smtps", "ep_imap", "ep_smtp")
        }
        instance = self.work / "instance"
        self.app = create_app(
            {
                "INSTANCE_PATH": str(instance),
                "PUBLIC_URL": f"http://127.0.0.1:{self.ports['web']}",
                "UPSTREAM_CA_FILE": self.peers.ca_file,
                "CUSTOM_CLIENT_LOOPBACK": True,  # the peers listen on loopback
            }
        )
        from mailboxes import linking
        from models import OAuthClient
        from people import users
        from web.mailsetup import tls_files

        # The mail listeners use the certificate a new instance generates (ECDSA P-256), as a
        # new user's would; the bench's clients trust it beside the peers' CA.
        self.ctx.load_verify_locations(cafile=tls_files(self.app)[0])
        p = self.peers
        with self.app.app_context():
            self.user = users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
            for name, messages in boxes.items():
                address = f"bench-{name}-{secrets.token_hex(4)}@example.test"
                box = Mailbox(address)
                if name == "bulk":
                    seed_bulk(p, address, messages, bulk_size, self.work)
                elif messages:
                    p.seed(address, messages)
                cid, secret = p.register_client(
                    grant_types=["client_credentials"], mailbox=address, access_token_ttl=TOKEN_TTL
                )
                box.product_client_id = cid
                client = OAuthClient.create(
                    owner=self.user,
                    name=f"peer {name}",
                    provider="other",
                    grant="client_credentials",
                    token_url=p.token_url,
                    revocation_url=p.revocation_url,
                    scope="mail",
                    client_id=cid,
                    client_secret=secret,
                    imap_host=self.imap_server[0],
                    imap_port=self.imap_server[1],
                    imap_security="tls",
                    smtp_host=p.mail_host,
                    smtp_port=p.submissions_port,
                    smtp_security="tls",
                )
                started = linking.start(self.user, address, client, "")
                if started.done is None or not started.done.ok:
                    raise RuntimeError(f"linking {address} failed: {started.done}")
                box.account_id = started.account.id
                linking.add_password(self.user, started.account, "bench", MAIL_PASSWORD)
                ep_id, ep_secret = p.register_client(
                    grant_types=["client_credentials"],
                    mailbox=address,
                    access_token_ttl=TOKEN_TTL,
                    token_endpoint_auth_method="client_secret_post",
                )
                box.ep_client_id, box.ep_client_secret = ep_id, ep_secret
                direct_id, direct_secret = p.register_client(
                    grant_types=["client_credentials"], mailbox=address, access_token_ttl=TOKEN_TTL
                )
                box.token = str(
                    p.client_credentials_token(direct_id, direct_secret)["access_token"]
                )
                self.boxes[name] = box
                log(f"linked {address} ({messages} messages) as account {box.account_id}")

    # -------------------------------------------------------------- the serving process
    def serve_env(self) -> dict[str, str]:
        p = self.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_EMAIL_")}
        env.update(
            AUTH_EMAIL_INSTANCE=str(self.work / "instance"),
            AUTH_EMAIL_PUBLIC_URL=f"http://127.0.0.1:{p['web']}",
            AUTH_EMAIL_BIND=f"127.0.0.1:{p['web']}",
            AUTH_EMAIL_IMAP_LISTEN=f"127.0.0.1:{p['imap']}",
            AUTH_EMAIL_IMAPS_LISTEN=f"127.0.0.1:{p['imaps']}",
            AUTH_EMAIL_POP3_LISTEN="",
            AUTH_EMAIL_POP3S_LISTEN="",
            AUTH_EMAIL_SUBMISSION_LISTEN=f"127.0.0.1:{p['submission']}",
            AUTH_EMAIL_SMTPS_LISTEN=f"127.0.0.1:{p['smtps']}",
            AUTH_EMAIL_UPSTREAM_CA_FILE=self.peers.ca_file,
            AUTH_EMAIL_CUSTOM_CLIENT_LOOPBACK="1",
            # every benchmark client comes from 127.0.0.1: up to 9,000 IDLE sessions (serve.py
            # lowers the total to what its open-file limit holds: 2 files a session)
            AUTH_EMAIL_MAIL_MAX_CONNECTIONS="10000",
            AUTH_EMAIL_MAIL_MAX_CONNECTIONS_PER_IP="10000",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start_serve(self) -> None:
        """Start serve.py (a new process: the auth cache starts cold)."""
        self.stop_serve()
        out = open(self.work / "serve.log", "ab")
        self.serve = subprocess.Popen(
            [PY, str(ROOT / "serve.py")],
            cwd=ROOT,
            env=self.serve_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        wait_port(self.ports["imaps"], self.serve, "serve.py")
        wait_port(self.ports["web"], self.serve, "serve.py")
        log(f"serve.py running (pid {self.serve.pid})")

    def stop_serve(self) -> None:
        stop(self.serve)
        self.serve = None

    # -------------------------------------------------------------- emailproxy
    def emailproxy_config(self) -> str:
        p, ports = self.peers, self.ports
        cert, key = p.server_cert_file, p.server_key_file
        parts = [
            "[emailproxy]\ndelete_account_token_on_password_error = False\n",
            f"[IMAP-{ports['ep_imap']}]\nlocal_address = 127.0.0.1\n"
            f"server_address = {self.imap_server[0]}\n"
            f"server_port = {self.imap_server[1]}\nlocal_certificate_path = {cert}\n"
            f"local_key_path = {key}\n",
            f"[SMTP-{ports['ep_smtp']}]\nlocal_address = 127.0.0.1\n"
            f"server_address = {p.mail_host}\n"
            f"server_port = {p.submissions_port}\nserver_starttls = False\n"
            f"local_certificate_path = {cert}\nlocal_key_path = {key}\n",
        ]
        for box in self.boxes.values():
            parts.append(
                f"[{box.address}]\ntoken_url = {p.token_url}\noauth2_scope = mail\n"
                f"oauth2_flow = client_credentials\nclient_id = {box.ep_client_id}\n"
                f"client_secret = {box.ep_client_secret}\n"
            )
        return "\n".join(parts)

    def start_emailproxy(self) -> None:
        """Start emailproxy from a fresh copy of its config (it binds tokens to a password)."""
        self.stop_emailproxy()
        self.ep_config = self.work / f"emailproxy-{secrets.token_hex(3)}.config"
        self.ep_config.write_text(self.emailproxy_config())
        env = {**os.environ, "SSL_CERT_FILE": self.peers.ca_file, "PYTHONUNBUFFERED": "1"}
        out = open(self.work / "emailproxy.out", "ab")
        self.emailproxy = subprocess.Popen(
            [
                PY,
                "-m",
                "emailproxy",
                "--no-gui",
                "--config-file",
                str(self.ep_config),
                "--log-file",
                str(self.work / "emailproxy.log"),
            ],
            cwd=self.work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        wait_port(self.ports["ep_imap"], self.emailproxy, "emailproxy")
        wait_port(self.ports["ep_smtp"], self.emailproxy, "emailproxy")
        log(f"emailproxy running (pid {self.emailproxy.pid})")

    def stop_emailproxy(self) -> None:
        stop(self.emailproxy)
        self.emailproxy = None

    # -------------------------------------------------------------- targets
    def direct(self, box: str, smtp: bool = False) -> Any:
        from bench.clients import Target

        b = self.boxes[box]
        if smtp:
            host, port = self.peers.mail_host, self.peers.submissions_port
        else:
            host, port = self.imap_server
        return Target("direct", host, port, b.address, token=b.token)

    def proxy(self, box: str, smtp: bool = False, password: str = MAIL_PASSWORD) -> Any:
        from bench.clients import Target

        port = self.ports["smtps" if smtp else "imaps"]
        return Target("proxy", "127.0.0.1", port, self.boxes[box].address, password=password)

    def emailproxy_target(self, box: str, smtp: bool = False) -> Any:
        from bench.clients import Target

        port = self.ports["ep_smtp" if smtp else "ep_imap"]
        b = self.boxes[box].address
        return Target("emailproxy", "127.0.0.1", port, b, password=EMAILPROXY_PASSWORD)

    # -------------------------------------------------------------- database states
    def new_password(self, box: str) -> str:
        """Replace the account's mail-client passwords by a fresh one (next login: cold cache)."""
        from mailboxes import linking
        from models import Account, MailPassword

        with self.app.app_context():
            account = Account.get_by_id(self.boxes[box].account_id)
            MailPassword.delete().where(MailPassword.account == account).execute()
            return linking.add_password(self.user, account, "bench")

    def expire_token(self, box: str) -> None:
        import datetime as dt

        from models import Account, utcnow

        with self.app.app_context():
            Account.update(token_expires_at=utcnow() - dt.timedelta(minutes=5)).where(
                Account.id == self.boxes[box].account_id
            ).execute()

    def close(self) -> None:
        self.stop_emailproxy()
        self.stop_serve()
        if self.dovecot is not None:
            self.dovecot.stop()


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def new_bed(peers: Any, keep: bool) -> Bed:
    work = Path(tempfile.mkdtemp(prefix="auth-email-bench-"))
    os.chmod(work, 0o755)  # vmail reads the bulk mbox from here
    if keep:
        log(f"work folder (kept): {work}")
    ctx = ssl.create_default_context(cafile=peers.ca_file)
    return Bed(peers=peers, work=work, ctx=ctx)
