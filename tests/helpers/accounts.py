"""OAuth clients and mailbox accounts made straight in the database (no peers), for page tests."""

from __future__ import annotations

from models import Account, OAuthClient, User
from oauth import tokens


def make_client(owner: User, **over: object) -> OAuthClient:
    values: dict[str, object] = {
        "owner": owner,
        "name": "Team app",
        "provider": "other",
        "grant": "authorization_code",
        "authorize_url": "https://login.example.com/authorize",
        "token_url": "https://login.example.com/token",
        "scope": "mail offline_access",
        "client_id": "cid",
        "client_secret": "client-secret-value",
        "imap_host": "imap.example.com",
        "imap_port": 993,
        **over,
    }
    return OAuthClient.create(**values)


def make_account(owner: User, address: str, client: OAuthClient, **over: object) -> Account:
    account = Account.create(
        owner=owner, address=address, provider=client.provider, client=client, **over
    )
    tokens.store_tokens(
        account, {"access_token": "access-secret", "refresh_token": "refresh-secret"}
    )
    return Account.get_by_id(account.id)


MAIL_PASSWORD = "mail-password-123"
