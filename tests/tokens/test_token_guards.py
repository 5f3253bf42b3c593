"""The token lifecycle's guards: the refresh claim under real contention, the renewal margin,
the refresh counter's values, and the upkeep thread doing its work (real OAuth server)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailboxes import upkeep
from models import Account, User, utcnow
from oauth import errors as oauth_errors
from oauth import grants, tokens
from store.db import Ciphertext
from tests.helpers.app import make_app
from tests.helpers.linking import PUBLIC, PeerInfo, revoke_at_op, token_requests
from tests.helpers.tokens import FlakyTokenEndpoint, broken_account, expire, link

CALLERS = 6


@pytest.fixture
def sqlite_owner(instance: Any, peer: PeerInfo) -> User:
    """A user of an app on SQLite only (where PostgreSQL would add time, not proof)."""
    from people import users

    app = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        return users.create_user("owner@example.org", "owner-password-1", True)


def wait_until(condition: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    """Poll ``condition`` until it is true (generous: a loaded 2-core machine is slow)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def refreshes(result: str) -> float:
    """The current value of ``auth_email_token_refreshes_total{result=...}``."""
    return REGISTRY.get_sample_value("auth_email_token_refreshes_total", {"result": result}) or 0.0


# ---------------------------------------------------------------------------- the refresh claim


@pytest.mark.peers
def test_callers_that_load_the_same_version_at_once_make_one_refresh(
    owner: User,
    peer: PeerInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every caller reads the expired row before any of them claims it (a pause injected
    between load and claim): only the compare-and-swap on the version keeps it to one request.
    Without it each caller would spend the same rotating refresh token, and the provider would
    revoke the grant on the reuse."""
    account, reg = link(owner, peer)
    expire(account)
    before = token_requests(peer, reg["client_id"])
    ok_before = refreshes("ok")
    everyone_loaded = threading.Barrier(CALLERS)
    paused: set[int] = set()
    real_load = tokens._load

    def load_then_pause(account_id: int) -> Account:
        row = real_load(account_id)
        if threading.get_ident() not in paused:  # each caller's first look only
            paused.add(threading.get_ident())
            everyone_loaded.wait(timeout=60)
        return row

    monkeypatch.setattr(tokens, "_load", load_then_pause)
    results: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(tokens.get_access_token(account.id))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not errors, errors
    assert len(results) == CALLERS and len(set(results)) == 1
    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and results[0] == stored.access_token
    assert token_requests(peer, reg["client_id"]) == before + 1
    assert refreshes("ok") == ok_before + 1


# ---------------------------------------------------------------------------- the renewal margin


@pytest.mark.peers
def test_a_token_about_to_expire_is_renewed_before_it_is_handed_out(
    owner: User,
    peer: PeerInfo,
) -> None:
    """A token with less than the margin left would die during the client's session (or on the
    way to the server): it is renewed first, and a token with more left is used as it is."""
    account, reg = link(owner, peer)
    margin = grants.settings().margin
    assert margin >= 30
    Account.update(token_expires_at=utcnow() + dt.timedelta(seconds=margin + 120)).where(
        Account.id == account.id
    ).execute()
    before = token_requests(peer, reg["client_id"])
    assert tokens.get_access_token(account.id) == account.access_token
    assert token_requests(peer, reg["client_id"]) == before

    # an hour-long token near its end (a token shorter than the margin renews at half its life)
    Account.update(
        token_expires_at=utcnow() + dt.timedelta(seconds=margin // 2),
        last_refresh_at=utcnow() - dt.timedelta(hours=1),
    ).where(Account.id == account.id).execute()
    renewed = tokens.get_access_token(account.id)

    assert renewed != account.access_token
    assert token_requests(peer, reg["client_id"]) == before + 1
    stored = Account.get_by_id(account.id)
    assert stored.token_expires_at > utcnow() + dt.timedelta(seconds=margin)


# ---------------------------------------------------------------------------- the refresh counter


@pytest.mark.peers
def test_the_refresh_counter_counts_each_outcome_once(
    sqlite_owner: User,
    peer: PeerInfo,
) -> None:
    account, reg = link(sqlite_owner, peer)
    counts = {r: refreshes(r) for r in ("ok", "needs_reauth", "unavailable", "error")}

    tokens.get_access_token(account.id, force_refresh=True)
    assert refreshes("ok") == counts["ok"] + 1
    tokens.get_access_token(account.id)  # cached: no renewal, nothing counted
    assert refreshes("ok") == counts["ok"] + 1

    revoke_at_op(peer, client_id=reg["client_id"])
    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id, force_refresh=True)
    assert refreshes("needs_reauth") == counts["needs_reauth"] + 1
    assert refreshes("ok") == counts["ok"] + 1
    assert refreshes("unavailable") == counts["unavailable"]
    assert refreshes("error") == counts["error"]


def test_a_failed_refresh_counts_once_as_unavailable(
    fast_app: Any,
    endpoint_503: FlakyTokenEndpoint,
) -> None:
    account = broken_account(fast_app, endpoint_503.url)
    before = {r: refreshes(r) for r in ("ok", "unavailable")}

    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)

    # A 503 is an answer: it waits for the renewal back-off instead of being repeated at once
    # (only a request that never reached the server is tried again).
    assert endpoint_503.hits == 1
    assert refreshes("unavailable") == before["unavailable"] + 1
    assert refreshes("ok") == before["ok"]


# ---------------------------------------------------------------------------- the upkeep thread


def make_idle(*accounts: Account, days: int = upkeep.IDLE_DAYS + 5) -> None:
    for n, account in enumerate(accounts):
        # the first one given is the oldest: upkeep takes it first
        when = utcnow() - dt.timedelta(days=days + len(accounts) - n)
        Account.update(last_refresh_at=when).where(Account.id == account.id).execute()


def refreshed_since(account: Account, since: dt.datetime) -> bool:
    stored = Account.get_by_id(account.id)
    return stored.last_refresh_at is not None and stored.last_refresh_at > since


@pytest.fixture
def running_upkeep() -> Iterator[Callable[..., upkeep.Upkeep]]:
    started: list[upkeep.Upkeep] = []

    def start(interval: float = 0.3) -> upkeep.Upkeep:
        worker = upkeep.Upkeep(interval=interval)
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.mark.peers
def test_upkeep_thread_refreshes_idle_accounts_round_after_round_and_survives_a_failed_round(
    sqlite_owner: User,
    peer: PeerInfo,
    running_upkeep: Callable[..., upkeep.Upkeep],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account, _ = link(sqlite_owner, peer)
    rounds: list[str] = []
    real_round = upkeep.refresh_idle_accounts

    def a_round(**kwargs: Any) -> int:
        if not rounds:
            rounds.append("failed")
            raise RuntimeError("the database went away for a moment")
        rounds.append("ran")
        return real_round(**kwargs)

    monkeypatch.setattr(upkeep, "refresh_idle_accounts", a_round)
    make_idle(account)
    start = utcnow()

    running_upkeep(interval=0.3)

    wait_until(lambda: refreshed_since(account, start), what="the first refresh")
    assert rounds[0] == "failed" and "ran" in rounds
    second = utcnow()
    make_idle(account)  # idle again: a later round must refresh it again
    wait_until(lambda: refreshed_since(account, second), what="a later round")
    assert Account.get_by_id(account.id).status == "active"


@pytest.mark.peers
def test_upkeep_goes_on_to_the_other_accounts_when_one_fails(
    sqlite_owner: User,
    peer: PeerInfo,
    running_upkeep: Callable[..., upkeep.Upkeep],
) -> None:
    """A grant revoked at the provider, and a stored token that no longer decrypts, are taken
    first (they are the oldest); the healthy account is refreshed all the same."""
    revoked, revoked_reg = link(sqlite_owner, peer)
    unreadable, _ = link(sqlite_owner, peer)
    healthy, _ = link(sqlite_owner, peer)
    revoke_at_op(peer, client_id=revoked_reg["client_id"])
    Account.update(refresh_token=Ciphertext(b"\x01" + b"\x00" * 40)).where(
        Account.id == unreadable.id
    ).execute()
    make_idle(revoked, unreadable, healthy)
    start = utcnow()

    running_upkeep(interval=0.3)

    wait_until(lambda: refreshed_since(healthy, start), what="the healthy account's refresh")
    assert Account.get_by_id(healthy.id).status == "active"
    assert Account.get_by_id(revoked.id).status == "needs_reauth"
