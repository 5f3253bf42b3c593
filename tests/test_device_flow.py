"""The Device Code flow's endings other than success: the user declines, the code expires (at
our end and at the provider's), and the provider asks us to slow down (real OAuth server)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from mailboxes import linking
from models import Account, AuditEvent, OAuthClient, PendingAuthorization, User, utcnow
from oauth.errors import AuthorizationProblem
from people import users
from tests.helpers.linking import REDIRECT, PeerInfo, mailbox, peer_client, register, token_requests
from tests.helpers.tokens import FlakyTokenEndpoint

pytestmark = pytest.mark.peers


@pytest.fixture
def user(peer_app: Flask) -> User:
    return users.create_user("device-owner@example.org", "device-owner-pw-1", True)


def start_device(user: User, peer: PeerInfo, **meta: Any) -> tuple[Account, Any, dict]:
    reg = register(peer, **meta)
    client = peer_client(user, peer, reg, grant="device_code")
    started = linking.start(user, mailbox("dev"), client, REDIRECT, ip="192.0.2.7")
    assert started.pending is not None
    return started.account, started.pending, reg


def poll(user: User, account: Account, pending: Any) -> Any:
    return linking.poll_device(user, account, pending.state, ip="192.0.2.7")


def test_an_expired_device_code_is_refused_without_asking_the_provider(
    user: User,
    peer: PeerInfo,
) -> None:
    account, pending, reg = start_device(user, peer)
    assert poll(user, account, pending) is None  # waiting for the user
    PendingAuthorization.update(expires_at=utcnow() - dt.timedelta(seconds=1)).where(
        PendingAuthorization.id == pending.id
    ).execute()
    before = token_requests(peer, reg["client_id"])

    with pytest.raises(AuthorizationProblem) as refused:
        poll(user, account, pending)

    assert refused.value.explanation.code == "expired"
    assert token_requests(peer, reg["client_id"]) == before


def test_a_declined_device_authorization_says_so_and_links_nothing(
    user: User,
    peer: PeerInfo,
) -> None:
    account, pending, reg = start_device(user, peer)
    started = AuditEvent.get(AuditEvent.action == "account.authorize_started")
    assert (started.actor_email, started.target, started.ip) == (
        user.email,
        account.address,
        "192.0.2.7",
    )
    peer.deny_device(pending.user_code)

    with pytest.raises(AuthorizationProblem) as refused:
        poll(user, account, pending)

    assert refused.value.explanation.title == "The authorization was declined"
    assert Account.get_or_none(Account.id == account.id) is None  # the placeholder is gone
    assert PendingAuthorization.get_or_none(PendingAuthorization.id == pending.id) is None
    with pytest.raises(AuthorizationProblem):  # and the code is spent
        poll(user, account, pending)


def test_a_device_code_expired_at_the_provider_is_explained(
    user: User,
    peer: PeerInfo,
) -> None:
    """Our clock says there is time left, the provider's code has expired (``expired_token``)."""
    account, pending, reg = start_device(user, peer, device_code_ttl=1)
    PendingAuthorization.update(expires_at=utcnow() + dt.timedelta(minutes=10)).where(
        PendingAuthorization.id == pending.id
    ).execute()
    time.sleep(2.5)  # the provider's code lives 1 s; nothing to poll for meanwhile

    with pytest.raises(AuthorizationProblem) as refused:
        poll(user, account, pending)

    assert refused.value.explanation.title == "The code expired"
    assert token_requests(peer, reg["client_id"]) >= 1
    assert Account.get_or_none(Account.id == account.id) is None


@pytest.fixture
def slow_down() -> Iterator[FlakyTokenEndpoint]:
    server = FlakyTokenEndpoint(
        status=400, body={"error": "slow_down", "error_description": "polling too fast"}
    )
    yield server
    server.close()


def test_slow_down_keeps_the_flow_waiting_and_it_completes_later(
    user: User,
    peer: PeerInfo,
    slow_down: FlakyTokenEndpoint,
) -> None:
    """The test OAuth server never says ``slow_down``; a local endpoint says it for the first
    poll, then the real token endpoint answers the next one."""
    account, pending, reg = start_device(user, peer)
    real_token_url = pending.client.token_url
    OAuthClient.update(token_url=slow_down.url).where(OAuthClient.id == pending.client.id).execute()
    peer.approve_device(pending.user_code, account.address)

    assert poll(user, account, pending) is None  # not an error: poll again later

    assert slow_down.hits == 1
    assert PendingAuthorization.get_by_id(pending.id).consumed_at is None
    assert Account.get_by_id(account.id).status == "pending"
    OAuthClient.update(token_url=real_token_url).where(
        OAuthClient.id == pending.client.id
    ).execute()
    done = poll(user, account, PendingAuthorization.get_by_id(pending.id))
    assert done is not None and done.ok, done
    assert Account.get_by_id(account.id).status == "active"
    assert token_requests(peer, reg["client_id"]) == 1  # the one poll that reached it
