"""The proxy's own certificate: a generated self-signed pair when none is configured."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def ensure_self_signed(cert_path: str, key_path: str, hostnames: list[str]) -> None:
    """Write a self-signed certificate and its key (mode 0600) unless both already exist.

    ECDSA P-256: signing a handshake costs a fraction of RSA-2048's CPU. Pairs generated
    before (RSA) stay in use until removed."""
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return
    names = [h for h in dict.fromkeys(hostnames) if h] or ["localhost"]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def fingerprint_sha256(cert_path: str) -> str:
    """SHA-256 fingerprint of a PEM certificate as colon-separated upper-case hex."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def check_key_file(key_path: str, group_may_read: bool = False) -> None:
    """Refuse a listener key that other users can read: whoever reads it can impersonate the
    proxy to every mail client. ``group_may_read`` allows a key shared with one group (an ACME
    client's files made readable to the service's group).

    :raises PermissionError: with the command that fixes it.
    """
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & (0o007 if group_may_read else 0o077):
        fix = "chmod 640" if group_may_read else "chmod 600"
        raise PermissionError(
            f"the TLS key {key_path} is readable by other users (mode {mode:o}): "
            f"run `{fix} {key_path}` and start again"
        )


def server_context(cert_path: str, key_path: str, group_may_read: bool = False) -> ssl.SSLContext:
    """TLS context for the proxy's listeners (TLS 1.2+); see check_key_file."""
    check_key_file(key_path, group_may_read)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


class ResumingContext(ssl.SSLContext):
    """A client context that offers each server the TLS session of its last connection, so
    that the next handshake resumes it (no certificate chain sent and verified again).

    asyncio creates its TLS objects with ``wrap_bio`` and has no parameter for a session, so
    this context adds it. Sessions are kept per host name; the last one wins.
    """

    MAX_SERVERS = 1024
    #: Seconds a kept session serves before a newer one replaces it. Reading a connection's
    #: session costs ~0.5 ms of the event loop; a ticket serves many handshakes (servers keep
    #: their ticket keys for hours), so it is read at most this often per server.
    RENEW_AFTER = 30.0
    sessions: dict[str, ssl.SSLSession]

    def remember(self, host: str, sslobj: ssl.SSLObject) -> None:
        """Keep the session of a connection that finished its handshake (TLS 1.3: once the
        server's session ticket has been read), unless a recent one is kept already."""
        kept = self.__dict__.setdefault("kept_at", {})
        now = time.monotonic()
        if now - kept.get(host, -self.RENEW_AFTER) < self.RENEW_AFTER:
            return
        session = sslobj.session
        if session is None or not session.has_ticket and sslobj.version() == "TLSv1.3":
            return  # no ticket (yet): nothing to resume with
        sessions = self.__dict__.setdefault("sessions", {})
        if host not in sessions and len(sessions) >= self.MAX_SERVERS:
            old = next(iter(sessions))
            sessions.pop(old)
            kept.pop(old, None)
        sessions[host] = session
        kept[host] = now

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and server_hostname and not server_side:
            session = self.__dict__.get("sessions", {}).get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def upstream_context(ca_file: str | None) -> ssl.SSLContext:
    """Verifying client context: the system CAs plus the configured extra ones; it resumes
    the TLS session of the last connection to the same server (see ResumingContext)."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx
