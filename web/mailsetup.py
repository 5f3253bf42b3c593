"""Everything a mail client needs to find the proxy: the per-account setup page, Thunderbird
autoconfig, and Apple configuration profiles. None of it ever contains a password."""

from __future__ import annotations

import functools
import os
import plistlib
import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from flask import Blueprint, Flask, Response, abort, current_app, render_template, request
from flask_login import current_user, login_required

from config import mail_host
from mailboxes import listeners as mail_listeners
from mailboxes.listeners import tls_files
from mailproxy import fingerprint_sha256
from mailproxy.settings import parse_hostport
from models import Account

bp = Blueprint("mailsetup", __name__)


@dataclass(frozen=True)
class Server:
    protocol: str  # imap | pop3 | smtp
    host: str
    port: int
    security: str  # "SSL/TLS" | "STARTTLS"

    @property
    def socket_type(self) -> str:
        """Thunderbird's name for the security."""
        return "SSL" if self.security == "SSL/TLS" else "STARTTLS"


# listener -> (protocol, security) as mail clients name them; implicit TLS first, as they
# should prefer it
LABELS = {
    "imaps": ("imap", "SSL/TLS"),
    "imap": ("imap", "STARTTLS"),
    "pop3s": ("pop3", "SSL/TLS"),
    "pop3": ("pop3", "STARTTLS"),
    "smtps": ("smtp", "SSL/TLS"),
    "submission": ("smtp", "STARTTLS"),
}


def servers(app: Flask) -> list[Server]:
    """The proxy's enabled listeners as mail clients should see them."""
    host = mail_host(app.config)
    enabled = mail_listeners.addresses(app)
    return [
        Server(protocol, host, parse_hostport(enabled[name])[1], security)
        for name, (protocol, security) in LABELS.items()
        if name in enabled
    ]


def self_signed_fingerprint() -> str | None:
    cert, _, generated = tls_files(current_app._get_current_object())  # type: ignore[attr-defined]
    if not generated:
        return None
    found = os.stat(cert)
    return _fingerprint(cert, found.st_mtime_ns, found.st_size)


@functools.lru_cache(maxsize=8)
def _fingerprint(cert: str, mtime_ns: int, size: int) -> str:
    """Read and parsed once per version of the file (a regenerated one has another mtime)."""
    return fingerprint_sha256(cert)


def _own_account(account_id: int) -> Account:
    account = Account.owned_with_client(current_user, account_id)  # a query built once
    if account is None:
        abort(404)
    return account


@bp.get("/accounts/<int:account_id>/mail-client")
@login_required
def client_setup(account_id: int) -> str:
    account = _own_account(account_id)
    return render_template(
        "mailsetup/client.html",
        account=account,
        servers=servers(current_app),
        fingerprint=self_signed_fingerprint(),
    )


@bp.get("/accounts/<int:account_id>/auth-email.mobileconfig")
@login_required
def mobileconfig(account_id: int) -> Response:
    account = _own_account(account_id)
    body = apple_profile(account.address, servers(current_app), mail_host(current_app.config))
    filename = f"{account.address.replace('@', '_at_')}.mobileconfig"
    return Response(
        body,
        mimetype="application/x-apple-aspen-config",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def apple_profile(address: str, found: list[Server], host: str) -> bytes:
    """A com.apple.mail.managed profile; the device asks for the password on install."""
    imap = next((s for s in found if s.protocol == "imap"), None)
    smtp = next((s for s in found if s.protocol == "smtp"), None)
    if imap is None or smtp is None:
        abort(404)
    identifier = f"auth-email.{host}.{address}"
    payload = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier + ".mail",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, identifier + ".mail")).upper(),
        "PayloadDisplayName": f"Mail ({address})",
        "EmailAccountDescription": address,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": imap.host,
        "IncomingMailServerPortNumber": imap.port,
        "IncomingMailServerUseSSL": imap.security == "SSL/TLS",
        "IncomingMailServerUsername": address,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": smtp.host,
        "OutgoingMailServerPortNumber": smtp.port,
        "OutgoingMailServerUseSSL": smtp.security == "SSL/TLS",
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, identifier)).upper(),
        "PayloadDisplayName": f"Auth-Email: {address}",
        "PayloadDescription": "Mail settings for Auth-Email. You will be asked for the password.",
        "PayloadOrganization": host,
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile)


@bp.get("/.well-known/autoconfig/mail/config-v1.1.xml")
@bp.get("/mail/config-v1.1.xml")
def autoconfig() -> Response:
    """Thunderbird autoconfig. The same generic settings for every address: it reveals nothing
    about who has an account here."""
    address = request.args.get("emailaddress", "")
    domain = address.rpartition("@")[2] if "@" in address else mail_host(current_app.config)
    return Response(
        autoconfig_xml(domain, servers(current_app), mail_host(current_app.config)),
        mimetype="application/xml",
    )


def autoconfig_xml(domain: str, found: list[Server], host: str) -> str:
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f"  <emailProvider id={quoteattr(domain)}>",
        f"    <domain>{escape(domain)}</domain>",
        f"    <displayName>{escape(host)} (Auth-Email)</displayName>",
        f"    <displayShortName>{escape(host)}</displayShortName>",
    ]
    for server in found:
        tag = "outgoingServer" if server.protocol == "smtp" else "incomingServer"
        lines += [
            f'    <{tag} type="{server.protocol}">',
            f"      <hostname>{escape(server.host)}</hostname>",
            f"      <port>{server.port}</port>",
            f"      <socketType>{server.socket_type}</socketType>",
            "      <username>%EMAILADDRESS%</username>",
            "      <authentication>password-cleartext</authentication>",
            f"    </{tag}>",
        ]
    lines += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(lines)
