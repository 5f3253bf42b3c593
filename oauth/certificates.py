"""Certificate credentials for custom clients: ``private_key_jwt`` (RFC 7523) instead of a secret.

The app generates the key pair; the private key lives only in the vault (encrypted like every
secret) and the self-signed certificate is what the user uploads to the app registration (Entra:
*Certificates & secrets → Certificates*). Token requests then carry a client assertion, a JWT
signed with the key whose header names the certificate by its thumbprints (``x5t``, as Entra
requires, and ``x5t#S256``). The certificate's last day is tracked like a secret's expiry.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from models import OAuthClient, utcnow
from store.db import database

CERTIFICATE = "certificate"
SECRET = "secret"
DEFAULT_DAYS = 730  # Entra accepts longer, but two years keeps the key's life bounded
KEY_BITS = 3072


def generate(client: OAuthClient, days: int = DEFAULT_DAYS) -> x509.Certificate:
    """A new key pair and certificate for ``client``, which then signs with it (the secret goes).

    The previous certificate stops working at once: upload the new one before relying on it.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Auth-Email {client.name}"[:64])])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    client.private_key = pem.decode()
    client.certificate = certificate.public_bytes(serialization.Encoding.PEM).decode()
    client.credential = CERTIFICATE
    client.client_secret = None
    client.secret_set_at = utcnow()
    client.secret_expires_on = certificate.not_valid_after_utc.date()
    client.updated_at = utcnow()
    with database.atomic():
        client.save()
    return certificate


def uses_certificate(client: OAuthClient) -> bool:
    return client.credential == CERTIFICATE and bool(client.certificate)


def loaded(client: OAuthClient) -> x509.Certificate:
    return x509.load_pem_x509_certificate(client.certificate.encode())


def thumbprint(certificate: x509.Certificate, algorithm: str = "sha1") -> str:
    """Hex thumbprint of the DER certificate (Entra lists the SHA-1 one)."""
    return hashlib.new(algorithm, certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def summary(client: OAuthClient) -> dict[str, str] | None:
    """What the editor shows of the certificate: never the key."""
    if not client.certificate:
        return None
    certificate = loaded(client)
    return {
        "sha1": thumbprint(certificate).upper(),
        "sha256": thumbprint(certificate, "sha256").upper(),
        "not_after": certificate.not_valid_after_utc.date().isoformat(),
        "in_use": "yes" if uses_certificate(client) else "no",
        "pem": client.certificate,
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion_auth(client: OAuthClient) -> PrivateKeyJWT:
    """Authlib's ``private_key_jwt`` method for this client, its audience the token endpoint."""
    der = loaded(client).public_bytes(serialization.Encoding.DER)
    headers = {
        "x5t": _b64url(hashlib.sha1(der).digest()),  # noqa: S324 - the header Entra defines
        "x5t#S256": _b64url(hashlib.sha256(der).digest()),
    }
    return PrivateKeyJWT(client.token_url, headers=headers, alg="RS256")
