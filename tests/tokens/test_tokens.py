"""The token lifecycle against the real OAuth server (counted at the server), and its failures."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.integrations.base_client.errors import OAuthError
from flask import Flask

from mailboxes import linking, upkeep, verification
from models import Account, User, utcnow
from oauth import authorize, certificates, grants, tokens
from oauth import errors as oauth_errors
from tests.helpers.app import make_app
from tests.helpers.linking import (
    PUBLIC,
    REDIRECT,
    PeerInfo,
    mailbox,
    peer_client,
    register,
    revoke_at_op,
    token_requests,
)
from tests.helpers.tokens import (
    FlakyTokenEndpoint,
    broken_account,
    caller_thread,
    expire,
    hold_after_its_read,
    link,
)


@pytest.mark.peers
def test_cached_token_is_used_without_a_request(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    before = token_requests(peer, reg["client_id"])

    assert tokens.get_access_token(account.id) == account.access_token
    assert tokens.get_access_token(account.id) == account.access_token
    assert token_requests(peer, reg["client_id"]) == before


@pytest.mark.peers
def test_refresh_rotates_and_stores_the_new_refresh_token(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    old_refresh, old_access = account.refresh_token, account.access_token
    expire(account)

    fresh = tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert fresh != old_access and fresh == stored.access_token
    assert stored.refresh_token and stored.refresh_token != old_refresh
    assert stored.token_expires_at > utcnow() + dt.timedelta(minutes=5)
    assert stored.status == "active" and stored.last_error == ""
    old = requests.post(
        peer.token_url,
        data={"grant_type": "refresh_token", "refresh_token": old_refresh},
        auth=(reg["client_id"], reg["client_secret"]),
        timeout=10,
    )
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"


@pytest.mark.peers
def test_invalid_grant_needs_reauthorization_and_keeps_tokens(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    revoke_at_op(peer, email=account.address)

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id, force_refresh=True)

    stored = Account.get_by_id(account.id)
    assert stored.status == "needs_reauth"
    assert "invalid_grant" in stored.status_detail and "invalid_grant" in raised.value.message
    assert stored.refresh_token == account.refresh_token
    assert stored.access_token == account.access_token
    before = token_requests(peer, reg["client_id"])
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id)
    assert token_requests(peer, reg["client_id"]) == before  # no pointless retries


@pytest.mark.peers
def test_twenty_concurrent_callers_cause_one_token_request(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    expire(account)
    before = token_requests(peer, reg["client_id"])
    barrier = threading.Barrier(20)
    results: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            results.append(tokens.get_access_token(account.id))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors, errors
    assert len(results) == 20 and len(set(results)) == 1
    assert results[0] == Account.get_by_id(account.id).access_token != account.access_token
    assert token_requests(peer, reg["client_id"]) == before + 1


@pytest.mark.peers
def test_force_refresh_gets_a_new_token(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    before = token_requests(peer, reg["client_id"])

    fresh = tokens.get_access_token(account.id, force_refresh=True)

    assert fresh != account.access_token
    assert token_requests(peer, reg["client_id"]) == before + 1


@pytest.mark.peers
def test_client_credentials_renewal_requests_a_new_token(owner: User, peer: PeerInfo) -> None:
    address = mailbox("ccr")
    reg = register(peer, mailbox=address, access_token_ttl=3600)
    client = peer_client(owner, peer, reg, grant="client_credentials", scope="mail")
    started = linking.start(owner, address, client, REDIRECT)
    assert started.done is not None and started.done.ok, started.done
    account = Account.get(Account.address == address)
    expire(account)
    before = token_requests(peer, reg["client_id"])

    fresh = tokens.get_access_token(account.id)

    assert fresh != account.access_token
    assert token_requests(peer, reg["client_id"]) == before + 1
    assert verification.verify(Account.get_by_id(account.id)).ok


@pytest.mark.peers
def test_upkeep_refreshes_only_idle_accounts(owner: User, peer: PeerInfo) -> None:
    account, reg = link(owner, peer)
    assert upkeep.refresh_idle_accounts() == 0

    later = utcnow() + dt.timedelta(days=upkeep.IDLE_DAYS + 1)
    assert upkeep.refresh_idle_accounts(now=later) == 1

    stored = Account.get_by_id(account.id)
    assert stored.refresh_token != account.refresh_token
    assert stored.last_refresh_at > account.last_refresh_at


# ---------------------------------------------------------------------------------- failures


@pytest.fixture
def timeout_app(instance: Path) -> Flask:
    """For the timeout test only: a short timeout, against an endpoint far slower still."""
    return make_app(instance, TOKEN_HTTP_TIMEOUT=1, TOKEN_BACKOFF=0.01, TOKEN_ATTEMPTS=2)


@pytest.fixture
def endpoint_slow() -> Iterator[FlakyTokenEndpoint]:
    server = FlakyTokenEndpoint(delay=8.0)
    yield server
    server.close()


def test_5xx_is_not_asked_again_at_once_and_keeps_the_account_active(
    fast_app: Flask, endpoint_503: FlakyTokenEndpoint
) -> None:
    account = broken_account(fast_app, endpoint_503.url)

    with pytest.raises(oauth_errors.TokenUnavailable, match="503"):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert endpoint_503.hits == 1  # the back-off decides when to ask again
    assert stored.refresh_failures == 1 and stored.next_refresh_at > utcnow()
    assert stored.status == "active" and "503" in stored.last_error
    assert stored.refresh_token == "r1" and stored.refresh_claimed_until is None
    assert "secret" not in stored.last_error and "r1" not in stored.last_error


def test_an_endpoint_that_drops_every_connection_is_tried_the_configured_times_then_waits(
    fast_app: Flask, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that got no answer at all is the one failure asked again soon: three tries
    (``TOKEN_ATTEMPTS``) with a doubling pause between them, then the back-off like any other
    failure."""
    listener = socket.create_server(("127.0.0.1", 0))
    request.addfinalizer(listener.close)
    accepted: list[int] = []

    def drop_each() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop_each, daemon=True).start()
    port = listener.getsockname()[1]
    account = broken_account(fast_app, f"http://127.0.0.1:{port}/token")
    pauses: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread() is threading.main_thread():
            pauses.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(tokens.time, "sleep", sleep)

    with pytest.raises(oauth_errors.TokenUnavailable, match="unreachable"):
        tokens.get_access_token(account.id)
    assert len(accepted) == 3
    assert pauses == [0.01, 0.02]  # TOKEN_BACKOFF, doubled
    with pytest.raises(oauth_errors.TokenUnavailable, match="Next try in"):
        tokens.get_access_token(account.id)

    assert len(accepted) == 3
    stored = Account.get_by_id(account.id)
    assert stored.refresh_failures == 1 and stored.status == "active"


def test_timeout_keeps_the_account_active(
    timeout_app: Flask, endpoint_slow: FlakyTokenEndpoint
) -> None:
    account = broken_account(timeout_app, endpoint_slow.url)

    with pytest.raises(oauth_errors.TokenUnavailable, match="in time"):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and "in time" in stored.last_error


def test_waiters_do_not_pile_on_after_a_failed_refresh(
    fast_app: Flask, endpoint_503: FlakyTokenEndpoint
) -> None:
    account = broken_account(fast_app, endpoint_503.url)
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            tokens.get_access_token(account.id)
        except oauth_errors.TokenUnavailable as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(failures) == 8
    assert endpoint_503.hits == 1  # one refresh, not eight


def test_a_stale_claim_is_taken_over(fast_app: Flask, endpoint_503: FlakyTokenEndpoint) -> None:
    """A process that died while refreshing does not block the account for good."""
    account = broken_account(fast_app, endpoint_503.url)
    Account.update(refresh_claimed_until=utcnow() - dt.timedelta(seconds=1)).where(
        Account.id == account.id
    ).execute()

    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)
    assert endpoint_503.hits == 1


class _Clock:
    """A clock for ``tokens`` alone: ``sleep`` moves it on at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_caller_waiting_on_a_claim_held_too_long_gives_up_in_words(
    fast_app: Flask, endpoint_503: FlakyTokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another caller's claim that does not end: the wait lasts the claim's length and 5 s
    more, looking again every ``poll``, then fails without a request of its own."""
    account = broken_account(fast_app, endpoint_503.url)
    Account.update(refresh_claimed_until=utcnow() + dt.timedelta(hours=1)).where(
        Account.id == account.id
    ).execute()
    clock = _Clock()
    monkeypatch.setattr(tokens, "time", clock)
    start = clock.now

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == "Another refresh of this mailbox's token is taking too long."
    waited = clock.now - start
    longest = grants.settings().claim_seconds + 5
    assert longest < waited <= longest + grants.settings().poll + 1e-6
    assert endpoint_503.hits == 0


@pytest.fixture
def endpoint() -> Iterator[Callable[..., FlakyTokenEndpoint]]:
    """Start local token endpoints with ``FlakyTokenEndpoint``'s arguments; closed afterwards."""
    started: list[FlakyTokenEndpoint] = []

    def start(**kwargs: Any) -> FlakyTokenEndpoint:
        started.append(FlakyTokenEndpoint(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.mark.parametrize(
    "error", ["invalid_grant", "interaction_required", "consent_required", "login_required"]
)
def test_a_refused_grant_needs_reauthorization_and_keeps_tokens(
    fast_app: Flask, endpoint: Callable[..., FlakyTokenEndpoint], error: str
) -> None:
    server = endpoint(status=400, body={"error": error, "error_description": "grant is gone"})
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.NeedsReauthorization, match=error):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert server.hits == 1  # not retried
    assert stored.status == "needs_reauth" and error in stored.status_detail
    assert stored.refresh_token == "r1" and stored.access_token == "a1"


@pytest.mark.parametrize(
    ("error", "description", "words"),
    [
        (
            "invalid_client",
            "AADSTS7000222: The provided client secret keys for app 'x' are expired.",
            "The client secret has expired",
        ),
        (
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
            "request is the client secret value, not the client secret ID.",
            "The client secret is wrong",
        ),
        ("invalid_client", "Client authentication failed", "(invalid_client)"),
        ("unauthorized_client", "", "(unauthorized_client)"),
        ("invalid_scope", "unknown scope", "(invalid_scope)"),
        ("unsupported_grant_type", "", "(unsupported_grant_type)"),
    ],
)
def test_a_refused_client_keeps_the_account_active_and_says_what_to_fix(
    fast_app: Flask,
    endpoint: Callable[..., FlakyTokenEndpoint],
    error: str,
    description: str,
    words: str,
) -> None:
    server = endpoint(status=400, body={"error": error, "error_description": description})
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.ClientRefused) as raised:
        tokens.get_access_token(account.id)

    assert isinstance(raised.value, oauth_errors.TokenUnavailable)  # the proxy answers "try later"
    stored = Account.get_by_id(account.id)
    assert server.hits == 1  # retrying (or re-authorizing) cannot help
    assert stored.status == "active" and stored.status_detail == ""
    assert stored.refresh_token == "r1" and stored.refresh_claimed_until is None
    for said in (stored.last_error, raised.value.message):
        assert words in said and "Account settings" in said and '"flaky"' in said
    assert "r1" not in stored.last_error


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, None),
        (429, {"error": "slow_down"}),
        (503, {"error": "temporarily_unavailable"}),
        (400, {"error": "temporarily_unavailable", "error_description": "busy"}),
        (400, {"error": "server_error"}),
        (400, {"error": "slow_down"}),
    ],
)
def test_temporary_errors_wait_for_the_back_off_and_keep_the_account_active(
    fast_app: Flask,
    endpoint: Callable[..., FlakyTokenEndpoint],
    status: int,
    body: dict[str, Any] | None,
) -> None:
    server = endpoint(status=status, body=body)
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)

    assert not isinstance(raised.value, oauth_errors.ClientRefused)
    stored = Account.get_by_id(account.id)
    assert server.hits == 1  # not at once: the back-off decides
    assert stored.status == "active" and stored.last_error
    assert (str(status) if status != 400 else body and body["error"]) in stored.last_error
    assert stored.refresh_token == "r1" and stored.refresh_claimed_until is None


def _take_over(expires_in: int) -> Callable[[], None]:
    """Another caller that took over our lapsed claim and stored its own tokens."""

    def run() -> None:
        with tokens.connected():
            account = Account.get(Account.address == "flaky@example.test")
            tokens.store_tokens(
                account,
                {"access_token": "theirs", "refresh_token": "r2", "expires_in": expires_in},
            )

    return run


MINE = {"access_token": "mine", "refresh_token": "r3", "token_type": "Bearer", "expires_in": 3600}


def test_a_lapsed_claim_returns_the_token_the_other_caller_stored(
    fast_app: Flask, endpoint: Callable[..., FlakyTokenEndpoint]
) -> None:
    server = endpoint(status=200, body=MINE, on_request=_take_over(3600))
    account = broken_account(fast_app, server.url)

    assert tokens.get_access_token(account.id) == "theirs"

    stored = Account.get_by_id(account.id)
    assert server.hits == 1  # the spent refresh token is not sent again
    assert stored.refresh_token == "r2" and stored.access_token == "theirs"


def test_a_lapsed_claims_rotated_refresh_token_does_not_replace_the_one_stored_by_the_taker(
    fast_app: Flask, endpoint: Callable[..., FlakyTokenEndpoint]
) -> None:
    """An answer with only a rotated refresh token is kept under our claim only: once another
    caller took over and stored its tokens, theirs win."""
    rotated_only = {"refresh_token": "r3", "token_type": "Bearer"}
    server = endpoint(status=200, body=rotated_only, on_request=_take_over(3600))
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert (stored.refresh_token, stored.access_token) == ("r2", "theirs")
    assert server.hits == 1


def test_a_caller_that_read_the_row_before_a_new_authorization_does_not_renew_it(
    fast_app: Flask, endpoint: Callable[..., FlakyTokenEndpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New tokens stored while a renewal is in flight move the version past every version
    seen before, so a caller still holding the expired row cannot claim it again."""
    server = endpoint(status=200, body=MINE, on_request=_take_over(3600))
    account = broken_account(fast_app, server.url)
    renewed = threading.Event()
    results: list[str] = []

    def late() -> None:
        results.append(tokens.get_access_token(account.id))

    late_caller = threading.Thread(target=late)
    read = hold_after_its_read(monkeypatch, late_caller, renewed)
    late_caller.start()
    assert read.wait(60)
    assert tokens.get_access_token(account.id) == "theirs"
    renewed.set()
    late_caller.join(60)

    assert results == ["theirs"]
    assert server.hits == 1


@pytest.mark.parametrize(
    ("status", "body", "late_gets"),
    [
        (400, {"error": "invalid_grant", "error_description": "gone"}, "refused"),
        (503, None, "failed"),
    ],
    ids=["refused", "failed"],
)
def test_a_caller_that_takes_over_a_lapsed_claim_does_not_renew_after_a_failure_meanwhile(
    fast_app: Flask,
    endpoint: Callable[..., FlakyTokenEndpoint],
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: dict[str, str] | None,
    late_gets: str,
) -> None:
    """Our claim lapses while the provider answers, and a late caller reads the row then (a
    lapsed claim is its to take). A refusal or a failure moves the version on all the same, so
    the late caller's claim fails and it gets what was recorded, without asking again."""
    refused = threading.Event()

    def lapse_and_let_a_late_caller_read() -> None:
        if read.is_set():
            return
        with tokens.connected():
            Account.update(refresh_claimed_until=utcnow() - dt.timedelta(seconds=1)).where(
                Account.id == account.id
            ).execute()
        late_caller.start()
        read.wait(60)

    server = endpoint(status=status, body=body, on_request=lapse_and_let_a_late_caller_read)
    account = broken_account(fast_app, server.url)
    late_caller, results = caller_thread(account.id)
    read = hold_after_its_read(monkeypatch, late_caller, refused)

    with pytest.raises(oauth_errors.TokenError):
        tokens.get_access_token(account.id)
    refused.set()
    late_caller.join(60)

    assert results == [late_gets]
    assert server.hits == 1


def test_a_lapsed_claim_without_a_fresh_token_fails_without_retrying(
    fast_app: Flask, endpoint: Callable[..., FlakyTokenEndpoint]
) -> None:
    server = endpoint(status=200, body=MINE, on_request=_take_over(0))
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable, match="took over"):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert server.hits == 1
    assert stored.refresh_token == "r2" and stored.status == "active"


def test_plain_http_token_endpoint_is_refused_off_loopback() -> None:
    with pytest.raises(oauth_errors.GrantError, match="https"):
        grants.check_endpoint("http://login.example.com/token")
    grants.check_endpoint("http://127.0.0.1:9/token")
    grants.check_endpoint("https://login.example.com/token")


@pytest.mark.parametrize("access", [None, "", 5])
def test_an_authorization_answer_without_an_access_token_is_refused_and_stores_nothing(
    fast_app: Flask, access: Any
) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    answer = {"refresh_token": "r9", "expires_in": 3600}
    if access is not None:
        answer["access_token"] = access

    with pytest.raises(oauth_errors.GrantError) as refused:
        tokens.store_tokens(account, answer)

    assert (refused.value.error, refused.value.description) == (
        "invalid_response",
        "the token response holds no access token",
    )
    stored = Account.get_by_id(account.id)
    assert (stored.access_token, stored.refresh_token) == ("a1", "r1")
    assert stored.token_version == account.token_version


@pytest.mark.parametrize("refresh", [None, "", 5])
def test_an_authorization_answer_without_a_usable_refresh_token_keeps_the_stored_one(
    fast_app: Flask, refresh: Any
) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")

    tokens.store_tokens(account, {"access_token": "a2", "refresh_token": refresh})

    stored = Account.get_by_id(account.id)
    assert (stored.access_token, stored.refresh_token) == ("a2", "r1")


def test_tokens_stored_for_one_account_leave_the_others_alone(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    other = Account.create(
        owner=account.owner, address="other@example.test", provider="other",
        client=account.client, status="active",
    )  # fmt: skip
    tokens.store_tokens(other, {"access_token": "o1", "refresh_token": "or1", "expires_in": 60})
    version = Account.get_by_id(other.id).token_version

    tokens.store_tokens(account, {"access_token": "a2", "refresh_token": "r2", "scope": "mail"})

    untouched = Account.get_by_id(other.id)
    assert (untouched.access_token, untouched.refresh_token) == ("o1", "or1")
    assert untouched.token_version == version and untouched.granted_scope == ""


def test_a_short_token_from_an_authorization_is_handed_out_as_it_is(fast_app: Flask) -> None:
    """Its life counts from when it was stored: a 60-second token is renewed in its last 30 s,
    not at once (the margin setting alone, 60 s, would cover all of it)."""
    account = broken_account(fast_app, "http://127.0.0.1:9/token")

    tokens.store_tokens(account, {"access_token": "short", "expires_in": 60})

    stored = Account.get_by_id(account.id)
    assert stored.last_refresh_at is not None
    assert tokens.ready_token(stored) == "short"


def test_disabled_and_pending_accounts_get_no_token(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    for status, words in (
        ("disabled", "This mailbox is disabled."),
        ("pending", "This mailbox is not authorized yet."),
    ):
        tokens.set_status(account.id, status)
        with pytest.raises(oauth_errors.AccountUnusable) as refused:
            tokens.get_access_token(account.id)
        assert refused.value.message == words


def test_a_token_counts_as_valid_while_more_than_5_seconds_are_left(fast_app: Flask) -> None:
    """During a back-off a token that has not run out still serves; "run out" has 5 s of slack
    for the time the mail server takes to see it."""
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    now = utcnow()
    account.token_expires_at = now + dt.timedelta(seconds=5.5)
    assert tokens._valid(account, now)
    account.token_expires_at = now + dt.timedelta(seconds=4.5)
    assert not tokens._valid(account, now)


_HERD_WORKER = """
import hashlib, sys, threading, time
sys.path.insert(0, {root!r})
from app import create_app
from oauth import tokens
create_app({config!r})
start_at, account_id = float(sys.argv[1]), int(sys.argv[2])
results, errors = [], []
def call():
    time.sleep(max(0.0, start_at - time.time()))
    try:
        results.append(tokens.get_access_token(account_id))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=call) for _ in range(5)]
[t.start() for t in threads]
[t.join(60) for t in threads]
digests = {{hashlib.sha256(r.encode()).hexdigest()[:16] for r in results}}
print(len(results), len(digests), len(errors), *sorted(digests), errors[:1])
"""


@pytest.mark.peers
@pytest.mark.postgres
def test_processes_sharing_postgres_cause_one_token_request(
    instance: Path,
    peer: PeerInfo,
    pg_url: str,
) -> None:
    """Three serving processes on one database, five callers each: one refresh in all."""
    import hashlib
    import subprocess
    import sys

    from people import users

    config = {
        "INSTANCE_PATH": str(instance),
        "DATABASE_URL": pg_url,
        "UPSTREAM_CA_FILE": peer.ca_file,
        "PUBLIC_URL": PUBLIC,
        "CUSTOM_CLIENT_LOOPBACK": True,
        "ARGON2_MEMORY_KIB": 1024,
        "ARGON2_TIME_COST": 1,
        "ARGON2_PARALLELISM": 1,
    }
    app = make_app(instance, **{k: v for k, v in config.items() if k != "INSTANCE_PATH"})
    with app.app_context():
        owner = users.create_user("herd@example.org", "owner-password-1", True)
    account, reg = link(owner, peer)
    expire(account)
    before = token_requests(peer, reg["client_id"])
    script = _HERD_WORKER.format(root=str(Path(__file__).parents[2]), config=config)
    start_at = str(time.time() + 4)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, start_at, str(account.id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=90) for w in workers]
    fresh = Account.get_by_id(account.id).access_token
    assert fresh != account.access_token
    digest = hashlib.sha256(fresh.encode()).hexdigest()[:16]
    for out, err in outputs:
        assert out.split()[:4] == ["5", "1", "0", digest], (out, err[-2000:])
    assert token_requests(peer, reg["client_id"]) == before + 1


# ---- oauth/grants.py in-process: what a token endpoint's answer or failure becomes ------------


def _answer(status: int, retry_after: str | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def _raising(error: BaseException) -> Callable[[], Any]:
    def request() -> Any:
        raise error

    return request


def test_retry_after_is_read_as_seconds_or_an_http_date_and_bounded_to_a_day() -> None:
    soon = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120))
    naive = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)).strftime("%d %b %Y %H:%M:%S")
    assert grants.retry_after_of(_answer(429, " 30 ")) == 30.0
    assert grants.retry_after_of(_answer(429, "1.5")) == 1.5
    assert 100 < (grants.retry_after_of(_answer(503, soon)) or 0) <= 120
    assert 100 < (grants.retry_after_of(_answer(503, f"Wed, {naive}")) or 0) <= 120
    assert grants.retry_after_of(_answer(503, "Mon, 01 Jan 2001 00:00:00 GMT")) == 0.0
    assert grants.retry_after_of(_answer(503, "-5")) == 0.0
    assert grants.retry_after_of(_answer(503, "999999")) == 86400.0
    assert grants.retry_after_of(_answer(503, "soon")) is None
    assert grants.retry_after_of(_answer(503, "")) is None
    assert grants.retry_after_of(_answer(503)) is None
    assert grants.retry_after_of(None) is None


def test_a_token_endpoints_failures_become_temporary_or_refusals_in_words() -> None:
    def outcome(error: BaseException) -> tuple[str, str, float | None, bool]:
        with pytest.raises(oauth_errors.TokenError) as raised:
            grants.call_endpoint(_raising(error))
        failure = raised.value
        kind = "temporary" if isinstance(failure, oauth_errors.TokenUnavailable) else "refused"
        unreached = bool(getattr(failure, "unreached", False))
        return kind, failure.message, failure.retry_after, unreached

    busy = OAuthError("temporarily_unavailable", "down for maintenance")
    busy.retry_after = 60  # type: ignore[attr-defined]
    assert outcome(busy) == (
        "temporary",
        "the token endpoint is temporarily unable to answer "
        "(temporarily_unavailable: down for maintenance)",
        60,
        False,
    )
    assert outcome(OAuthError("slow_down"))[1] == (
        "the token endpoint is temporarily unable to answer (slow_down)"
    )
    said = ("server_error: " + "x" * 400)[:300]
    assert outcome(OAuthError("server_error", "x" * 400))[1] == (
        f"the token endpoint is temporarily unable to answer ({said})"
    )
    assert outcome(OAuthError("invalid_grant", "revoked")) == (
        "refused",
        "invalid_grant: revoked",
        None,
        False,
    )
    assert outcome(requests.Timeout()) == (
        "temporary",
        "the token endpoint did not answer in time",
        None,
        False,
    )
    for status in (429, 503):
        failure = requests.HTTPError(response=_answer(status, "20"))
        assert outcome(failure) == (
            "temporary",
            f"the token endpoint answered HTTP {status}",
            20.0,
            False,
        )
    assert outcome(requests.HTTPError(response=_answer(404))) == (
        "refused",
        "http_error: the token endpoint answered HTTP 404",
        None,
        False,
    )
    assert outcome(requests.HTTPError())[:2] == (
        "refused",
        "http_error: the token endpoint answered HTTP 0",
    )
    assert outcome(requests.exceptions.SSLError("certificate verify failed")) == (
        "temporary",
        "TLS failure at the token endpoint: certificate verify failed",
        None,
        False,
    )
    assert outcome(requests.ConnectionError("Connection refused")) == (
        "temporary",
        "the token endpoint is unreachable: Connection refused",
        None,
        True,
    )
    assert outcome(requests.TooManyRedirects("too many"))[:2] == (
        "temporary",
        "the token endpoint is unreachable: too many",
    )
    assert outcome(ValueError("not JSON")) == (
        "temporary",
        "the token endpoint gave no usable answer (not JSON)",
        None,
        False,
    )
    assert grants.call_endpoint(lambda: {"access_token": "t"}) == {"access_token": "t"}


def test_the_identity_is_read_from_the_id_token_then_the_access_token() -> None:
    def jwt(claims: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJub25lIn0.{body}.sig"

    assert grants.identity_from({"id_token": jwt({"email": "Ann@Example.org"})}) == (
        "ann@example.org"
    )
    assert (
        grants.identity_from(
            {"id_token": jwt({"sub": "1", "name": "x"}), "access_token": jwt({"upn": "B@x.org"})}
        )
        == "b@x.org"
    )
    for key in ("preferred_username", "upn", "unique_name"):
        assert grants.identity_from({"access_token": jwt({key: "c@x.org"})}) == "c@x.org"
    assert grants.identity_from({"id_token": jwt({"email": "no-at", "upn": "d@x.org"})}) == (
        "d@x.org"
    )
    assert grants.identity_from({"id_token": jwt({"email": ["e@x.org"]})}) == ""
    assert grants.identity_from({"access_token": "opaque-token"}) == ""
    assert grants.identity_from({"access_token": "a.b.c"}) == ""  # no JSON inside
    assert grants.identity_from({"access_token": jwt(["f@x.org"])}) == ""  # type: ignore[arg-type]
    assert grants.identity_from({}) == ""


def test_the_grant_settings_come_from_the_config_and_bound_a_refresh_claim() -> None:
    settings = grants.Settings.from_config(
        {
            "UPSTREAM_CA_FILE": "/etc/ca.pem",
            "TOKEN_HTTP_TIMEOUT": "4",
            "TOKEN_ATTEMPTS": "2",
            "TOKEN_BACKOFF": "0.25",
        }  # fmt: skip
    )
    assert (settings.ca_file, settings.timeout, settings.attempts, settings.backoff) == (
        "/etc/ca.pem",
        4.0,
        2,
        0.25,
    )
    assert settings.claim_seconds == 2 * 4.0 + 0.25 * 2**2 + 10
    defaults = grants.Settings.from_config({})
    assert (defaults.ca_file, defaults.timeout, defaults.attempts, defaults.backoff) == (
        "",
        15.0,
        3,
        0.5,
    )


def test_a_network_failure_is_named_in_its_own_words_in_one_short_line() -> None:
    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException:
                raise outer from None  # __context__ is kept, as when requests wraps urllib3
        except BaseException as caught:
            return caught

    wrapped = chained(requests.ConnectionError("Max retries exceeded"), OSError("refused here"))
    assert outcome_of(wrapped) == "the token endpoint is unreachable: Max retries exceeded"
    long = requests.ConnectionError("first line " + "x" * 300 + "\nsecond line")
    said = ("first line " + "x" * 300)[:200]
    assert outcome_of(long) == f"the token endpoint is unreachable: {said}"
    assert outcome_of(requests.ConnectionError("refused\nat line two")) == (
        "the token endpoint is unreachable: refused"
    )
    assert outcome_of(requests.ConnectionError()) == (
        "the token endpoint is unreachable: ConnectionError"
    )


def outcome_of(error: BaseException) -> str:
    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        grants.call_endpoint(_raising(error))
    return raised.value.message


def test_a_device_flow_starts_with_the_codes_and_page_the_provider_gave(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    client = account.client
    with pytest.raises(oauth_errors.GrantError) as none:
        grants.device_code_start(client)
    assert (none.value.error, none.value.description) == (
        "unsupported_grant_type",
        "this client has no device authorization URL",
    )
    server = scripted(
        (200, {"device_code": "dc", "user_code": "UC-1", "verification_url": "https://v.example/d"})
    )
    client.device_url, client.scope = server.url, ""
    started = grants.device_code_start(client)
    assert "scope" not in server.forms[-1]  # no scope configured: none sent
    assert (started.device_code, started.user_code) == ("dc", "UC-1")
    assert started.verification_uri == "https://v.example/d"  # Google's older field name
    assert started.verification_uri_complete == ""
    assert (started.expires_in, started.interval) == (900, 5)


def test_a_revocation_says_whether_the_provider_took_it_and_logs_a_refusal(
    fast_app: Flask, scripted: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    server = scripted((200, {}), (400, {"error": "unsupported_token_type"}))
    caplog.set_level(logging.INFO, logger="auth_email.grants")
    assert grants.revoke(client, server.url, "r-token", "refresh_token") is True
    assert server.forms[0]["token"] == "r-token"
    assert server.forms[0]["token_type_hint"] == "refresh_token"
    assert grants.revoke(client, server.url, "r-token", "refresh_token") is False
    assert "revocation at the provider failed: unsupported_token_type" in caplog.messages


def test_a_certificate_client_names_itself_beside_its_assertion_at_device_and_revocation(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    """Entra's device and revocation endpoints want the client_id in the body even with a
    signed assertion, which Authlib does not add for private_key_jwt."""
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    certificates.generate(client)
    server = scripted(
        (200, {"device_code": "dc", "user_code": "UC", "verification_uri": "https://v.example/d"}),
        (200, {}),
    )
    client.device_url = server.url
    grants.device_code_start(client)
    assert grants.revoke(client, server.url, "r-token", "refresh_token") is True
    for form in server.forms:
        assert form["client_id"] == client.client_id
        assert form["client_assertion_type"] == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        )
        assert form["client_assertion"].count(".") == 2  # a signed JWT
    assert server.authorizations == [None, None]  # no Basic header with a key as its password


def test_token_endpoints_over_https_are_verified_against_each_apps_configured_ca(
    tmp_path: Path, peer: Any, scripted: Callable[..., Any]
) -> None:
    """The peers' throwaway CA is in no system bundle: only UPSTREAM_CA_FILE makes it trusted,
    and each app keeps its own (made one after the other, neither takes the other's)."""
    started = {"device_code": "dc", "user_code": "UC", "verification_uri": "https://v.example/d"}
    server = scripted((200, started), tls=(peer.server_cert_file, peer.server_key_file))
    assert server.url.startswith("https://127.0.0.1:")
    trusting = make_app(tmp_path / "trusting", UPSTREAM_CA_FILE=peer.ca_file)
    plain = make_app(tmp_path / "plain")
    with trusting.app_context():
        client = broken_account(trusting, "http://127.0.0.1:9/token").client
        client.device_url = server.url
        assert grants.device_code_start(client).user_code == "UC"
        assert grants.ssl_context() is grants.ssl_context()  # built once per app
    with plain.app_context():
        client = broken_account(plain, "http://127.0.0.1:9/token").client
        client.device_url = server.url
        with pytest.raises(oauth_errors.TokenUnavailable) as raised:
            grants.device_code_start(client)
        assert raised.value.message.startswith("TLS failure at the token endpoint: ")
    assert server.hits == 1  # the untrusted attempt never got to send its form


def test_the_built_in_providers_hosts_stay_allowed_when_the_admin_narrows_the_hosts(
    tmp_path: Path,
) -> None:
    app = make_app(tmp_path, CUSTOM_CLIENT_HOSTS="oauth.example.org")
    with app.app_context():
        grants.check_endpoint("https://login.microsoftonline.com/common/oauth2/v2.0/token")
        grants.check_endpoint("https://oauth2.googleapis.com/token")
        grants.check_endpoint("https://oauth.example.org/token")
        with pytest.raises(oauth_errors.GrantError) as refused:
            grants.check_endpoint("https://oauth.example.net/token")
        assert refused.value.error == "host_not_allowed"


def test_device_and_revocation_answers_that_are_no_json_object_are_judged_by_their_status(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    """RFC 7009 revocation answers 200 with an empty body; a page or a bare 404 is no answer."""
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    server = scripted((200, ""), (200, "<html>sign in</html>"), (404, {"detail": "no such path"}))
    assert grants.revoke(client, server.url, "r-token", "refresh_token") is True
    client.device_url = server.url
    with pytest.raises(oauth_errors.TokenUnavailable) as page:
        grants.device_code_start(client)
    assert page.value.message == (
        "the token endpoint gave no usable answer (HTTP 200, not a JSON object)"
    )
    with pytest.raises(oauth_errors.GrantError) as missing:
        grants.device_code_start(client)
    assert (missing.value.error, missing.value.description) == (
        "http_error",
        "the token endpoint answered HTTP 404",
    )


def test_the_authorization_link_names_the_instances_redirect_uri(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    account.client.authorize_url = "https://login.example/authorize"
    url = authorize.begin(account.owner, account, account.client, "https://mail.example/authorize")
    query = parse_qs(urlsplit(url).query)
    assert query["redirect_uri"] == ["https://mail.example/authorize"]
    assert query["client_id"] == [account.client.client_id]


def test_a_device_flow_keeps_the_providers_expiry_interval_and_complete_link(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    server = scripted(
        (
            200,
            {
                "device_code": "dc",
                "user_code": "UC-2",
                "verification_uri": "https://v.example/d",
                "verification_uri_complete": "https://v.example/d?c=UC-2",
                "expires_in": 600,
                "interval": 8,
            },
        )
    )
    client.device_url, client.scope = server.url, "mail offline_access"
    started = grants.device_code_start(client)
    assert server.forms[-1]["scope"] == "mail offline_access"
    assert started.verification_uri == "https://v.example/d"
    assert started.verification_uri_complete == "https://v.example/d?c=UC-2"
    assert (started.expires_in, started.interval) == (600, 8)


def test_an_incomplete_device_answer_is_a_temporary_failure_in_words(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    server = scripted(
        (200, {"device_code": "dc", "verification_uri": "https://v.example/d"}),  # no user code
        (200, {"device_code": "dc", "user_code": "U", "verification_uri": "x", "interval": "?"}),
    )
    client.device_url = server.url
    for _ in range(2):
        with pytest.raises(oauth_errors.TokenUnavailable) as raised:
            grants.device_code_start(client)
        assert raised.value.message == "the device authorization answer is incomplete"


def test_each_grant_sends_the_redirect_uri_and_scope_the_provider_checks(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    server = scripted((200, {"access_token": "t", "token_type": "Bearer", "expires_in": 60}))
    client = broken_account(fast_app, server.url).client
    client.scope = "mail offline_access"
    grants.exchange_code(client, "the-code", "https://app.example/callback", "verifier-1")
    code = server.forms[-1]
    assert code["grant_type"] == "authorization_code"
    assert code["redirect_uri"] == "https://app.example/callback"  # must match the first leg
    assert (code["code"], code["code_verifier"]) == ("the-code", "verifier-1")
    assert set(code) == {"grant_type", "code", "redirect_uri", "code_verifier"}  # nothing else
    grants.client_credentials(client)
    assert server.forms[-1]["grant_type"] == "client_credentials"
    assert server.forms[-1]["scope"] == "mail offline_access"
    grants.password_grant(client, "ann@example.org", "pw")
    assert server.forms[-1]["grant_type"] == "password"
    assert server.forms[-1]["scope"] == "mail offline_access"
    grants.refresh_grant(client, "r1")
    assert server.forms[-1]["grant_type"] == "refresh_token"
    assert "scope" not in server.forms[-1]  # no scope: the provider renews what it granted
    grants.refresh_grant(client, "r1", "mail")
    assert server.forms[-1]["scope"] == "mail"


def test_a_busy_answer_is_temporary_even_when_its_body_names_an_oauth_error(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    client = broken_account(fast_app, "http://127.0.0.1:9/token").client
    for status in (500, 429, 503):
        server = scripted((status, {"error": "invalid_grant", "error_description": "no"}))
        client.token_url = server.url
        for grant in (grants.client_credentials, lambda c: grants.refresh_grant(c, "r1")):
            with pytest.raises(oauth_errors.TokenUnavailable) as raised:
                grant(client)
            assert raised.value.message == f"the token endpoint answered HTTP {status}"


def test_an_error_answer_with_an_empty_code_is_a_refusal_named_unknown_error(
    fast_app: Flask, scripted: Callable[..., Any]
) -> None:
    server = scripted((400, {"error": "", "error_description": "the provider said no more"}))
    client = broken_account(fast_app, server.url).client
    with pytest.raises(oauth_errors.GrantError) as raised:
        grants.refresh_grant(client, "r1")
    assert (raised.value.error, raised.value.message) == (
        "unknown_error",
        "unknown_error: the provider said no more",
    )


def test_an_endpoint_refusal_names_its_reason_in_words() -> None:
    with pytest.raises(oauth_errors.GrantError) as insecure:
        grants.check_endpoint("http://login.example.com/token")
    assert (insecure.value.error, insecure.value.description) == (
        "insecure_endpoint",
        "the endpoint 'http://login.example.com/token' must use https",
    )
    with pytest.raises(oauth_errors.GrantError) as hostless:
        grants.check_endpoint("https:///token")
    assert (hostless.value.error, hostless.value.description) == (
        "host_not_allowed",
        "Enter a host name.",
    )


def test_a_grant_that_gets_no_answer_gives_up_after_the_configured_timeout(
    timeout_app: Flask, scripted: Callable[..., Any]
) -> None:
    server = scripted(("hang", 4))
    client = broken_account(timeout_app, server.url).client
    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        grants.client_credentials(client)
    assert raised.value.message == "the token endpoint did not answer in time"
