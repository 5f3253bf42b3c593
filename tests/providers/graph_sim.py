"""Microsoft Graph simulator (a test double of graph.microsoft.com), for sending mail.

``POST /v1.0/users/{mailbox}/sendMail`` with a base64 MIME body (``Content-Type: text/plain``):
202 and the message delivered (To, Cc and Bcc through Postfix into Dovecot, Bcc header removed)
with a copy in the mailbox's Sent folder, or Graph's error bodies: 401 for a missing, expired or
wrong-audience token, 403 ``ErrorAccessDenied`` without ``Mail.Send`` or mailbox rights, 403
``ErrorSendAsDenied`` for a From the mailbox may not use, 400 for a body that is not base64 MIME,
413 above the 4 MB request limit, 429 with Retry-After when throttled (``graph_throttled``), and
``GET /v1.0/users/{mailbox}`` for a link check. Tokens come from the Entra simulator.
"""

from __future__ import annotations

import base64
import binascii
import threading
from email.parser import BytesParser
from email.policy import SMTP
from email.utils import getaddresses
from typing import Any

from tests.providers.common import Faults, HttpsServer, Request, Response, guid, utc_text
from tests.providers.entra_sim import GRAPH, EntraSim
from tests.providers.mailstore import DovecotStore

MAX_REQUEST = 4 * 1024 * 1024  # Graph's documented request size limit


class GraphSim:
    def __init__(self, entra: EntraSim, store: DovecotStore, cert_file: str, key_file: str) -> None:
        self.entra = entra
        self.store = store
        self.clock = entra.clock
        self.faults = Faults()  # "unavailable", "hang", "throttled" apply to sendMail
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, int]] = []  # (method, path, status)
        self.sent: list[tuple[str, str, list[str]]] = []  # (mailbox, From, recipients)
        self.http = HttpsServer(self.handle, cert_file, key_file)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()

    def error(self, status: int, code: str, message: str, **headers: str) -> Response:
        now = self.clock.now()
        body = {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": utc_text(now, "%Y-%m-%dT%H:%M:%S"),
                    "request-id": guid(),
                    "client-request-id": guid(),
                },
            }
        }
        return Response.json(status, body, **headers)

    def handle(self, req: Request) -> Response:
        answer = self._handle(req)
        with self.lock:
            self.calls.append((req.method, req.path, answer.status))
        return answer

    def _handle(self, req: Request) -> Response:
        parts = req.path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1.0", "users"]:
            return self.error(
                400, "BadRequest", f"Resource not found for the segment '{parts[-1]}'."
            )
        mailbox = parts[2]
        claims, refusal = self.authorize(req)
        if refusal:
            return refusal
        assert claims is not None
        target = self.entra.user(mailbox)
        if target is None:
            return self.error(
                404,
                "Request_ResourceNotFound",
                (
                    f"Resource '{mailbox}' does not exist or one of its queried "
                    f"reference-property objects are not present."
                ),
            )
        if len(parts) == 3 and req.method == "GET":
            return Response.json(
                200,
                {
                    "@odata.context": f"{GRAPH}/v1.0/$metadata#users/$entity",
                    "businessPhones": [],
                    "displayName": target.name,
                    "mail": target.email,
                    "userPrincipalName": target.email,
                    "id": target.oid,
                },
            )
        if len(parts) == 4 and parts[3] == "sendMail" and req.method == "POST":
            return self.send_mail(req, claims, mailbox)
        return self.error(400, "BadRequest", "Unsupported request.")

    def authorize(self, req: Request) -> tuple[dict[str, Any] | None, Response | None]:
        auth = req.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None, self.error(401, "InvalidAuthenticationToken", "Access token is empty.")
        claims = self.entra.validate(auth[7:].strip())
        if claims is None:
            return None, self.error(
                401,
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed, there are no dots (.).",
            )
        if str(claims.get("aud", "")).rstrip("/") not in (
            GRAPH,
            "00000003-0000-0000-c000-000000000000",
        ):
            return None, self.error(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            )
        if claims.get("exp", 0) <= self.clock.now():
            return None, self.error(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        return claims, None

    def send_mail(self, req: Request, claims: dict[str, Any], mailbox: str) -> Response:
        fault = self.faults.take(str(claims.get("appid", "")))
        target = self.entra.user(mailbox)
        assert target is not None
        if fault and fault.kind == "hang":
            return Response(200, hang=fault.hang)
        if fault and fault.kind == "unavailable":
            return self.error(
                503,
                "ServiceNotAvailable",
                "Service Unavailable",
                **{"Retry-After": str(fault.retry_after)},
            )
        if (fault and fault.kind == "throttled") or "graph_throttled" in target.situations:
            return self.error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                **{"Retry-After": str(fault.retry_after if fault else 30)},
            )
        app_only = claims.get("idtyp") == "app"
        rights = claims.get("roles", []) if app_only else str(claims.get("scp", "")).split()
        if "Mail.Send" not in rights:
            return self.error(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        principal = str(claims.get("appid" if app_only else "upn", "")).lower()
        if (
            not app_only
            and principal != mailbox.lower()
            and principal not in target.full_access | target.send_as
        ):
            return self.error(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        if len(req.body) > MAX_REQUEST:
            return self.error(
                413, "ErrorRequestEntityTooLarge", "The maximum request length supported is 4MB."
            )
        if not req.headers.get("content-type", "").startswith("text/plain"):
            return self.error(
                400,
                "RequestBodyRead",
                "Cannot convert the literal to the expected type 'Edm.String'.",
            )
        try:
            raw = base64.b64decode(b"".join(req.body.split()), validate=True)
            message = BytesParser(policy=SMTP).parsebytes(raw)
        except (binascii.Error, ValueError):
            raw, message = b"", None
        if not raw.strip() or message is None or not message.keys():
            return self.error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        recipients = [
            a
            for _, a in getaddresses(
                message.get_all("To", []) + message.get_all("Cc", []) + message.get_all("Bcc", [])
            )
            if a
        ]
        if not recipients:
            return self.error(
                400,
                "ErrorInvalidRecipients",
                (
                    "At least one recipient is not valid., A message can't be sent because it "
                    "contains no recipients."
                ),
            )
        sender = (getaddresses(message.get_all("From", [])) or [("", mailbox)])[0][1] or mailbox
        if sender.lower() != mailbox.lower():
            owner = self.entra.user(sender)
            if owner is None or principal not in owner.send_as:
                return self.error(
                    403,
                    "ErrorSendAsDenied",
                    (
                        "The user account which was used to submit this request does not have the "
                        "right to send mail on behalf of the specified sending account., Cannot "
                        "submit message."
                    ),
                )
        del message["Bcc"]
        if not message["From"]:
            message["From"] = mailbox
        body = message.as_bytes()
        self.store.deliver(mailbox, recipients, body)
        self.store.save_sent(mailbox, body)
        with self.lock:
            self.sent.append((mailbox, sender, recipients))
        return Response(202, b"", "text/plain")
