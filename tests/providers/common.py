"""What the simulators share: a clock tests can move, JWTs, an HTTPS server, request counting
and the faults a token endpoint can be told to play.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

# The faults a token endpoint can play (``token_fault``):
FAULTS = (
    "hang",  # accept the request and answer nothing until the client gives up
    "html",  # 200 with an HTML page (a captive portal, a proxy's error page)
    "truncated",  # 200 with the JSON cut off in the middle
    "no_access_token",  # 200 JSON without access_token
    "expires_in_text",  # 200 JSON with "expires_in": "one hour"
    "unavailable",  # 503 with Retry-After
    "throttled",  # the provider's own throttling answer (Entra: 50196 / 429; Google: 429)
)


class Clock:
    """Wall-clock time plus an offset a test can move forward (token lifetimes, 7-day expiry)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def guid() -> str:
    return str(uuid.uuid4())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HS256 JWTs with a per-simulator key. Real tokens are RS256; clients treat them as opaque
    (Microsoft says so), so only the simulator itself ever checks the signature."""

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)

    def encode(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "HS256", "kid": "simulator"}
        head = b64url(json.dumps(header, separators=(",", ":")).encode())
        body = b64url(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self.key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url(sig)}"

    def decode(self, token: str) -> dict[str, Any] | None:
        """The claims if the token is one of ours and untampered (expiry is the caller's)."""
        try:
            head, body, sig = token.split(".")
            want = hmac.new(self.key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, b64url_decode(sig)):
                return None
            claims = json.loads(b64url_decode(body))
        except (ValueError, TypeError):
            return None
        return claims if isinstance(claims, dict) else None


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT without checking it (what a test or a client may read)."""
    return dict(json.loads(b64url_decode(token.split(".")[1])))


# ------------------------------------------------------------------------------- HTTP


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    basic: tuple[str, str] | None  # client_secret_basic credentials

    def param(self, name: str) -> str | None:
        return self.form.get(name, self.query.get(name))


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0  # seconds to wait, then close without an answer

    @classmethod
    def json(cls, status: int, data: Any, **headers: str) -> Response:
        # json.dumps keeps the dict's order: the field order of the captures is part of the wire
        return cls(status, json.dumps(data).encode(), headers=dict(headers))

    @classmethod
    def html(cls, status: int, page: str) -> Response:
        return cls(status, page.encode(), "text/html; charset=utf-8")

    @classmethod
    def redirect(cls, location: str) -> Response:
        return cls(302, b"", "text/html", {"Location": location})


Handler = Callable[[Request], Response]


class HttpsServer:
    """A threaded HTTPS server on 127.0.0.1 (a free port) calling ``handler`` per request."""

    def __init__(self, handler: Handler, cert_file: str, key_file: str) -> None:
        self.handler = handler
        self.stopping = threading.Event()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "simulator"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                ctype = self.headers.get("Content-Type", "")
                form = {}
                if ctype.startswith("application/x-www-form-urlencoded"):
                    form = dict(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
                basic = None
                auth = self.headers.get("Authorization", "")
                if auth.lower().startswith("basic "):
                    try:
                        user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                        basic = (unquote(user), unquote(pw))
                    except ValueError:
                        basic = ("", "")
                request = Request(
                    self.command,
                    parts.path,
                    dict(parse_qsl(parts.query, keep_blank_values=True)),
                    form,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    basic,
                )
                try:
                    answer = outer.handler(request)
                except Exception as exc:  # a bug in a simulator: say so loudly
                    answer = Response(500, f"simulator error: {exc!r}".encode(), "text/plain")
                if answer.hang:
                    outer.stopping.wait(answer.hang)
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------- counting


@dataclass
class TokenRequest:
    at: float
    client_id: str
    account: str  # the user the grant is for ("" when unknown, the client for app-only)
    grant_type: str
    status: int
    error: str = ""


class RequestLog:
    """Every token request, so tests can assert how often the product asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[TokenRequest] = []

    def add(self, item: TokenRequest) -> None:
        with self.lock:
            self.items.append(item)

    def count(
        self,
        client_id: str | None = None,
        account: str | None = None,
        grant_type: str | None = None,
    ) -> int:
        with self.lock:
            return sum(
                1
                for r in self.items
                if (client_id is None or r.client_id == client_id)
                and (account is None or r.account.lower() == account.lower())
                and (grant_type is None or r.grant_type == grant_type)
            )

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


@dataclass
class _Fault:
    kind: str
    client_id: str | None
    remaining: int | None
    retry_after: int
    hang: float


class Faults:
    """Faults queued for the token endpoint: for one client or all, for N requests or until
    cleared."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[_Fault] = []

    def add(
        self,
        kind: str,
        client_id: str | None = None,
        times: int | None = None,
        retry_after: int = 60,
        hang: float = 20.0,
    ) -> None:
        assert kind in FAULTS, f"unknown fault {kind!r}; one of {FAULTS}"
        with self.lock:
            self.items.append(_Fault(kind, client_id, times, retry_after, hang))

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def take(self, client_id: str) -> _Fault | None:
        with self.lock:
            for fault in self.items:
                if fault.client_id in (None, client_id):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self.items.remove(fault)
                    return fault
        return None


def malformed(fault: _Fault, good: dict[str, Any]) -> Response | None:
    """The answer for the provider-neutral faults (``None`` for ``throttled``)."""
    if fault.kind == "hang":
        return Response(200, hang=fault.hang)
    if fault.kind == "html":
        page = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Service</body></html>"
        return Response.html(200, page)
    if fault.kind == "truncated":
        text = json.dumps(good).encode()
        return Response(200, text[: len(text) // 2])
    if fault.kind == "no_access_token":
        return Response.json(200, {k: v for k, v in good.items() if k != "access_token"})
    if fault.kind == "expires_in_text":
        return Response.json(200, {**good, "expires_in": "one hour"})
    if fault.kind == "unavailable":
        return Response(
            503,
            b"Service Unavailable",
            "text/plain",
            {"Retry-After": str(fault.retry_after)},
        )
    return None


def utc_text(at: float, fmt: str = "%Y-%m-%d %H:%M:%SZ") -> str:
    return datetime.fromtimestamp(at, UTC).strftime(fmt)


def page(title: str, body: str) -> str:
    """A small HTML page (sign-in, consent, error)."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<title>{title}</title></head><body><h1>{title}</h1>{body}</body></html>"
    )
