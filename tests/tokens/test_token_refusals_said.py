"""What a failed renewal tells its callers, the account row, the log and the refresh counter:
the recorded reason and the wait during the back-off, the provider's words and its
``Retry-After``, and a caller whose refresh was taken over (local scripted token endpoints)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from prometheus_client import REGISTRY

from models import Account, Notification, Setting, utcnow
from oauth import errors as oauth_errors
from oauth import tokens
from store.db import Ciphertext
from tests.helpers.mail import wait_until
from tests.helpers.tokens import (
    FlakyTokenEndpoint,
    Scripted,
    broken_account,
    next_try_in,
    seconds_until_next_try,
)


def refreshes(result: str) -> float:
    return REGISTRY.get_sample_value("auth_email_token_refreshes_total", {"result": result}) or 0.0


# ------------------------------------------------------------- during the back-off


def test_during_the_back_off_callers_get_the_recorded_reason_and_the_wait(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((503, "busy"))
    account = broken_account(fast_app, server.url)
    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)
    recorded = Account.get_by_id(account.id).last_error
    assert recorded == "the token endpoint answered HTTP 503"

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)
    assert re.fullmatch(rf"{recorded} Next try in (29|30) s\.", raised.value.message)
    assert raised.value.retry_after is not None and 25 < raised.value.retry_after <= 30

    next_try_in(account, 0.3)  # under a second left: the wait said is one second
    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)
    assert raised.value.retry_after == 1.0
    assert raised.value.message == f"{recorded} Next try in 1 s."

    Account.update(last_error="").where(Account.id == account.id).execute()
    next_try_in(account, 600)
    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)
    assert re.fullmatch(
        r"Renewing the token failed\. Next try in (9|10) min\.", raised.value.message
    )
    assert server.hits == 1


def test_during_the_back_off_a_refused_client_is_still_a_refused_client_with_its_wait(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((401, {"error": "invalid_client", "error_description": "bad secret"}))
    account = broken_account(fast_app, server.url)
    with pytest.raises(oauth_errors.ClientRefused):
        tokens.get_access_token(account.id)

    with pytest.raises(oauth_errors.ClientRefused) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.retry_after is not None and 25 < raised.value.retry_after <= 30
    assert raised.value.message.startswith(Account.get_by_id(account.id).last_error)
    assert server.hits == 1


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (1, "1 s"),
        (119, "119 s"),
        (120, "2 min"),
        (150, "2 min"),
        (7199, "119 min"),
        (7200, "2 h"),
        (10799, "2 h"),
    ],
)
def test_the_wait_is_said_in_seconds_then_minutes_then_hours(seconds: int, said: str) -> None:
    assert tokens._duration(seconds) == said


def _waiting_frame(thread: threading.Thread) -> Any:
    """The caller's ``_get_access_token`` frame once it has waited for another's claim."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if "_get_access_token" in frame.f_code.co_name and "waited_for_other" in frame.f_locals:
            return frame if frame.f_locals["waited_for_other"] else None
        frame = frame.f_back
    return None


def _waiting_caller(account_id: int, force_refresh: bool = False) -> tuple[Any, list[Any]]:
    """A caller of ``get_access_token`` in a thread, started and seen waiting for the claim."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(tokens.get_access_token(account_id, force_refresh=force_refresh))
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            outcome.append(exc)

    waiter = threading.Thread(target=call)
    waiter.start()
    wait_until(lambda: _waiting_frame(waiter), timeout=60, what="the caller waiting for the claim")
    return waiter, outcome


@pytest.mark.parametrize(
    ("earlier", "said"),
    [(None, "Renewing the token failed."), ("The token endpoint was down.", None)],
    ids=["nothing recorded", "a back-off that has ended"],
)
def test_a_waiter_whose_refresher_died_without_a_record_fails_without_asking(
    fast_app: Flask, scripted: Callable[..., Scripted], earlier: str | None, said: str | None
) -> None:
    """Another caller claimed the refresh, then vanished (its claim ended, nothing recorded):
    the waiter does not pile on with a request of its own, and says no wait it cannot know.
    An earlier failure whose back-off has ended is what it says then."""
    server = scripted((503, "busy"))
    account = broken_account(fast_app, server.url)
    Account.update(
        refresh_claimed_until=utcnow() + dt.timedelta(seconds=60),
        last_error=earlier or "",
        next_refresh_at=utcnow() - dt.timedelta(minutes=1) if earlier else None,
    ).where(Account.id == account.id).execute()
    waiter, outcome = _waiting_caller(account.id)
    Account.update(refresh_claimed_until=None, token_version=Account.token_version + 1).where(
        Account.id == account.id
    ).execute()
    waiter.join(30)

    assert len(outcome) == 1 and type(outcome[0]) is oauth_errors.TokenUnavailable, outcome
    assert outcome[0].message == (said or earlier)
    assert outcome[0].retry_after is None
    assert server.hits == 0


def test_a_forced_renewal_that_waited_for_anothers_takes_its_token(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    """The mail server refused the token; meanwhile another caller is renewing it. What that
    renewal stores is the newer token asked for: no request of its own."""
    server = scripted((503, "busy"))
    account = broken_account(fast_app, server.url)
    Account.update(refresh_claimed_until=utcnow() + dt.timedelta(seconds=60)).where(
        Account.id == account.id
    ).execute()
    waiter, outcome = _waiting_caller(account.id, force_refresh=True)
    tokens.store_tokens(account, {"access_token": "a2", "expires_in": 3600})  # the other's
    waiter.join(30)

    assert outcome == ["a2"]
    assert server.hits == 0


# ------------------------------------------------------------- a claim taken over


def test_a_lapsed_claim_whose_taker_is_still_refreshing_is_a_temporary_failure(
    fast_app: Flask, request: pytest.FixtureRequest
) -> None:
    """The caller that took over stored a token, but is again claiming a refresh: ours is not
    handed out from under that claim."""

    def take_over_and_claim_again() -> None:
        with tokens.connected():
            taken = Account.get(Account.address == "flaky@example.test")
            tokens.store_tokens(taken, {"access_token": "theirs", "expires_in": 3600})
            Account.update(refresh_claimed_until=utcnow() + dt.timedelta(seconds=60)).where(
                Account.id == taken.id
            ).execute()

    server = FlakyTokenEndpoint(
        status=200,
        body={"access_token": "mine", "expires_in": 3600},
        on_request=take_over_and_claim_again,
    )
    request.addfinalizer(server.close)
    account = broken_account(fast_app, server.url)
    before = refreshes("unavailable")

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == (
        "The token refresh took too long and another one took over; try again shortly."
    )
    assert Account.get_by_id(account.id).access_token == "theirs"
    assert refreshes("unavailable") == before + 1  # a renewal that did not get its token


# ------------------------------------------------------------- the provider's words


def test_a_refused_grant_is_explained_with_the_providers_words(
    fast_app: Flask, scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    server = scripted(
        (400, {"error": "invalid_grant"}),
        (400, {"error": "invalid_grant", "error_description": "grant is gone"}),
        (400, {"error": "invalid_grant", "error_description": "x" * 3000}),
    )
    account = broken_account(fast_app, server.url)
    said = "The provider refused to renew the authorization (invalid_grant): "
    with caplog.at_level(logging.WARNING, logger="auth_email.tokens"):
        for words, expected in [
            ("invalid_grant", said + "invalid_grant"),
            ("grant is gone", said + "grant is gone"),
            ("x" * 3000, (said + "x" * 3000)[:1000]),
        ]:
            tokens.set_status(account.id, "active")
            with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
                tokens.get_access_token(account.id)
            assert raised.value.message == expected, words
            assert Account.get_by_id(account.id).status_detail == expected
    logged = [r.getMessage() for r in caplog.records if r.name == "auth_email.tokens"]
    assert f"account {account.id} needs re-authorization: {said}grant is gone" in logged
    assert server.hits == 3


def test_a_refused_grant_tells_the_owner_why_the_mailbox_needs_authorizing_again(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    Setting.write("notify_sender", "auth@example.org")
    server = scripted((400, {"error": "invalid_grant", "error_description": "grant is gone"}))
    account = broken_account(fast_app, server.url)
    before = utcnow()

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id)

    [notice] = Notification.select()
    assert (notice.user_id, notice.account_id, notice.kind, notice.subject) == (
        account.owner_id, account.id, "reauth", "flaky@example.test"
    )  # fmt: skip
    assert notice.title == "flaky@example.test needs re-authorization"
    assert notice.detail == raised.value.message
    stored = Account.get_by_id(account.id)
    assert stored.refresh_error_kind == "reauth" and stored.next_refresh_at is None
    assert stored.refresh_claimed_until is None
    assert before <= stored.refresh_failing_since <= utcnow()  # the page says since when


def test_a_renewal_failing_past_the_threshold_is_logged_and_told_to_the_owner(
    fast_app: Flask, scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    """Each failure is logged with its count, wait and reason; the owner hears of it once it
    has failed for longer than the instance's threshold (30 min here), not before."""
    Setting.write("notify_sender", "auth@example.org")
    Setting.write("notify_failing_minutes", "30")
    server = scripted((503, "busy"))
    account = broken_account(fast_app, server.url)

    def fail(minutes_ago: int) -> tuple[dt.datetime, str]:
        since = (utcnow() - dt.timedelta(minutes=minutes_ago)).replace(microsecond=0)
        Account.update(refresh_failing_since=since, refresh_failures=3, next_refresh_at=None).where(
            Account.id == account.id
        ).execute()
        with pytest.raises(oauth_errors.TokenUnavailable) as raised:
            tokens.get_access_token(account.id)
        return since, raised.value.message

    fail(10)
    assert Notification.select().count() == 0  # failing for 10 minutes, told after 30
    with caplog.at_level(logging.WARNING, logger="auth_email.tokens"):
        since, said = fail(45)

    assert said == "the token endpoint answered HTTP 503"
    logged = [r.getMessage() for r in caplog.records if r.name == "auth_email.tokens"]
    assert logged[-1] == (
        f"token refresh for account {account.id} failed (4 in a row, next try in 240 s): {said}"
    )
    [notice] = Notification.select()
    assert (notice.user_id, notice.account_id, notice.kind, notice.subject) == (
        account.owner_id, account.id, "renewal_failing", "flaky@example.test"
    )  # fmt: skip
    assert notice.title == "Renewing the token of flaky@example.test has failed for over 30 min"
    assert notice.detail == f"Failing since {since:%Y-%m-%d %H:%M} UTC (4 tries in a row). {said}"
    stored = Account.get_by_id(account.id)
    assert stored.refresh_error_kind == "unavailable" and stored.refresh_failing_since == since


def test_a_refused_client_carries_the_providers_error_words_and_wait(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted(
        (
            401,
            {"error": "invalid_client", "error_description": "secret expired " + "y" * 2000},
            {"Retry-After": "600"},
        )
    )
    account = broken_account(fast_app, server.url)
    before = refreshes("client_refused")

    with pytest.raises(oauth_errors.ClientRefused) as raised:
        tokens.get_access_token(account.id)

    refused = raised.value
    assert refused.error == "invalid_client"
    assert refused.description.startswith("secret expired yyy")
    assert refused.retry_after == 600
    assert 590 < seconds_until_next_try(account) <= 600  # the provider's wait, not 30 s
    assert len(refused.message) == 1000 and refused.message.startswith(
        'The provider refuses the OAuth client "flaky": (invalid_client) secret expired'
    )
    assert refreshes("client_refused") == before + 1


def test_the_end_of_the_refused_client_message_says_where_to_fix_it(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((401, {"error": "invalid_client", "error_description": "bad secret"}))
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.ClientRefused) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == (
        'The provider refuses the OAuth client "flaky": (invalid_client) bad secret '
        "Re-authorizing the mailbox cannot help: the client's secret or settings must be fixed "
        "in Account settings."
    )


def test_another_refusal_waits_for_the_providers_retry_after_with_its_words(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    """An error that says neither "authorize again" nor "fix the client" is temporary."""
    server = scripted(
        (400, {"error": "access_denied", "error_description": "z" * 3000}, {"Retry-After": "600"})
    )
    account = broken_account(fast_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)

    assert not isinstance(raised.value, oauth_errors.ClientRefused)
    assert raised.value.retry_after == 600
    assert 590 < seconds_until_next_try(account) <= 600
    assert (
        raised.value.message
        == ("The provider refused to renew the token (access_denied): " + "z" * 3000)[:1000]
    )
    assert Account.get_by_id(account.id).status == "active"


def test_a_refresh_that_crashes_counts_as_an_error_and_releases_its_claim(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((200, {"access_token": "a2", "expires_in": 3600}))
    account = broken_account(fast_app, server.url)
    Account.update(refresh_token=Ciphertext(b"\x01" + b"\x00" * 40)).where(
        Account.id == account.id
    ).execute()
    version = Account.get_by_id(account.id).token_version
    other = Account.create(  # at the version the claim will have: not ours all the same
        owner=account.owner, address="other@example.test", provider="other",
        status="active", token_version=version + 1,
    )  # fmt: skip
    before = refreshes("error")

    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever the vault raises
        tokens.get_access_token(account.id)

    assert not isinstance(raised.value, oauth_errors.TokenError)
    assert refreshes("error") == before + 1
    stored = Account.get_by_id(account.id)
    assert stored.refresh_claimed_until is None and stored.token_version == version + 2
    assert stored.status == "active" and server.hits == 0
    assert Account.get_by_id(other.id).token_version == version + 1


# ------------------------------------------------------------- the proxy's shortcut


def test_a_row_just_read_hands_out_its_token_only_when_no_renewal_is_due(fast_app: Flask) -> None:
    """``ready_token`` spares the proxy a query when ``get_access_token`` would return the
    cached token as it is; in every other case it says None and the full path decides."""
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    tokens.store_tokens(account, {"access_token": "fresh", "expires_in": 3600})
    fresh = Account.get_by_id(account.id)
    assert tokens.ready_token(fresh) == "fresh"

    Account.update(  # valid 40 s more, inside the renewal margin (60 s)
        token_expires_at=utcnow() + dt.timedelta(seconds=40),
        last_refresh_at=utcnow() - dt.timedelta(hours=1),
    ).where(Account.id == account.id).execute()
    assert tokens.ready_token(Account.get_by_id(account.id)) is None

    tokens.store_tokens(account, {"access_token": "fresh", "expires_in": 3600})
    Account.update(refresh_claimed_until=utcnow() + dt.timedelta(seconds=60)).where(
        Account.id == account.id
    ).execute()
    assert tokens.ready_token(Account.get_by_id(account.id)) is None  # a refresh in flight
    Account.update(refresh_claimed_until=utcnow() - dt.timedelta(seconds=1)).where(
        Account.id == account.id
    ).execute()
    assert tokens.ready_token(Account.get_by_id(account.id)) == "fresh"  # a lapsed claim

    for status in ("needs_reauth", "disabled", "pending"):
        tokens.set_status(account.id, status)
        assert tokens.ready_token(Account.get_by_id(account.id)) is None, status


# ------------------------------------------------------------- reading a token answer

NOW = dt.datetime(2026, 12, 2, 12, 0, 0)


@pytest.mark.parametrize(
    ("expires_in", "seconds"),
    [
        (None, 3600),  # RFC 6749 makes it optional: an hour
        ("", 3600),
        (120, 120),
        ("120", 120),
        ("120.9", 120),
        (1e3, 1000),
        ("soon", tokens.UNKNOWN_LIFETIME),  # not a number: assume little, renew early
        ("inf", tokens.UNKNOWN_LIFETIME),
        ("nan", tokens.UNKNOWN_LIFETIME),
        ([60], tokens.UNKNOWN_LIFETIME),
        (-5, 0),  # never in the past
        (10**9, 366 * 86400),  # never beyond a year
    ],
)
def test_the_expiry_is_read_from_any_form_providers_send(expires_in: Any, seconds: int) -> None:
    token = {} if expires_in is None else {"expires_in": expires_in}
    assert tokens.expiry_of(token, NOW) == NOW + dt.timedelta(seconds=seconds)


def test_the_expiry_counts_from_now_when_no_time_is_given() -> None:
    before = utcnow()
    expiry = tokens.expiry_of({"expires_in": 600})
    assert before + dt.timedelta(seconds=600) <= expiry <= utcnow() + dt.timedelta(seconds=600)


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        ("mail  openid\toffline_access ", "mail openid offline_access"),
        (["mail", "openid"], "mail openid"),
        ([1, "openid"], "1 openid"),
        ("", ""),
        (5, None),
        ({"mail": True}, None),
        ("m" * 5000, "m" * 4000),
    ],
)
def test_the_granted_scope_is_one_spaced_string_of_bounded_length(
    scope: Any, granted: str | None
) -> None:
    assert tokens.scope_of({"scope": scope}) == granted
    assert tokens.scope_of({}) is None


def test_the_providers_retry_after_lengthens_the_back_off_up_to_a_day() -> None:
    assert tokens.backoff_seconds(1, retry_after=0) == tokens.BACKOFF_FIRST
    assert tokens.backoff_seconds(1, retry_after=10**7) == 86400
    assert tokens.backoff_seconds(0) == tokens.BACKOFF_FIRST  # never less than the first wait
    assert tokens.backoff_seconds(30) == tokens.BACKOFF_MAX


def test_a_refused_grant_records_since_when_renewal_fails_how_often_and_why(
    fast_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    long = "AADSTS70008: The refresh token has expired due to inactivity. " + "w" * 2000
    server = scripted((503, "busy"), (400, {"error": "invalid_grant", "error_description": long}))
    account = broken_account(fast_app, server.url)
    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)
    first = Account.get_by_id(account.id)
    next_try_in(account, -1)

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert stored.status == "needs_reauth"
    assert stored.refresh_failing_since == first.refresh_failing_since is not None
    assert stored.refresh_failures == 2
    assert stored.next_refresh_at is None  # no back-off: only a new authorization helps
    assert stored.last_error == stored.status_detail == raised.value.message
    assert len(raised.value.message) == 1000  # the explanation, then as much of their words
    assert "AADSTS70008" in raised.value.message


def test_set_status_changes_that_account_only_with_the_detail_given(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    other = Account.create(
        owner=account.owner, address="other@example.test", provider="other", status="active"
    )

    tokens.set_status(account.id, "needs_reauth", "the grant is gone")
    stored = Account.get_by_id(account.id)
    assert (stored.status, stored.status_detail) == ("needs_reauth", "the grant is gone")
    tokens.set_status(account.id, "disabled")
    stored = Account.get_by_id(account.id)
    assert (stored.status, stored.status_detail) == ("disabled", "")
    assert Account.get_by_id(other.id).status == "active"


def test_the_renewal_margin_is_half_of_a_short_tokens_life(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    tokens.store_tokens(account, {"access_token": "short", "expires_in": 3600})

    def lived(before: float, left: float) -> Account:
        now = utcnow()
        Account.update(
            last_refresh_at=now - dt.timedelta(seconds=before),
            token_expires_at=now + dt.timedelta(seconds=left),
        ).where(Account.id == account.id).execute()
        return Account.get_by_id(account.id)

    # a 60-second token: renewed in its last 30 s (half), not only in the last 60 (the setting)
    assert tokens.ready_token(lived(before=20, left=40)) == "short"
    assert tokens.ready_token(lived(before=35, left=25)) is None
    # a row never refreshed here (no last refresh): the setting alone
    Account.update(
        last_refresh_at=None, token_expires_at=utcnow() + dt.timedelta(seconds=120)
    ).where(Account.id == account.id).execute()
    assert tokens.ready_token(Account.get_by_id(account.id)) == "short"


def test_a_mailbox_removed_meanwhile_is_said_to_be_no_longer_linked(fast_app: Flask) -> None:
    with fast_app.app_context(), pytest.raises(oauth_errors.AccountUnusable) as raised:
        tokens.get_access_token(10**6)
    assert raised.value.message == "This mailbox is not linked any more."


def test_a_mailbox_whose_client_was_removed_is_to_be_authorized_again(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    Account.update(client=None).where(Account.id == account.id).execute()

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == (
        "The OAuth client this mailbox was linked with no longer exists; authorize again."
    )
    assert Account.get_by_id(account.id).status == "needs_reauth"


def test_the_back_off_is_judged_at_the_time_asked_about(fast_app: Flask) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    next_try_in(account, 600)
    stored = Account.get_by_id(account.id)

    assert tokens.backing_off(stored)
    assert tokens.backing_off(stored, utcnow() + dt.timedelta(seconds=500))
    assert not tokens.backing_off(stored, utcnow() + dt.timedelta(seconds=700))


def test_a_mailbox_needing_reauthorization_says_why_or_that_the_provider_refuses_it(
    fast_app: Flask,
) -> None:
    account = broken_account(fast_app, "http://127.0.0.1:9/token")
    for detail, said in [
        ("Password changed at the provider.", "Password changed at the provider."),
        ("", "The provider no longer accepts this mailbox's authorization."),
    ]:
        tokens.set_status(account.id, "needs_reauth", detail)
        with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
            tokens.get_access_token(account.id)
        assert raised.value.message == said
