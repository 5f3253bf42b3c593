"""Shared mailboxes: SMTP logs in as the delegate who authorized (Exchange's rule), IMAP and
POP3 name the shared mailbox, and the delegate is known from the provider's tokens."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

from mailboxes.mailbackend import AppBackend
from models import Account, MailPassword, User
from oauth import authorize as oauth
from oauth import grants
from people.passwords import hash_password
from tests.helpers.app import stored_client


def jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_the_delegate_comes_from_the_id_token_or_the_access_tokens_upn() -> None:
    assert (
        grants.identity_from({"id_token": jwt({"email": "Ann@Contoso.com"})}) == "ann@contoso.com"
    )
    assert grants.identity_from({"access_token": jwt({"upn": "ann@contoso.com", "scp": "x"})}) == (
        "ann@contoso.com"
    )
    assert grants.identity_from({"access_token": "EwB-opaque"}) == ""
    assert grants.identity_from({"access_token": jwt({"roles": ["IMAP.AccessAsApp"]})}) == ""


def shared_account(app) -> Account:  # type: ignore[no-untyped-def]
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        client = stored_client(owner, "c", "client-secret-value")
        for proto, port in (("imap", 993), ("smtp", 587)):
            setattr(client, f"{proto}_host", "mail.example.test")
            setattr(client, f"{proto}_port", port)
        client.authorize_url = "https://login.example.test/authorize"
        client.save()
        account = Account.create(owner=owner, address="shared@example.test", provider="other",
                                 client=client, status="active",
                                 signed_in_as="ann@example.test")  # fmt: skip
        MailPassword.create(account=account, label="L", password_hash=hash_password("mail-pw-1"))
        return account


def test_smtp_logs_in_as_the_delegate_imap_as_the_shared_mailbox(app) -> None:  # type: ignore[no-untyped-def]
    account = shared_account(app)
    backend = AppBackend(app.config)
    with app.app_context():
        smtp = backend.authenticate("smtp", "shared@example.test", "mail-pw-1", "127.0.0.1")
        imap = backend.authenticate("imap", "shared@example.test", "mail-pw-1", "127.0.0.1")
    backend.close()

    assert smtp.account_id == imap.account_id == account.id
    assert smtp.address == "ann@example.test" and imap.address == "shared@example.test"


def test_the_sign_in_page_is_hinted_with_the_delegate_not_the_shared_mailbox(app) -> None:  # type: ignore[no-untyped-def]
    account = shared_account(app)
    with app.app_context():
        stored = Account.get_by_id(account.id)
        url = oauth.begin(stored.owner, stored, stored.client, "http://127.0.0.1:8080/authorize")
    assert parse_qs(urlsplit(url).query)["login_hint"] == ["ann@example.test"]
