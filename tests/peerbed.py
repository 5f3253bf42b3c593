"""The end-to-end test bed: real OAuth server, Dovecot, Postfix and Chromium on 127.0.0.1.

A pytest plugin (``pytest_plugins = ["tests.peerbed"]``). ``tests/peers/up.sh`` starts the peers
once per session; the ``peers`` fixture returns a :class:`Peers` with their addresses and helpers.

OAuth server accounts: any ``<name>@example.test`` (or ``@example.net``) signs in with the
password ``pw-<name>``; its mailbox exists at Dovecot as soon as something is delivered to it.

Unavailable peers (not root, tools missing) skip the tests, but fail them when ``CI`` is set:
CI must never go green by skipping the end-to-end tests.

Lifetime: the peers are stopped at the end of the session by the last session that used them
(sessions register in ``$PEERS_STATE/users/``; several developers' sessions may share them),
unless ``PEERS_KEEP=1`` keeps them running for faster reruns. Stopping is safe either way:
``down.sh`` stops only what ``up.sh`` started, by pid.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import html
import imaplib
import json
import os
import poplib
import re
import secrets
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest
import requests

PEERS_DIR = Path(__file__).resolve().parent / "peers"
STATE = Path(os.environ.get("PEERS_STATE") or "/tmp/auth-email-peers")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOMAINS = ("example.test", "example.net")
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()

__all__ = [
    "OAuthError",
    "Peers",
    "browser",
    "op_password",
    "peers",
    "pkce_pair",
    "xoauth2",
    "oauthbearer",
]


def unavailable(reason: str) -> None:
    """Skip, or fail under CI (CI must not pass by skipping the end-to-end tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"test bed unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def op_password(address: str) -> str:
    """The OAuth server's password rule for its test accounts: ``pw-<local part>``."""
    return "pw-" + address.split("@", 1)[0].lower()


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def xoauth2(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial response (not base64-encoded)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def oauthbearer(user: str, token: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """The SASL OAUTHBEARER (RFC 7628) initial response (not base64-encoded)."""
    return f"n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"


class OAuthError(Exception):
    """An OAuth endpoint answered with an error (``status`` and the JSON ``body``)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.error = body.get("error")


class Peers:
    """Addresses of the running peers (every peers.json key is an attribute) and helpers."""

    host: str
    mail_host: str  # Dovecot: another loopback address, so it refuses authentication before TLS
    issuer: str
    auth_url: str
    token_url: str
    revocation_url: str
    introspection_url: str
    device_authorization_url: str
    registration_url: str
    registration_token: str
    imap_port: int
    imaps_port: int
    pop3_port: int
    pop3s_port: int
    submission_port: int
    submissions_port: int
    ca_file: str
    dovecot_conf: str

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.info = data
        mailproxy = data["clients"]["mailproxy"]
        self.client_id: str = mailproxy["client_id"]
        self.client_secret: str = mailproxy["client_secret"]
        self.redirect_uri: str = mailproxy["redirect_uris"][0]
        self.user: str = data["seeded_user"]
        self.password: str = op_password(self.user)
        self.http = requests.Session()

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("data") or {}
        if name in data:
            return data[name]
        raise AttributeError(name)

    # ----------------------------------------------------------------- TLS
    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the throwaway CA (and checks the host name)."""
        return ssl.create_default_context(cafile=self.ca_file)

    # ----------------------------------------------------------------- OAuth: clients
    def register_client(
        self,
        redirect_uris: Iterable[str] = (),
        grant_types: Iterable[str] = ("authorization_code", "refresh_token"),
        access_token_ttl: int | None = None,
        mailbox: str | None = None,
        token_endpoint_auth_method: str = "client_secret_basic",
        refresh_token_ttl: int | None = None,
        **metadata: Any,
    ) -> tuple[str, str]:
        """Register a client of its own for a test (RFC 7591); returns (client_id, secret).

        ``access_token_ttl``/``refresh_token_ttl`` are lifetimes in seconds; ``mailbox`` is the
        address a client_credentials token of this client is good for. The secret is "" for
        ``token_endpoint_auth_method="none"`` (public client).
        """
        grants = list(grant_types)
        body: dict[str, Any] = {
            "redirect_uris": list(redirect_uris),
            "grant_types": grants,
            "response_types": ["code"] if "authorization_code" in grants else [],
            "token_endpoint_auth_method": token_endpoint_auth_method,
            **metadata,
        }
        if access_token_ttl is not None:
            body["access_token_ttl"] = int(access_token_ttl)
        if refresh_token_ttl is not None:
            body["refresh_token_ttl"] = int(refresh_token_ttl)
        if mailbox is not None:
            body["mailbox"] = mailbox
        answer = self.http.post(
            self.registration_url,
            json=body,
            headers={"Authorization": f"Bearer {self.registration_token}"},
            timeout=10,
        )
        if answer.status_code != 201:
            raise OAuthError(answer.status_code, _json(answer))
        reg = answer.json()
        return reg["client_id"], reg.get("client_secret", "")

    # ----------------------------------------------------------------- OAuth: test endpoints
    def token_stats(self) -> dict[str, Any]:
        """The OAuth server's token endpoint counters: total, by_client, by_grant_type, recent."""
        answer = self.http.get(self.test_stats_url, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    def token_requests(self, client_id: str | None = None) -> int:
        """Requests that reached the token endpoint since the last reset (all, or one client's)."""
        stats = self.token_stats()
        if client_id is None:
            return int(stats["token_requests"])
        return int(stats["by_client"].get(client_id, 0))

    def reset_token_requests(self) -> None:
        self.http.post(self.test_stats_reset_url, timeout=10).raise_for_status()

    def revoke_grants(self, email: str | None = None, client_id: str | None = None) -> dict:
        """Revoke every grant (codes, access and refresh tokens) of a user and/or client.

        Also destroys matching client_credentials tokens. A refresh then fails with
        ``invalid_grant`` and Dovecot refuses the access tokens.
        """
        assert email or client_id, "email or client_id required"
        body = {k: v for k, v in {"email": email, "client_id": client_id}.items() if v}
        answer = self.http.post(self.test_revoke_url, json=body, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    # ----------------------------------------------------------------- OAuth: tokens
    def token_request(
        self,
        data: dict[str, str],
        client_id: str | None = None,
        client_secret: str | None = None,
        auth_method: str = "client_secret_basic",
    ) -> dict[str, Any]:
        """POST to the token endpoint; returns the JSON answer or raises :class:`OAuthError`."""
        client_id = client_id or self.client_id
        secret = self.client_secret if client_secret is None else client_secret
        form = dict(data)
        auth = None
        if auth_method == "client_secret_basic":
            auth = (client_id, secret)
        else:
            form["client_id"] = client_id
            if auth_method == "client_secret_post":
                form["client_secret"] = secret
        answer = self.http.post(self.token_url, data=form, auth=auth, timeout=10)
        if answer.status_code != 200:
            raise OAuthError(answer.status_code, _json(answer))
        return dict(answer.json())

    def client_credentials_token(
        self, client_id: str | None = None, client_secret: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        """A client_credentials token set (good for the client's ``mailbox``)."""
        return self.token_request(
            {"grant_type": "client_credentials"}, client_id, client_secret, **kw
        )

    def refresh(
        self,
        refresh_token: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """Refresh; refresh tokens rotate, so use the returned ``refresh_token`` next time."""
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self.token_request(data, client_id, client_secret, **kw)

    def introspect(self, token: str) -> dict[str, Any]:
        """What Dovecot sees for a token (as the ``dovecot`` resource server)."""
        dc = self.clients["dovecot"]
        form = {"token": token, "client_id": dc["client_id"], "client_secret": dc["client_secret"]}
        answer = self.http.post(self.introspection_url, data=form, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    def revoke_token(
        self, token: str, client_id: str | None = None, client_secret: str | None = None
    ) -> None:
        """RFC 7009 revocation of one token (access or refresh)."""
        client_id = client_id or self.client_id
        secret = self.client_secret if client_secret is None else client_secret
        answer = self.http.post(
            self.revocation_url, data={"token": token}, auth=(client_id, secret), timeout=10
        )
        answer.raise_for_status()

    def authorization_url(
        self,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        state: str = "",
        scope: str = "openid email offline_access",
        **extra: str,
    ) -> str:
        params = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state or secrets.token_urlsafe(8),
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        return f"{self.auth_url}?{urlencode(params)}"

    def user_agent_login(
        self,
        url: str,
        email: str,
        password: str | None = None,
        session: requests.Session | None = None,
        approve: bool = True,
    ) -> str:
        """Play the user at the OAuth server without a browser, starting at ``url``.

        Follows redirects through the login and consent forms (a product's "connect" URL that
        redirects to the OAuth server works too) and returns the first URL that leaves the OAuth
        server, i.e. the client's redirect URI with ``code`` and ``state`` (or ``error``), without
        requesting it: pass it to the product's own session. Raises on a refused login.
        """
        s = session or requests.Session()
        password = op_password(email) if password is None else password
        method, data = "GET", None
        for _ in range(20):
            answer = s.request(method, url, data=data, allow_redirects=False, timeout=15)
            if answer.is_redirect:
                nxt = urljoin(url, answer.headers["Location"])
                if not nxt.startswith(self.issuer) and url.startswith(self.issuer):
                    return nxt
                url, method, data = nxt, "GET", None
                continue
            if not url.startswith(self.issuer):
                raise AssertionError(f"{url} answered {answer.status_code}, not a redirect")
            page = answer.text
            if 'id="error"' in page:
                found = re.search(r'id="error"[^>]*>([^<]*)', page)
                raise OAuthError(answer.status_code, {"error": found.group(1) if found else page})
            if 'id="login-form"' in page:
                action = _form_action(page, "login-form")
                url, method = urljoin(url, action), "POST"
                data = {"login": email, "password": password}
            elif 'id="consent-form"' in page:
                action = _form_action(page, "consent-form" if approve else "deny-form")
                url, method, data = urljoin(url, action), "POST", {}
            else:
                raise AssertionError(f"unexpected page at {url}: {page[:500]}")
        raise AssertionError("too many redirects at the OAuth server")

    def authorization_code_tokens(
        self,
        email: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        redirect_uri: str | None = None,
        scope: str = "openid email offline_access",
        password: str | None = None,
        auth_method: str = "client_secret_basic",
    ) -> dict[str, Any]:
        """Authorization code + PKCE without a browser (login + consent forms over HTTP)."""
        client_id = client_id or self.client_id
        redirect_uri = redirect_uri or self.redirect_uri
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(8)
        url = self.authorization_url(client_id, redirect_uri, challenge, state, scope)
        back = self.user_agent_login(url, email, password)
        params = {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}
        if "code" not in params or params.get("state") != state:
            raise OAuthError(400, params)
        data = {
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        return self.token_request(data, client_id, client_secret, auth_method=auth_method)

    def approve_device(self, user_code: str, email: str, password: str | None = None) -> None:
        """Play the user of a device authorization: enter the code, sign in, allow."""
        s = requests.Session()
        page = s.get(self.device_verification_url, timeout=15)
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page.text)
        assert xsrf, page.text[:500]
        form = {"xsrf": xsrf.group(1), "user_code": user_code}
        answer = s.post(self.device_verification_url, data=form, timeout=15)
        for _ in range(10):
            text = answer.text
            if 'id="device-success"' in text:
                return
            if 'id="op.deviceConfirmForm"' in text:
                fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', text))
                action = _form_action(text, "op.deviceConfirmForm")
                answer = s.post(urljoin(answer.url, action), data=fields, timeout=15)
            elif 'id="login-form"' in text:
                data = {"login": email, "password": password or op_password(email)}
                action = _form_action(text, "login-form")
                answer = s.post(urljoin(answer.url, action), data=data, timeout=15)
            elif 'id="consent-form"' in text:
                action = _form_action(text, "consent-form")
                answer = s.post(urljoin(answer.url, action), data={}, timeout=15)
            else:
                raise AssertionError(f"unexpected device page: {text[:500]}")
        raise AssertionError("device approval did not finish")

    def deny_device(self, user_code: str) -> None:
        """Play a user who enters the device code and then aborts (the device gets
        ``access_denied``)."""
        s = requests.Session()
        page = s.get(self.device_verification_url, timeout=15)
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page.text)
        assert xsrf, page.text[:500]
        answer = s.post(
            self.device_verification_url,
            data={"xsrf": xsrf.group(1), "user_code": user_code},
            timeout=15,
        )
        assert 'id="op.deviceConfirmForm"' in answer.text, answer.text[:500]
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', answer.text))
        action = _form_action(answer.text, "op.deviceConfirmForm")
        s.post(urljoin(answer.url, action), data={**fields, "abort": "yes"}, timeout=15)

    # ----------------------------------------------------------------- mailboxes
    def new_mailbox(
        self, prefix: str = "user", messages: int = 3, domain: str = "example.test"
    ) -> tuple[str, str]:
        """A fresh, unique address (its INBOX seeded with ``messages``) and its OAuth password."""
        local = re.sub(r"[^a-z0-9.+-]", "-", prefix.lower()).strip("-.") or "user"
        address = f"{local[:40]}-{secrets.token_hex(4)}@{domain}"
        if messages:
            self.seed(address, messages)
        return address, op_password(address)

    def seed(
        self, address: str, messages: int | Iterable[EmailMessage | bytes | str], mailbox="INBOX"
    ) -> list[str]:
        """Put messages into a mailbox with ``doveadm save``; returns their subjects.

        ``messages`` is a count (subjects "Seed message 1..N") or the messages themselves.
        """
        if isinstance(messages, int):
            items: list[EmailMessage | bytes | str] = [
                _message(address, f"Seed message {i}", f"Seed message number {i}.")
                for i in range(1, messages + 1)
            ]
        else:
            items = list(messages)
        subjects = []
        for item in items:
            raw = item.as_bytes() if isinstance(item, EmailMessage) else item
            raw = raw.encode() if isinstance(raw, str) else raw
            self.doveadm("save", "-u", address, "-m", mailbox, input=raw)
            found = re.search(rb"^Subject: *(.*?)\r?$", raw, re.M | re.I)
            subjects.append(found.group(1).decode() if found else "")
        return subjects

    def doveadm(self, *args: str, input: bytes | None = None) -> str:
        """Run doveadm against the test Dovecot; returns stdout."""
        done = subprocess.run(
            ["doveadm", "-c", self.dovecot_conf, *args],
            input=input,
            capture_output=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")

    def message_count(self, address: str, mailbox: str = "INBOX") -> int:
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", address, "messages", mailbox)
        found = re.search(r"messages=(\d+)", out)
        return int(found.group(1)) if found else 0

    def subjects(self, address: str, mailbox: str = "INBOX") -> list[str]:
        """Subjects of the messages in a mailbox, in order."""
        out = self.doveadm("-f", "flow", "fetch", "-u", address, "hdr.subject", "mailbox", mailbox)
        return [m.strip() for m in re.findall(r"hdr\.subject=(.*)", out)]

    def wait_for_message(
        self, address: str, subject: str, timeout: float = 15, mailbox: str = "INBOX"
    ) -> bool:
        """Wait until a message with ``subject`` is in the mailbox (e.g. after an SMTP send)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                out = self.doveadm(
                    "search", "-u", address, "mailbox", mailbox, "header", "subject", subject
                )
                if out.strip():
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    # ----------------------------------------------------------------- mail clients (direct)
    def imap(
        self, address: str, token: str, tls: str = "starttls", mech: str = "XOAUTH2"
    ) -> imaplib.IMAP4:
        """An IMAP session at Dovecot, authenticated with a bearer token.

        ``tls`` is "starttls", "implicit" or "none". Raises ``imaplib.IMAP4.error`` if refused.
        """
        if tls == "implicit":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                self.mail_host, self.imaps_port, ssl_context=self.ssl_context(), timeout=15
            )
        else:
            conn = imaplib.IMAP4(self.mail_host, self.imap_port, timeout=15)
            if tls == "starttls":
                conn.starttls(self.ssl_context())
        port = self.imaps_port if tls == "implicit" else self.imap_port
        payload = (
            xoauth2(address, token)
            if mech == "XOAUTH2"
            else oauthbearer(address, token, self.mail_host, port)
        )
        sent: list[int] = []

        def answer(_challenge: bytes) -> bytes:
            # a second challenge is the JSON error: answer empty so the server says NO
            if sent:
                return b""
            sent.append(1)
            return payload.encode()

        try:
            conn.authenticate(mech, answer)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.shutdown()
            raise
        return conn

    def pop3(self, address: str, token: str, tls: str = "starttls") -> poplib.POP3:
        """A POP3 session at Dovecot with AUTH XOAUTH2; raises ``poplib.error_proto`` if refused.

        poplib has no AUTH helper and takes the "+ <JSON error>" line for success, so the
        command is sent raw and an error challenge is answered with an empty line.
        """
        if tls == "implicit":
            conn: poplib.POP3 = poplib.POP3_SSL(
                self.mail_host, self.pop3s_port, context=self.ssl_context(), timeout=15
            )
        else:
            conn = poplib.POP3(self.mail_host, self.pop3_port, timeout=15)
            if tls == "starttls":
                conn.stls(self.ssl_context())
        b64 = base64.b64encode(xoauth2(address, token).encode()).decode()
        try:
            resp = conn._shortcmd("AUTH XOAUTH2 " + b64)  # type: ignore[attr-defined]
            if not resp.startswith(b"+OK"):
                conn._putcmd("")  # type: ignore[attr-defined]
                conn._getresp()  # type: ignore[attr-defined]  # -ERR raises
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn

    def smtp(self, address: str, token: str, tls: str = "starttls") -> smtplib.SMTP:
        """An SMTP submission session at Dovecot with AUTH XOAUTH2.

        Raises ``smtplib.SMTPAuthenticationError`` if refused.
        """
        if tls == "implicit":
            conn: smtplib.SMTP = smtplib.SMTP_SSL(
                self.mail_host, self.submissions_port, context=self.ssl_context(), timeout=15
            )
        else:
            conn = smtplib.SMTP(self.mail_host, self.submission_port, timeout=15)
            if tls == "starttls":
                conn.starttls(context=self.ssl_context())
        conn.ehlo("tests.example.test")
        payload = xoauth2(address, token)
        try:
            conn.auth("XOAUTH2", lambda challenge=None: payload if challenge is None else "")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn


def _message(to: str, subject: str, body: str, sender: str = "seed@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content(body)
    return msg


def _json(answer: requests.Response) -> dict[str, Any]:
    try:
        body = answer.json()
        return body if isinstance(body, dict) else {"body": body}
    except ValueError:
        return {"error": "non_json", "body": answer.text[:500]}


def _form_action(page: str, form_id: str) -> str:
    found = re.search(rf'<form[^>]*id="{re.escape(form_id)}"[^>]*>', page)
    assert found, f"no form {form_id}"
    action = re.search(r'action="([^"]+)"', found.group(0))
    assert action, f"form {form_id} has no action"
    return html.unescape(action.group(1))


# --------------------------------------------------------------------------------- lifecycle


def _why_cannot_run() -> str | None:
    """Why the peers cannot be started here (None if they can)."""
    if os.geteuid() != 0:
        return "the peers need root (apt-get, Dovecot, Postfix, doveadm)"
    if not shutil.which("apt-get") and not all(
        shutil.which(t) for t in ("dovecot", "doveadm", "postfix", "openssl")
    ):
        return "Dovecot/Postfix are missing and apt-get is not available"
    if not shutil.which("node") and not shutil.which("apt-get"):
        return "node is missing"
    if not (PEERS_DIR / "up.sh").exists():
        return f"{PEERS_DIR / 'up.sh'} is missing"
    return None


@contextlib.contextmanager
def _users_lock() -> Iterator[None]:
    """Serialises registering/unregistering sessions (and the up/down that goes with it)."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / ".users.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _live_users() -> list[Path]:
    live = []
    for path in (STATE / "users").glob("*"):
        try:  # alive and still a Python process (pids get reused)
            cmdline = Path(f"/proc/{int(path.name)}/cmdline").read_bytes()
        except (ValueError, OSError):
            cmdline = b""
        if b"python" in cmdline or b"pytest" in cmdline:
            live.append(path)
        else:
            path.unlink(missing_ok=True)
    return live


def _run_script(name: str, log: Path) -> int:
    """Run up.sh/down.sh with output to a log file (never a pipe: daemons keep fds open)."""
    env = {**os.environ, "PEERS_STATE": str(STATE)}
    with open(log, "ab") as out:
        return subprocess.run(
            ["bash", str(PEERS_DIR / name)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=900,
        ).returncode


@pytest.fixture(scope="session")
def peers() -> Iterator[Peers]:
    """The running peers (started once per session by tests/peers/up.sh)."""
    reason = _why_cannot_run()
    if reason:
        unavailable(reason)
    log = STATE.parent / f"{STATE.name}-up.log"
    me = STATE / "users" / str(os.getpid())
    with _users_lock():
        (STATE / "users").mkdir(parents=True, exist_ok=True)
        me.touch()
        rc = _run_script("up.sh", log)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        me.unlink(missing_ok=True)
        unavailable(f"tests/peers/up.sh failed (rc={rc}); log {log}:\n{tail}")
    data = json.loads((STATE / "peers.json").read_text())
    bed = Peers(data)
    try:
        yield bed
    finally:
        with _users_lock():
            me.unlink(missing_ok=True)
            if os.environ.get("PEERS_KEEP") != "1" and not _live_users():
                _run_script("down.sh", STATE.parent / f"{STATE.name}-down.log")


@pytest.fixture
def browser(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium (Debian's chromium + chromedriver) with a fresh profile.

    On failure a screenshot and the page HTML land in test-artifacts/.
    """
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        request.getfixturevalue("peers")  # up.sh installs chromium when root
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        unavailable(f"{CHROMIUM} or {CHROMEDRIVER} missing")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        reports = request.node.stash.get(_REPORTS, {})
        if any(r.failed for r in reports.values()):
            _save_artifacts(driver, request.node.nodeid)
        with contextlib.suppress(Exception):
            driver.quit()


def _save_artifacts(driver: Any, nodeid: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-150:] + "-" + uuid.uuid4().hex[:6]
    with contextlib.suppress(Exception):
        driver.save_screenshot(str(ARTIFACTS / f"{stem}.png"))
    with contextlib.suppress(Exception):
        (ARTIFACTS / f"{stem}.html").write_text(
            f"<!-- {driver.current_url} -->\n{driver.page_source}", encoding="utf-8"
        )


# --------------------------------------------------------------------------------- hooks


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Keep each phase's report on the item, so fixtures can tell a test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "peers: needs the real peers (tests/peers/up.sh, root)")
    config.addinivalue_line("markers", "browser: drives headless Chromium (selenium)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using the fixtures get the markers too, so ``-m "not peers"`` selects reliably."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "browser" in names:
            item.add_marker(pytest.mark.browser)
        if "peers" in names and not item.get_closest_marker("peers"):
            item.add_marker(pytest.mark.peers)
