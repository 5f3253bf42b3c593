"""A webhook receiver that checks signatures, for the notification tests."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from models import (
    utcnow,
)


class Receiver:
    """A local HTTP server: a token endpoint and a webhook, each answering what the test says."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {
            "/hook": (200, {"ok": True}),
            "/token": (400, {"error": "invalid_grant", "error_description": "grant revoked"}),
        }
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status, answer = receiver.answers.get(self.path, (404, {}))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hooks(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/hook"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verified(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """The webhook's JSON after checking its signature the way a receiver would."""
    stamp = request["headers"]["X-Auth-Email-Timestamp"]
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + request["body"], hashlib.sha256)
    said = request["headers"]["X-Auth-Email-Signature"]
    assert hmac.compare_digest(said, "sha256=" + expected.hexdigest())
    assert abs(int(stamp) - int(utcnow().replace(tzinfo=dt.UTC).timestamp())) < 60
    return json.loads(request["body"])
