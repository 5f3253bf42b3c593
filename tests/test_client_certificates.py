"""Certificate credentials (private_key_jwt, RFC 7523) for custom clients.

Against the real OAuth server: a client registered there with the certificate's public key gets
tokens with assertions the app signs; after the certificate is replaced (and the provider still
holds the old one) it is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import sqlite3
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

import migrations
from mailboxes import linking
from models import Account, OAuthClient, User
from oauth import certificates as client_certificates
from oauth import clients as oauth_clients
from store.db import database, open_database, use_database
from tests.helpers.app import make_app
from tests.helpers.linking import REDIRECT, PeerInfo, mailbox, peer_client, token_requests
from tests.helpers.web import post_form


def public_jwk(client: OAuthClient) -> dict[str, Any]:
    key = client_certificates.loaded(client).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    numbers = key.public_numbers()

    def b64(n: int) -> str:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e), "use": "sig", "alg": "RS256"}


def register_with_key(peer: PeerInfo, client: OAuthClient, address: str) -> str:
    body = {
        "redirect_uris": [],
        "grant_types": ["client_credentials"],
        "response_types": [],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "RS256",
        "jwks": {"keys": [public_jwk(client)]},
        "mailbox": address,
    }
    answer = requests.post(
        peer.registration_url,
        json=body,
        headers={"Authorization": f"Bearer {peer.registration_token}"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    assert "client_secret" not in answer.json()
    return str(answer.json()["client_id"])


@pytest.mark.peers
def test_certificate_client_gets_tokens_and_a_replaced_one_is_refused(peer_app, peer):
    from people import users

    with peer_app.app_context():
        owner = users.create_user("owner@example.org", "owner-password-1", True)
        address = mailbox("cert")
        client = peer_client(owner, peer, {"client_id": "pending"}, grant="client_credentials")
        client_certificates.generate(client)
        client.client_id = register_with_key(peer, client, address)
        client.save()
        before = token_requests(peer, client.client_id)

        started = linking.start(owner, address, client, REDIRECT)

        assert started.done is not None and started.done.ok, started.done
        assert token_requests(peer, client.client_id) == before + 1
        assert Account.get(Account.address == address).status == "active"

        # A new certificate the provider does not know yet: refused, with the provider's reason.
        client_certificates.generate(OAuthClient.get_by_id(client.id))
        with pytest.raises(linking.AuthorizationProblem):
            linking.start(owner, mailbox("cert2"), OAuthClient.get_by_id(client.id), REDIRECT)


def test_key_is_encrypted_and_expiry_is_tracked(app, auth):
    auth.setup_admin()
    owner = auth.create_user("owner@example.org", can_custom_clients=True)
    with app.app_context(), database.connection_context():
        client = OAuthClient.create(
            owner=owner,
            name="Contoso",
            provider="microsoft365",
            token_url="https://login.microsoftonline.com/t/oauth2/v2.0/token",
            scope="https://outlook.office365.com/.default",
            client_id="cid",
            client_secret="old-secret",
        )
        certificate = client_certificates.generate(client, days=20)
        stored = OAuthClient.get_by_id(client.id)
        assert stored.client_secret is None and stored.credential == "certificate"
        assert "PRIVATE KEY" in stored.private_key
        raw = database.execute_sql(
            f"SELECT private_key, certificate FROM {OAuthClient._meta.table_name}"
        ).fetchone()
        assert b"PRIVATE KEY" not in bytes(raw[0])
        assert raw[1].startswith("-----BEGIN CERTIFICATE-----")
        assert stored.secret_expires_on == certificate.not_valid_after_utc.date()
        assert isinstance(x509.load_pem_x509_certificate(raw[1].encode()), x509.Certificate)
        warnings = oauth_clients.secret_expiry_warnings(User.get_by_id(owner.id))
        assert [w.level for w in warnings] == ["30"]
        assert warnings[0].message.startswith("The certificate of “Contoso” expires in")


def test_editor_creates_shows_and_serves_the_certificate(app, auth, client):
    auth.setup_admin()
    owner = auth.create_user("owner@example.org", can_custom_clients=True)
    with app.app_context(), database.connection_context():
        saved = OAuthClient.create(
            owner=owner,
            name="Contoso",
            provider="microsoft365",
            token_url="https://login.microsoftonline.com/t/oauth2/v2.0/token",
            scope="s",
            client_id="cid",
            client_secret="old-secret",
        )
    auth.logout()
    auth.login("owner@example.org", "user-password-1")
    edit = f"/settings/clients/{saved.id}/edit"
    assert "Use a certificate instead of the secret" in client.get(edit).get_data(as_text=True)
    done = post_form(client, f"/settings/clients/{saved.id}/certificate", {}, form_page=edit)
    assert done.status_code == 302
    page = client.get(edit).get_data(as_text=True)
    assert "PRIVATE KEY" not in page
    shown = re.search(r'id="certificate-sha1">([0-9A-F]{40})<', page)
    assert shown
    pem = client.get(f"/settings/clients/{saved.id}/certificate.pem")
    assert pem.status_code == 200 and b"PRIVATE" not in pem.data
    certificate = x509.load_pem_x509_certificate(pem.data)
    assert client_certificates.thumbprint(certificate).upper() == shown.group(1)
    # Someone else's client: 404, as everywhere.
    auth.logout()
    auth.login()
    assert client.get(f"/settings/clients/{saved.id}/certificate.pem").status_code == 404


def test_schema_of_the_previous_version_gains_the_certificate_columns(instance):
    instance.mkdir(parents=True)
    path = instance / "auth-email.db"
    use_database(open_database(f"sqlite:///{path}"))
    with database.connection_context():
        assert migrations.migrate(target=3) == [1, 2, 3]
    # Version 3's table had none of the new columns (nor the later delivery mode).
    connection = sqlite3.connect(path)
    for column in ("credential", "private_key", "certificate", "smtp_delivery"):
        connection.execute(f"ALTER TABLE o_auth_client DROP COLUMN {column}")
    connection.execute(
        "INSERT INTO user (email, password_hash, is_admin, is_enabled, can_custom_clients, "
        "session_version, created_at) VALUES ('old@example.org', 'h', 1, 1, 1, 1, '2026-01-01')"
    )
    connection.execute(
        "INSERT INTO o_auth_client (uid, owner_id, name, provider, grant, tenant, authorize_url, "
        "token_url, device_url, revocation_url, scope, client_id, shared, imap_host, "
        "imap_security, pop3_host, pop3_security, smtp_host, smtp_security, sasl_mechanism, "
        "created_at, updated_at) VALUES ('u1', 1, 'Old', 'google', 'authorization_code', '', "
        "'', 'https://t.example/token', '', '', 'mail', 'cid', 0, '', 'tls', '', 'tls', '', "
        "'starttls', 'XOAUTH2', '2026-01-01', '2026-01-01')"
    )
    connection.commit()
    connection.close()

    app = make_app(instance)
    with app.app_context(), database.connection_context():
        assert migrations.current_version() == migrations.LATEST
        old = OAuthClient.get(OAuthClient.name == "Old")
        assert (old.credential, old.certificate, old.private_key) == ("secret", "", None)
        assert not client_certificates.uses_certificate(old)
        assert old.secret_expires_on is None or isinstance(old.secret_expires_on, dt.date)
