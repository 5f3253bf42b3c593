"""Renewal that survives how real providers behave: the granted scope, back-off, bad answers.

Against the real OAuth server (counted at the server) where it can show the behaviour, and a
scripted local token endpoint for the answers the server cannot give (HTML, truncated JSON,
a hang, ``invalid_scope`` for one request only).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from models import Account, OAuthClient, User, utcnow
from oauth import errors as oauth_errors
from oauth import tokens
from tests.helpers.app import make_app
from tests.helpers.linking import (
    PUBLIC,
    PeerInfo,
    token_requests,
)
from tests.helpers.tokens import (
    Scripted,
    caller_thread,
    expire,
    hold_after_its_read,
    link,
    next_try_in,
    seconds_until_next_try,
)

USER_SCOPE = "openid email offline_access"


@pytest.fixture
def owner(instance: Path, peer: PeerInfo) -> User:
    from people import users

    app: Flask = make_app(instance, UPSTREAM_CA_FILE=peer.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        users.create_admin("admin@example.org", "admin-password-1")
        return users.create_user("owner@example.org", "owner-password-1", True)


@pytest.mark.peers
@pytest.mark.parametrize("scope", [USER_SCOPE, f"{USER_SCOPE} mail"])
def test_a_user_typed_scope_with_offline_access_keeps_renewing(
    owner: User,
    peer: PeerInfo,
    scope: str,
) -> None:
    """The issue's reproduction: a 2-minute token, the scope a user would type, and the
    refresh that failed with invalid_scope because it repeated the configured scope."""
    account, reg = link(owner, peer, client_scope=scope, access_token_ttl=120)
    expire(account)
    before = token_requests(peer, reg["client_id"])

    first = tokens.get_access_token(account.id)
    expire(Account.get_by_id(account.id))
    second = tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert first != account.access_token and second != first
    assert stored.status == "active" and stored.last_error == ""
    assert token_requests(peer, reg["client_id"]) == before + 2


# ------------------------------------------------------------------ a scripted token endpoint


@pytest.fixture
def quick_app(instance: Path) -> Flask:
    # a timeout a loaded 2-core machine keeps (0.5 s once timed out a local answer)
    return make_app(instance, TOKEN_HTTP_TIMEOUT=3, TOKEN_BACKOFF=0.01, TOKEN_ATTEMPTS=3)


def account_at(app: Flask, token_url: str, granted: str = "", provider: str = "other") -> Account:
    """An active account whose access token has run out, renewed at ``token_url``."""
    from people import users

    with app.app_context():
        user = users.create_user("renew@example.org", "renew-password-1", True)
    client = OAuthClient.create(
        owner=user,
        name="scripted",
        provider=provider,
        token_url=token_url,
        scope="openid email offline_access mail",
        client_id="id",
        client_secret="secret",
    )
    account = Account.create(
        owner=user, address="renew@example.test", provider=provider, client=client, status="active"
    )
    tokens.store_tokens(
        account, {"access_token": "a1", "refresh_token": "r1", "expires_in": 0, "scope": granted}
    )
    return Account.get_by_id(account.id)


OK = (
    200,
    {"access_token": "a2", "refresh_token": "r2", "token_type": "Bearer", "expires_in": 3600},
)


def test_refresh_asks_for_the_granted_scope_not_the_configured_one(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted(OK)
    account = account_at(quick_app, server.url, granted="openid email")

    assert tokens.get_access_token(account.id) == "a2"

    (form,) = server.forms
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "r1"
    assert form["scope"] == "openid email"  # what was granted, not the client's setting


def test_refresh_without_a_granted_scope_sends_no_scope(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted(OK)
    account = account_at(quick_app, server.url, granted="")

    assert tokens.get_access_token(account.id) == "a2"
    assert "scope" not in server.forms[0]


def test_a_refresh_refused_for_its_scope_is_tried_once_without_it(
    quick_app: Flask, scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    refused = (400, {"error": "invalid_scope", "error_description": "missing requested scope"})
    server = scripted(refused, OK)
    account = account_at(quick_app, server.url, granted="openid email offline_access")
    caplog.set_level(logging.INFO, logger="auth_email.tokens")

    assert tokens.get_access_token(account.id) == "a2"

    said = f"account {account.id}: refresh refused for its scope; again without"
    assert said in caplog.messages

    assert [f.get("scope") for f in server.forms] == ["openid email offline_access", None]
    held = str(account.refresh_token)
    assert [f["refresh_token"] for f in server.forms] == [held, held]  # the same grant again
    stored = Account.get_by_id(account.id)
    assert stored.granted_scope == "" and stored.refresh_token == "r2"
    expire(stored)
    tokens.get_access_token(account.id)
    assert "scope" not in server.forms[2]  # and stays without


def test_another_refusal_of_a_refresh_with_a_scope_is_not_repeated_without_it(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((400, {"error": "invalid_grant", "error_description": "gone"}))
    account = account_at(quick_app, server.url, granted="openid email")

    with pytest.raises(oauth_errors.NeedsReauthorization):
        tokens.get_access_token(account.id)
    assert server.hits == 1


def test_a_mailbox_without_a_refresh_token_is_to_be_authorized_again(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted(OK)
    account = account_at(quick_app, server.url)
    Account.update(refresh_token=None).where(Account.id == account.id).execute()

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == (
        "No refresh token is stored for this mailbox; authorize it again."
    )
    assert server.hits == 0


def test_invalid_scope_without_a_scope_is_not_repeated(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((400, {"error": "invalid_scope", "error_description": "no"}))
    account = account_at(quick_app, server.url, granted="")

    with pytest.raises(oauth_errors.ClientRefused):
        tokens.get_access_token(account.id)
    assert server.hits == 1


# ------------------------------------------------------------------------------- back-off


def test_a_refused_refresh_is_remembered_and_not_asked_again_until_the_back_off_ends(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((401, {"error": "invalid_client", "error_description": "bad secret"}))
    account = account_at(quick_app, server.url)

    with pytest.raises(oauth_errors.ClientRefused):
        tokens.get_access_token(account.id)
    for _ in range(50):
        with pytest.raises(oauth_errors.ClientRefused, match="Next try in"):
            tokens.get_access_token(account.id)
    with pytest.raises(oauth_errors.ClientRefused):
        tokens.get_access_token(account.id, force_refresh=True)

    assert server.hits == 1
    assert 25 < seconds_until_next_try(account) <= 30
    first = Account.get_by_id(account.id)
    assert first.refresh_failures == 1 and first.refresh_failing_since is not None
    assert first.status == "active" and "bad secret" in first.last_error

    next_try_in(account, -1)
    with pytest.raises(oauth_errors.ClientRefused):
        tokens.get_access_token(account.id)
    assert server.hits == 2
    assert 55 < seconds_until_next_try(account) <= 60  # doubled
    second = Account.get_by_id(account.id)
    assert second.refresh_failing_since == first.refresh_failing_since  # since the first


def test_the_back_off_doubles_to_an_hour() -> None:
    waits = [tokens.backoff_seconds(n) for n in range(1, 10)]
    assert waits[:4] == [30, 60, 120, 240] and waits[-1] == 3600 == max(waits)
    assert tokens.backoff_seconds(1, retry_after=300) == 300
    assert tokens.backoff_seconds(5, retry_after=10) == 480


@pytest.mark.parametrize("header", ["120", "http-date"])
def test_retry_after_is_honoured(
    quick_app: Flask, scripted: Callable[..., Scripted], header: str
) -> None:
    if header == "http-date":
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
        header = email.utils.format_datetime(when, usegmt=True)
    server = scripted((429, "Too Many Requests", {"Retry-After": header}))
    account = account_at(quick_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)

    assert server.hits == 1
    assert 110 < seconds_until_next_try(account) <= 121


def test_a_success_after_failures_forgets_them(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((503, "busy"), OK)
    account = account_at(quick_app, server.url)
    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)
    next_try_in(account, -1)

    assert tokens.get_access_token(account.id) == "a2"

    stored = Account.get_by_id(account.id)
    assert stored.refresh_failures == 0 and stored.next_refresh_at is None
    assert stored.refresh_failing_since is None and stored.last_error == ""
    assert stored.refresh_error_kind == ""


def test_a_token_not_yet_run_out_still_serves_during_the_back_off(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((503, "busy"))
    account = account_at(quick_app, server.url)
    # inside the renewal margin (60 s) but valid for 40 s more
    Account.update(
        token_expires_at=utcnow() + dt.timedelta(seconds=40),
        last_refresh_at=utcnow() - dt.timedelta(hours=1),
    ).where(Account.id == account.id).execute()

    assert tokens.get_access_token(account.id) == "a1"  # the refresh failed; the token serves
    assert tokens.get_access_token(account.id) == "a1"
    assert server.hits == 1
    with pytest.raises(oauth_errors.TokenUnavailable):  # the server refused it: no other token
        tokens.get_access_token(account.id, force_refresh=True)
    assert server.hits == 1


def test_a_token_shorter_than_the_margin_is_not_renewed_at_every_use(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    short = (200, {"access_token": "a2", "token_type": "Bearer", "expires_in": 30})
    server = scripted(short)
    account = account_at(quick_app, server.url)

    for _ in range(5):
        assert tokens.get_access_token(account.id) == "a2"
    assert server.hits == 1


def test_a_throttling_invalid_grant_is_not_a_lost_authorization(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    loop = "AADSTS50196: The server terminated an operation because it encountered a client "
    server = scripted((400, {"error": "invalid_grant", "error_description": loop}))
    account = account_at(quick_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)

    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and stored.next_refresh_at is not None


def test_google_expired_or_revoked_explains_the_testing_status(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    said = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
    server = scripted((400, said))
    account = account_at(quick_app, server.url, provider="google")

    with pytest.raises(oauth_errors.NeedsReauthorization) as raised:
        tokens.get_access_token(account.id)

    assert "Testing" in raised.value.message and "7 days" in raised.value.message
    assert Account.get_by_id(account.id).status == "needs_reauth"


# ------------------------------------------------------------------------------- bad answers


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ((200, "<html><body>Sign in</body></html>"), "no usable answer"),
        ((200, '{"access_token": "a2", "expires_'), "no usable answer"),
        ((200, ["a2"]), "no usable answer"),
        ((200, {"token_type": "Bearer", "expires_in": 3600}), "without an access token"),
        ((200, {"access_token": "", "expires_in": 3600}), "without an access token"),
        ((502, "<html>Bad gateway</html>"), "HTTP 502"),
        ((400, "<html>Bad request</html>"), "HTTP 400"),
        (("hang", 6.0), "in time"),  # past the 3 s timeout
    ],
)
def test_a_malformed_or_missing_answer_keeps_the_tokens_and_the_account(
    quick_app: Flask, scripted: Callable[..., Scripted], answer: tuple[Any, ...], words: str
) -> None:
    server = scripted(answer)
    account = account_at(quick_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)
    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)  # recorded: no second request

    assert not isinstance(raised.value, oauth_errors.NeedsReauthorization)
    assert server.hits == 1
    stored = Account.get_by_id(account.id)
    assert stored.status == "active" and words in stored.last_error
    assert stored.refresh_token == "r1" and stored.access_token == "a1"
    assert stored.refresh_claimed_until is None and stored.next_refresh_at is not None


def test_a_rotated_refresh_token_is_kept_though_the_rest_of_the_answer_is_unusable(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((200, {"refresh_token": "r2", "token_type": "Bearer"}))
    account = account_at(quick_app, server.url)

    with pytest.raises(oauth_errors.TokenUnavailable) as raised:
        tokens.get_access_token(account.id)

    assert raised.value.message == "the token endpoint answered without an access token"
    assert Account.get_by_id(account.id).refresh_token == "r2"


@pytest.mark.parametrize("rotated", ["", None, 5, ["r2"]], ids=repr)
def test_an_answer_without_a_usable_refresh_token_keeps_the_stored_one(
    quick_app: Flask, scripted: Callable[..., Scripted], rotated: Any
) -> None:
    body = {"access_token": "a2", "refresh_token": rotated, "expires_in": 3600}
    server = scripted((200, body))
    account = account_at(quick_app, server.url)

    assert tokens.get_access_token(account.id) == "a2"

    stored = Account.get_by_id(account.id)
    assert stored.refresh_token == "r1" and stored.access_token == "a2"


@pytest.mark.parametrize(
    "answer",
    [
        OK,
        (200, {"refresh_token": "r2", "token_type": "Bearer"}),
        (503, "busy"),
        (400, {"error": "invalid_grant", "error_description": "gone"}),
    ],
    ids=["renewed", "rotated only", "failed", "refused"],
)
@pytest.mark.parametrize("ahead", [0, 1], ids=["at the version claimed", "at the claim's version"])
def test_a_renewal_writes_its_own_account_only_even_one_at_the_same_version(
    quick_app: Flask, scripted: Callable[..., Scripted], answer: tuple[Any, ...], ahead: int
) -> None:
    """The version alone does not name a row: another account whose version happens to be the
    one claimed, or the claim's, keeps its tokens, its version and its state, whatever the
    renewal's outcome."""
    server = scripted(answer)
    account = account_at(quick_app, server.url)
    other = Account.create(
        owner=account.owner, address="other@example.test", provider="other",
        client=account.client, status="active",
    )  # fmt: skip
    tokens.store_tokens(other, {"access_token": "o1", "refresh_token": "or1", "expires_in": 3600})
    claim = account.token_version + ahead
    Account.update(token_version=claim).where(Account.id == other.id).execute()

    try:
        tokens.get_access_token(account.id)
    except oauth_errors.TokenError:
        pass  # every answer but the first fails this renewal

    assert server.hits == 1
    untouched = Account.get_by_id(other.id)
    assert (untouched.access_token, untouched.refresh_token) == ("o1", "or1")
    assert untouched.token_version == claim
    assert (untouched.status, untouched.last_error) == ("active", "")
    assert untouched.next_refresh_at is None and untouched.refresh_claimed_until is None


def test_the_scope_a_renewal_grants_is_the_one_asked_for_next_time(
    quick_app: Flask, scripted: Callable[..., Scripted]
) -> None:
    narrowed = (200, {"access_token": "a2", "expires_in": 3600, "scope": "openid  email"})
    server = scripted(narrowed)
    account = account_at(quick_app, server.url, granted="openid email mail")

    assert tokens.get_access_token(account.id) == "a2"
    assert Account.get_by_id(account.id).granted_scope == "openid email"
    expire(account)
    tokens.get_access_token(account.id)

    assert [f["scope"] for f in server.forms] == ["openid email mail", "openid email"]


@pytest.mark.parametrize(("answered", "kept"), [("mail  send", "mail send"), (None, "mail")])
def test_a_client_credentials_renewal_keeps_the_scope_it_was_granted(
    quick_app: Flask, scripted: Callable[..., Scripted], answered: str | None, kept: str
) -> None:
    """No scope is asked for on this grant's renewal: what the provider names is stored, and
    without a name the stored scope stays."""
    body: dict[str, Any] = {"access_token": "a2", "token_type": "Bearer", "expires_in": 3600}
    if answered is not None:
        body["scope"] = answered
    server = scripted((200, body))
    account = account_at(quick_app, server.url, granted="mail")
    OAuthClient.update(grant="client_credentials").where(
        OAuthClient.id == account.client_id
    ).execute()

    assert tokens.get_access_token(account.id) == "a2"

    assert server.forms[0]["grant_type"] == "client_credentials"
    assert Account.get_by_id(account.id).granted_scope == kept


@pytest.mark.parametrize(("expires_in", "seconds"), [("3600", 3600), ("soon", 300), (None, 3600)])
def test_expires_in_as_text(
    quick_app: Flask, scripted: Callable[..., Scripted], expires_in: Any, seconds: int
) -> None:
    body = {"access_token": "a2", "token_type": "Bearer", "expires_in": expires_in}
    server = scripted((200, body))
    account = account_at(quick_app, server.url)

    assert tokens.get_access_token(account.id) == "a2"

    stored = Account.get_by_id(account.id)
    left = (stored.token_expires_at - utcnow()).total_seconds()
    assert seconds - 10 < left <= seconds


_SECOND_PROCESS = """
import sys
sys.path.insert(0, {root!r})
from app import create_app
from oauth import errors as oauth_errors
from oauth import tokens
create_app({config!r})
try:
    tokens.get_access_token({account_id})
    print("got a token")
except oauth_errors.TokenUnavailable as exc:
    print("refused:", exc.message)
"""


@pytest.mark.postgres
def test_another_process_on_the_same_postgres_honours_the_back_off(
    instance: Path, pg_url: str, scripted: Callable[..., Scripted]
) -> None:
    import subprocess
    import sys

    from tests.helpers.app import FAST_HASHING

    config = {"INSTANCE_PATH": str(instance), "DATABASE_URL": pg_url, "TOKEN_HTTP_TIMEOUT": 0.5,
              "PUBLIC_URL": PUBLIC, **FAST_HASHING}  # fmt: skip
    app = make_app(instance, **{k: v for k, v in config.items() if k != "INSTANCE_PATH"})
    server = scripted((503, "busy"))
    account = account_at(app, server.url)
    with pytest.raises(oauth_errors.TokenUnavailable):
        tokens.get_access_token(account.id)

    script = _SECOND_PROCESS.format(
        root=str(Path(__file__).parents[1]), config=config, account_id=account.id
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )

    assert "refused:" in done.stdout and "Next try in" in done.stdout, done.stderr[-2000:]
    assert server.hits == 1


@pytest.mark.parametrize(
    ("answer", "late_gets"),
    [
        (OK, "a2"),
        ((400, {"error": "invalid_grant", "error_description": "gone"}), "refused"),
        ((503, "busy"), "failed"),
    ],
    ids=["renewed", "refused", "failed"],
)
def test_a_caller_that_read_the_row_before_anothers_renewal_does_not_renew_it_again(
    quick_app: Flask,
    scripted: Callable[..., Scripted],
    monkeypatch: pytest.MonkeyPatch,
    answer: tuple[Any, ...],
    late_gets: str,
) -> None:
    """The renewal, or its refusal, moves the version past the one a late caller read, so that
    caller's claim on the expired row it holds fails and it takes what was stored (one
    request)."""
    server = scripted(answer)
    account = account_at(quick_app, server.url)
    renewed = threading.Event()
    late_caller, results = caller_thread(account.id)
    read = hold_after_its_read(monkeypatch, late_caller, renewed)
    late_caller.start()
    assert read.wait(60)
    try:
        assert tokens.get_access_token(account.id) == late_gets
    except oauth_errors.NeedsReauthorization:
        assert late_gets == "refused"
    except oauth_errors.TokenUnavailable:
        assert late_gets == "failed"
    renewed.set()
    late_caller.join(60)

    assert results == [late_gets]
    assert server.hits == 1
