"""Public clients: no secret where the grant allows one, and the errors when the two sides
disagree (AADSTS700025, AADSTS7000218), in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailboxes import linking
from models import Account, OAuthClient, User
from oauth import errors as oauth_errors
from oauth import tokens
from tests.helpers.app import make_app
from tests.helpers.clients import MICROSOFT_FORM, add, field_help, one_client
from tests.helpers.linking import (
    PUBLIC,
    REDIRECT,
    PeerInfo,
    mailbox,
    op_sign_in,
    peer_client,
    query_of,
    register,
    token_requests,
)
from tests.helpers.tokens import expire
from tests.helpers.web import post_form


@pytest.mark.parametrize("grant", ["authorization_code", "device_code"])
def test_a_public_client_is_saved_without_a_secret(app, admin_client, grant: str) -> None:
    response = add(admin_client, grant=grant, client_secret="")

    assert response.status_code == 302, response.get_data(as_text=True)
    saved = one_client(app, name="Contoso Entra")
    assert saved.grant == grant and saved.client_secret is None


def test_client_credentials_still_needs_its_secret(app, admin_client) -> None:
    response = add(admin_client, grant="client_credentials", client_secret="")

    assert response.status_code == 400
    assert "with Client Credentials the app signs in as itself" in field_help(
        response.get_data(as_text=True), "client_secret"
    )


def test_a_stored_secret_can_be_removed_to_make_the_client_public(app, admin_client) -> None:
    add(admin_client)
    client = one_client(app, name="Contoso Entra")
    assert client.client_secret
    edit = f"/settings/clients/{client.id}/edit"
    page = admin_client.get(edit).get_data(as_text=True)
    assert 'name="clear_secret"' in page

    response = post_form(admin_client, edit, {**MICROSOFT_FORM, "client_secret": "",
                                              "clear_secret": "y"})  # fmt: skip

    assert response.status_code == 302, response.get_data(as_text=True)
    cleared = one_client(app, name="Contoso Entra")
    assert cleared.client_secret is None and cleared.secret_set_at is None


@pytest.mark.parametrize(
    ("description", "words"),
    [
        (
            "AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' "
            "should be presented.",
            "Clear the client secret",
        ),
        (
            "AADSTS7000218: The request body must contain the following parameter: "
            "'client_assertion' or 'client_secret'.",
            "Allow public client flows",
        ),
    ],
)
def test_a_secret_where_none_belongs_and_the_reverse_say_what_to_change(
    description: str, words: str
) -> None:
    said = oauth_errors.explain("invalid_client", description)
    assert words in said.fix and said.code.startswith("AADSTS")


@pytest.mark.peers
def test_a_public_client_links_and_renews_without_a_secret(
    instance: Path,
    peer: PeerInfo,
) -> None:
    from people import users

    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        users.create_admin("admin@example.org", "admin-password-1")
        owner: User = users.create_user("owner@example.org", "owner-password-1", True)
    reg = register(peer, token_endpoint_auth_method="none")
    client = peer_client(owner, peer, reg, client_secret=None)
    address = mailbox("public")
    started = linking.start(owner, address, client, REDIRECT)
    account, result = linking.complete_callback(
        owner, query_of(op_sign_in(peer, started.url, address)), REDIRECT
    )
    assert result.ok, result.message
    expire(Account.get_by_id(account.id))
    before = token_requests(peer, reg["client_id"])

    assert tokens.get_access_token(account.id) != account.access_token

    assert token_requests(peer, reg["client_id"]) == before + 1
    assert OAuthClient.get_by_id(client.id).client_secret is None


@pytest.mark.peers
def test_a_public_client_links_by_device_code_without_a_secret(
    instance: Path,
    peer: PeerInfo,
) -> None:
    from people import users

    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        users.create_admin("admin@example.org", "admin-password-1")
        owner: User = users.create_user("owner@example.org", "owner-password-1", True)
    reg = register(peer, token_endpoint_auth_method="none")
    client = peer_client(owner, peer, reg, grant="device_code", client_secret=None)
    address = mailbox("pubdev")

    started = linking.start(owner, address, client, REDIRECT)
    assert started.pending is not None
    peer.approve_device(started.pending.user_code, address)
    result = linking.poll_device(owner, started.account, started.pending.state)

    assert result is not None and result.ok, result
    assert Account.get(Account.address == address).status == "active"
