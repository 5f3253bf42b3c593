"""The app's proxy backend turns every failure of the token path into a refusal with a reason."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import LISTEN_SETTINGS
from mailboxes import graphsend, linking, listeners
from mailboxes import refusals as mailrefusals
from mailboxes.mailbackend import (
    LAST_USE_EVERY,
    AppBackend,
    AuthCache,
    MailProxyService,
    _account_used,
    event_loop,
    proxy_settings,
    running,
    trusted_proxies,
)
from mailproxy import DeliveryRefused, ProxyAuthError
from mailproxy.settings import LISTENER_NAMES
from models import Account, AuditEvent, MailPassword, OAuthClient, User, utcnow
from people import audit
from store.db import Ciphertext
from tests.helpers.accounts import MAIL_PASSWORD, make_account, make_client
from tests.helpers.app import make_app, stored_client
from tests.helpers.mail import EVERY_LISTENER_ON_A_FREE_PORT


@pytest.fixture
def account(app):
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        client = stored_client(owner, "c", "client-secret-value")
        account = Account(
            owner=owner,
            address="box@example.test",
            provider="other",
            client=client,
            status="active",
            access_token="a-token",
            refresh_token="r-token",
            token_expires_at=utcnow() + dt.timedelta(hours=1),
        )
        account.save()
        return account


def test_a_disabled_account_gets_a_refusal_not_an_exception(app, account):
    Account.update(status="disabled").where(Account.id == account.id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        AppBackend(app.config).access_token(account.id)
    assert refused.value.kind == "disabled"
    assert str(refused.value) == "This mailbox is disabled."


def test_an_unreadable_token_is_a_temporary_refusal(app, account, caplog):
    garbage = Ciphertext(b"\x01" + b"\x00" * 40)
    Account.update(access_token=garbage).where(Account.id == account.id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        AppBackend(app.config).access_token(account.id)
    assert refused.value.kind == "unavailable"
    assert str(refused.value) == "Internal error, try again later"
    assert f"getting the access token of account {account.id} failed" in caplog.messages
    assert "a-token" not in caplog.text and "r-token" not in caplog.text


def test_the_auth_cache_holds_a_login_for_its_time_and_forgets_an_account() -> None:
    cache = AuthCache()
    cache.put("box@example.test", "pw-1", account_id=7, password_id=70)
    cache.put("box@example.test", "pw-2", account_id=7, password_id=71)
    cache.put("other@example.test", "pw-1", account_id=8, password_id=80)

    hit = cache.get("box@example.test", "pw-1")
    assert hit is not None and (hit.account_id, hit.password_id) == (7, 70)
    assert cache.ttl == 600.0 and hit.until > time.monotonic() + 590
    assert cache.get("box@example.test", "pw-3") is None
    assert cache.get("nobody@example.test", "pw-1") is None

    cache.drop_account(7)
    assert cache.get("box@example.test", "pw-1") is None
    assert cache.get("box@example.test", "pw-2") is None
    assert cache.get("other@example.test", "pw-1") is not None

    lapsed = AuthCache(ttl=-1.0)
    lapsed.put("box@example.test", "pw-1", account_id=7, password_id=70)
    assert lapsed.get("box@example.test", "pw-1") is None
    assert lapsed._entries == {}  # a lapsed entry is removed when it is found, not kept


def test_the_proxy_settings_come_from_the_app_settings(instance: Path) -> None:
    listen = {key: f"127.0.0.1:{2000 + n}" for n, key in enumerate(LISTEN_SETTINGS.values())}
    app = make_app(
        instance,
        PUBLIC_URL="https://mail.example.test",
        TLS_CERT="/etc/ssl/cert.pem",
        TLS_KEY="/etc/ssl/key.pem",
        UPSTREAM_CA_FILE="/etc/ssl/ca.pem",
        MAIL_MAX_CONNECTIONS=101,
        MAIL_MAX_CONNECTIONS_PER_IP=11,
        MAIL_IDLE_TIMEOUT_PRELOGIN=21,
        MAIL_IDLE_TIMEOUT=1201,
        MAIL_HANDSHAKE_TIMEOUT=7,
        MAIL_PRELOGIN_SECONDS=91,
        MAIL_PRELOGIN_COMMANDS=13,
        MAIL_PLAINTEXT_FROM_LOOPBACK=False,
        MAIL_TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.1",
        MAIL_UPSTREAM_POOL=3,
        MAIL_EVENT_LOOP=" AsyncIO ",
        **listen,
    )
    settings = proxy_settings(app)
    assert settings.listeners == {name: listen[key] for name, key in LISTEN_SETTINGS.items()}
    assert (settings.tls_cert, settings.tls_key) == ("/etc/ssl/cert.pem", "/etc/ssl/key.pem")
    assert settings.tls_key_group_readable is True  # a configured key, e.g. certbot's
    assert settings.upstream_ca_file == "/etc/ssl/ca.pem"
    assert settings.hostname == "mail.example.test"
    assert (settings.max_connections, settings.max_connections_per_ip) == (101, 11)
    assert (settings.idle_timeout_prelogin, settings.idle_timeout) == (21, 1201)
    assert (settings.handshake_timeout, settings.prelogin_lifetime) == (7, 91)
    assert settings.max_prelogin_commands == 13
    assert settings.allow_plaintext_from_loopback is False
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1/32")
    assert settings.upstream_pool_size == 3
    assert settings.event_loop == "asyncio"
    assert settings.reauth_message == (
        "The mail provider refused this account's token: re-authorize it on "
        "https://mail.example.test/"
    )


def test_without_a_ca_file_the_proxy_trusts_the_system_cas(instance: Path) -> None:
    settings = proxy_settings(make_app(instance, UPSTREAM_CA_FILE="", MAIL_TRUSTED_PROXIES=""))
    assert settings.upstream_ca_file is None
    assert settings.allow_plaintext_from_loopback is True  # the default
    assert settings.trusted_proxies == ()


def test_an_unknown_event_loop_or_trusted_proxy_stops_the_start_with_its_setting_named() -> None:
    assert event_loop("uvloop") == "uvloop"
    with pytest.raises(ValueError) as unknown:
        event_loop("tokio")
    assert str(unknown.value) == "MAIL_EVENT_LOOP must be one of uvloop, asyncio, not 'tokio'"
    with pytest.raises(ValueError) as bad:
        trusted_proxies("10.0.0.0/8 proxy.example")
    assert str(bad.value) == "MAIL_TRUSTED_PROXIES: not an IP address or network: 'proxy.example'"


def test_an_smtp_policy_refusal_is_recorded_audited_and_said_in_the_servers_words(
    app, account
) -> None:
    said = (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. " + "x" * 200
    )
    backend = AppBackend(app.config)
    with pytest.raises(ProxyAuthError) as refused:  # SMTP AUTH by choice: no Graph switch
        backend.smtp_auth_refused(account.id, "mail server: " + said)
    backend.flush()

    assert refused.value.kind == "refused"
    stored = Account.get_by_id(account.id)
    assert stored.smtp_auth_refused_at is not None
    assert stored.smtp_auth_refused_detail == "mail server: " + said
    recorded = mailrefusals.states(stored)
    assert list(recorded) == ["smtp"] and recorded["smtp"].said == said[:500]
    event = AuditEvent.get(AuditEvent.action == "mail.smtp_auth_refused")
    assert (event.actor_email, event.target) == ("o@example.org", "box@example.test")
    assert event.detail == ("mail server: " + said)[:200]
    backend.close()


def test_mail_for_a_mailbox_no_longer_linked_is_refused_for_later(app, account) -> None:
    backend = AppBackend(app.config)
    with pytest.raises(DeliveryRefused) as refused:
        backend.deliver(account.id + 1, "box@example.test", ["to@example.test"], b"Hi\r\n")
    said = refused.value
    assert (said.code, said.status, said.text) == (
        451,
        "4.7.0",
        "This mailbox is not linked any more",
    )
    backend.close()


SMTP_OFF = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
)


def test_a_mail_server_refusal_is_explained_for_the_mailbox_it_names_and_logged(
    app, account, caplog
) -> None:
    second = Account.create(
        owner=account.owner,
        address="second@example.test",
        provider="other",
        client=account.client,
        status="active",
    )
    backend = AppBackend(app.config)
    caplog.set_level(logging.WARNING, logger="auth_email.mail")

    said = backend.token_rejected(second.id, "smtp", SMTP_OFF)
    assert said is not None and "-Identity second@example.test " in said
    assert f"account {second.id}: smtp refused by the mail server: {SMTP_OFF}" in caplog.messages
    with pytest.raises(ProxyAuthError) as again:  # a policy: recorded, no refresh worth trying
        backend.upstream_refused(second.id, "smtp", SMTP_OFF)
    assert again.value.kind == "refused" and "-Identity second@example.test " in str(again.value)
    assert list(mailrefusals.states(Account.get_by_id(second.id))) == ["smtp"]
    assert mailrefusals.states(Account.get_by_id(account.id)) == {}
    backend.close()


def test_a_refusal_for_a_mailbox_no_longer_linked_says_so(app, account) -> None:
    backend = AppBackend(app.config)
    assert backend.token_rejected(account.id + 1, "imap", "NO [AUTHENTICATIONFAILED]") is None
    with pytest.raises(ProxyAuthError) as gone:
        backend.upstream_refused(account.id + 1, "imap", "NO [AUTHENTICATIONFAILED]")
    assert gone.value.kind == "disabled"
    assert str(gone.value) == "This mailbox is not linked any more."
    backend.close()


def test_a_refusal_names_the_apps_permissions_only_for_an_app_token(app, account) -> None:
    said = "NO [AUTHENTICATIONFAILED] AUTHENTICATE failed."
    backend = AppBackend(app.config)
    for_a_user = backend.token_rejected(account.id, "imap", said)
    OAuthClient.update(grant="client_credentials").where(
        OAuthClient.id == account.client_id
    ).execute()
    for_the_app = backend.token_rejected(account.id, "imap", said)
    assert for_a_user is not None and "IMAP.AccessAsApp" not in for_a_user
    assert for_the_app is not None and "IMAP.AccessAsApp" in for_the_app
    backend.close()


def test_open_sessions_are_counted_per_mailbox_and_never_below_zero(app, account) -> None:
    other = Account.create(owner=account.owner, address="other@example.test", provider="other")
    backend = AppBackend(app.config)
    assert backend.sessions_open(account.id) == 0
    backend.session_closed(other.id, "imap", 0, 0)  # a close the count never saw
    assert backend.sessions_open(other.id) == 0
    backend.session_opened(account.id, "imap", "192.0.2.1")
    backend.session_opened(account.id, "pop3", "192.0.2.1")
    assert backend.sessions_open(account.id) == 2
    assert backend.sessions_open(other.id) == 0
    backend.session_closed(account.id, "imap", 10, 20)
    assert backend.sessions_open(account.id) == 1
    for _ in range(2):
        backend.session_closed(account.id, "imap", 10, 20)
    assert backend.sessions_open(account.id) == 0
    backend.flush()
    used = Account.get_by_id(account.id)
    assert (used.last_used_ip, used.bytes_relayed) == ("192.0.2.1", 90)
    assert used.last_used_at is not None
    untouched = Account.get_by_id(other.id)
    assert (untouched.last_used_ip, untouched.bytes_relayed) == ("", 0)
    backend.close()


def test_a_token_endpoint_out_of_reach_is_a_temporary_refusal_with_its_reason(app, account) -> None:
    expired = utcnow() - dt.timedelta(hours=1)
    Account.update(token_expires_at=expired).where(Account.id == account.id).execute()
    with pytest.raises(ProxyAuthError) as refused:  # t.example never resolves (RFC 2606)
        AppBackend(app.config).access_token(account.id)
    assert refused.value.kind == "unavailable"
    assert str(refused.value).startswith("the token endpoint is unreachable: ")


# ---- logins, in-process: the real backend and database, no proxy --------------------------------


@pytest.fixture
def mailbox(app):
    """An active box@example.test (IMAP and SMTP, no POP3), its password ``MAIL_PASSWORD``."""
    owner = User.create(email="o@example.org", password_hash="x")
    client = make_client(
        owner, sasl_mechanism="OAUTHBEARER", smtp_host="smtp.example.com", smtp_port=587
    )
    account = make_account(owner, "box@example.test", client, status="active")
    linking.add_password(owner, account, "Laptop", MAIL_PASSWORD)
    return account


@pytest.fixture
def backend(app):
    backend = AppBackend({**app.config, "PUBLIC_URL": "https://auth.example.test"})
    yield backend
    backend.close()


def events(action: str) -> list[tuple[str, str, str, str]]:
    query = AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id)
    return [(e.actor_email, e.ip, e.target, e.detail) for e in query]


def test_a_mail_login_is_granted_its_mailbox_server_mechanism_and_token(mailbox, backend) -> None:
    grant = backend.authenticate("imap", "  Box@Example.TEST ", MAIL_PASSWORD, "192.0.2.7")
    backend.flush()

    assert (grant.account_id, grant.address) == (mailbox.id, "box@example.test")
    assert (grant.upstream.host, grant.upstream.port) == ("imap.example.com", 993)
    assert grant.mechanism == "OAUTHBEARER"
    assert grant.token == "access-secret" and grant.deliver is False
    assert events("mail.login") == [("o@example.org", "192.0.2.7", "box@example.test", "imap")]
    used = MailPassword.get(MailPassword.account == mailbox.id)
    assert used.last_used_ip == "192.0.2.7" and used.last_used_at is not None


def test_a_wrong_mail_password_is_refused_audited_and_then_throttled(mailbox, app) -> None:
    backend = AppBackend({**app.config, "LOGIN_FAILURE_LIMIT": 2, "LOGIN_BLOCK_SECONDS": 600})
    for _ in range(2):
        with pytest.raises(ProxyAuthError) as wrong:
            backend.authenticate("pop3", "BOX@example.test", "not-it", "192.0.2.8")
        assert (wrong.value.kind, str(wrong.value)) == ("credentials", "Wrong address or password")
    with pytest.raises(ProxyAuthError) as blocked:  # the right password, too late
        backend.authenticate("pop3", "box@example.test", MAIL_PASSWORD, "192.0.2.8")
    backend.flush()
    backend.close()

    assert blocked.value.kind == "throttled"
    assert blocked.value.retry_after is not None and 590 <= blocked.value.retry_after <= 600
    assert str(blocked.value) == "Too many failed logins; try again in 10 minutes"
    assert events("mail.login_failed") == [("", "192.0.2.8", "box@example.test", "pop3")] * 2
    assert events("mail.login") == []


def test_a_mailbox_without_a_server_for_the_protocol_is_refused_saying_so(mailbox, backend) -> None:
    with pytest.raises(ProxyAuthError) as refused:
        backend.authenticate("pop3", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert refused.value.kind == "refused"
    assert str(refused.value) == "This mailbox's OAuth client names no POP3 server"


@pytest.mark.parametrize("what", ["account", "owner"])
def test_a_disabled_mailbox_or_owner_is_refused_with_the_right_password(
    mailbox, backend, what
) -> None:
    if what == "account":
        Account.update(status="disabled").where(Account.id == mailbox.id).execute()
    else:
        User.update(is_enabled=False).where(User.id == mailbox.owner_id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert refused.value.kind == "disabled"
    assert str(refused.value) == "This account is disabled in Auth-Email"


@pytest.mark.parametrize("why", ["needs_reauth", "client deleted"])
def test_a_mailbox_needing_authorization_names_its_page_and_is_audited(
    mailbox, backend, why
) -> None:
    if why == "needs_reauth":
        Account.update(status="needs_reauth").where(Account.id == mailbox.id).execute()
    else:
        Account.update(client=None).where(Account.id == mailbox.id).execute()
    with pytest.raises(ProxyAuthError) as refused:
        backend.authenticate("smtp", "box@example.test", MAIL_PASSWORD, "192.0.2.9")
    backend.flush()
    assert refused.value.kind == "reauth"
    assert str(refused.value) == (
        f"Re-authorize this account in Auth-Email: https://auth.example.test/accounts/{mailbox.id}"
    )
    assert events("mail.login_needs_reauth") == [
        ("o@example.org", "192.0.2.9", "box@example.test", "smtp")
    ]
    assert events("mail.login") == []


def test_a_shared_mailbox_logs_in_to_smtp_as_its_delegate_and_to_imap_as_itself(
    mailbox, backend
) -> None:
    Account.update(signed_in_as="delegate@example.test").where(Account.id == mailbox.id).execute()
    smtp = backend.authenticate("smtp", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    imap = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert smtp.address == "delegate@example.test" and smtp.upstream.host == "smtp.example.com"
    assert imap.address == "box@example.test"


def test_a_token_needing_renewal_is_left_to_access_token(mailbox, backend) -> None:
    expired = utcnow() - dt.timedelta(minutes=1)
    Account.update(token_expires_at=expired).where(Account.id == mailbox.id).execute()
    grant = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert grant.token == ""


def test_a_cached_login_is_checked_against_the_database_each_time(mailbox, backend) -> None:
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert backend.cache.get("box@example.test", MAIL_PASSWORD) is not None
    again = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert again.account_id == mailbox.id
    MailPassword.delete().where(MailPassword.account == mailbox.id).execute()  # revoked
    with pytest.raises(ProxyAuthError) as refused:
        backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert refused.value.kind == "credentials"


def test_a_passwords_use_is_written_when_the_ip_changes_not_on_every_poll(mailbox, backend) -> None:
    def last_use() -> tuple[str, Any]:
        row = MailPassword.get(MailPassword.account == mailbox.id)
        return row.last_used_ip, row.last_used_at

    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.flush()
    first = last_use()
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.flush()
    assert last_use() == first  # the same device polling: no write
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "198.51.100.3")
    backend.flush()
    assert last_use()[0] == "198.51.100.3"


def test_a_login_that_works_clears_that_protocols_recorded_refusal_only(mailbox, backend) -> None:
    said = "NO [AUTHENTICATIONFAILED] AUTHENTICATE failed."
    for protocol in ("imap", "smtp"):
        refusal = mailrefusals.explain(protocol, said, mailbox.address)
        mailrefusals.record(mailbox.id, refusal)  # e.g. by the web's Test sign-in
    grant = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.session_opened(grant.account_id, "imap", "192.0.2.7")
    backend.flush()
    assert list(mailrefusals.states(Account.get_by_id(mailbox.id))) == ["smtp"]


def test_a_failing_bookkeeping_write_loses_only_itself(mailbox, backend, caplog) -> None:
    def fails() -> None:
        raise RuntimeError("disk full")

    caplog.set_level(logging.ERROR, logger="auth_email.mail")
    backend.later(fails)
    backend.later(audit.record, "mail.login", target="after@example.test")
    backend.flush()
    assert "bookkeeping write failed" in caplog.messages
    assert events("mail.login") == [("", "", "after@example.test", "")]


def test_a_failing_bookkeeping_write_alone_is_logged_and_the_next_batch_goes_on(
    mailbox, backend, caplog
) -> None:
    def fails() -> None:
        raise RuntimeError("disk full")

    caplog.set_level(logging.ERROR, logger="auth_email.mail")
    backend.later(fails)
    backend.flush()
    assert caplog.messages == ["bookkeeping write failed"]
    backend.later(audit.record, "mail.login", target="next@example.test")
    backend.flush()
    assert events("mail.login") == [("", "", "next@example.test", "")]


def test_a_batch_whose_database_cannot_be_opened_is_logged_and_the_next_batch_goes_on(
    mailbox, backend, caplog, monkeypatch
) -> None:
    """The database failing before any write (stood in for by a context that raises, as SQLite
    does when its file cannot be opened) loses that batch only, with one log line."""
    caplog.set_level(logging.ERROR, logger="auth_email.mail")
    working = backend._context

    @contextlib.contextmanager
    def unopenable() -> Iterator[None]:
        raise sqlite3.OperationalError("unable to open database file")
        yield  # pragma: no cover

    monkeypatch.setattr(backend, "_context", unopenable)
    backend.later(audit.record, "mail.login", target="lost@example.test")
    backend.flush()
    assert caplog.messages == ["bookkeeping writes failed"]
    assert "unable to open database file" in caplog.text  # with its traceback
    monkeypatch.setattr(backend, "_context", working)
    backend.later(audit.record, "mail.login", target="next@example.test")
    backend.flush()
    assert events("mail.login") == [("", "", "next@example.test", "")]


def test_a_protocol_that_refused_this_very_token_is_not_worth_another_refresh(app, account) -> None:
    said = "NO [AUTHENTICATIONFAILED] AUTHENTICATE failed."
    backend = AppBackend(app.config)
    backend.upstream_refused(account.id, "imap", said)  # no refusal: worth one refresh
    assert backend.token_rejected(account.id, "imap", said) is not None  # refused again
    with pytest.raises(ProxyAuthError) as again:
        backend.upstream_refused(account.id, "imap", said)
    assert again.value.kind == "refused"
    backend.upstream_refused(account.id, "pop3", said)  # not this protocol: worth a refresh
    Account.update(token_version=Account.token_version + 1).where(
        Account.id == account.id
    ).execute()  # a token renewed since
    backend.upstream_refused(account.id, "imap", said)
    backend.close()


def test_a_mailbox_needing_reauthorization_names_its_page_and_the_reason(app, account) -> None:
    Account.update(status="needs_reauth", status_detail="The grant was revoked.").where(
        Account.id == account.id
    ).execute()
    backend = AppBackend({**app.config, "PUBLIC_URL": "https://auth.example.test"})
    with pytest.raises(ProxyAuthError) as refused:
        backend.access_token(account.id)
    assert refused.value.kind == "reauth"
    assert str(refused.value) == (
        f"Re-authorize this account in Auth-Email at https://auth.example.test/accounts/"
        f"{account.id} : The grant was revoked."
    )


def test_a_valid_token_is_handed_out_and_renewed_only_when_forced(app, account) -> None:
    backend = AppBackend(app.config)
    assert backend.access_token(account.id) == "a-token"
    with pytest.raises(ProxyAuthError) as renewing:  # t.example never resolves (RFC 2606)
        backend.access_token(account.id, force_refresh=True)
    assert renewing.value.kind == "unavailable"


def test_a_proxy_service_serves_its_own_app_whatever_app_is_current(app, tmp_path) -> None:
    other = make_app(tmp_path / "other", **EVERY_LISTENER_ON_A_FREE_PORT)
    with app.app_context():
        service = MailProxyService(other)
        try:
            assert service.app is other and service.backend.app is other
            assert running(other) is service
            service.start()
            named = listeners.addresses(other)
        finally:
            service.stop()
    assert set(named) == set(LISTENER_NAMES)
    assert not any(value.endswith(":0") for value in named.values()), named


def test_uvloop_not_installed_stops_the_start_only_when_it_is_chosen(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # how Python marks a module not importable
    assert event_loop("asyncio") == "asyncio"
    with pytest.raises(ValueError) as missing:
        event_loop("uvloop")
    assert str(missing.value) == (
        "MAIL_EVENT_LOOP is uvloop, which is not installed: install it or use asyncio"
    )


def test_a_mail_server_the_host_policy_no_longer_allows_is_refused(mailbox, app) -> None:
    """The client was saved under an older, wider CUSTOM_CLIENT_HOSTS."""
    backend = AppBackend({**app.config, "CUSTOM_CLIENT_HOSTS": "*.example.org"})
    with pytest.raises(ProxyAuthError) as refused:
        backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.close()
    assert refused.value.kind == "disabled"
    assert str(refused.value).startswith(
        "This account's mail server is refused: imap.example.com is not"
    ), refused.value


def test_a_passwords_use_from_the_same_ip_is_written_again_after_a_minute(mailbox, backend) -> None:
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.flush()
    (password_id,) = backend._last_use
    MailPassword.update(last_used_ip="").where(MailPassword.id == password_id).execute()
    backend._last_use[password_id] = ("192.0.2.7", time.monotonic() - 60.5)  # a minute ago
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.flush()
    assert MailPassword.get_by_id(password_id).last_used_ip == "192.0.2.7"


def test_a_blocked_address_is_refused_even_with_a_cached_password(mailbox, app) -> None:
    backend = AppBackend({**app.config, "LOGIN_FAILURE_LIMIT": 2, "LOGIN_BLOCK_SECONDS": 600})
    backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.8")  # now cached
    for _ in range(2):
        with pytest.raises(ProxyAuthError):
            backend.authenticate("imap", "box@example.test", "not-it", "192.0.2.8")
    with pytest.raises(ProxyAuthError) as blocked:
        backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.8")
    backend.close()
    assert blocked.value.kind == "throttled"


def test_closing_the_backend_waits_for_the_bookkeeping_writes_queued(mailbox, app) -> None:
    def slow_write() -> None:
        time.sleep(0.5)
        audit.record("mail.login", target="late@example.test")

    backend = AppBackend(app.config)
    backend.later(slow_write)
    backend.close()
    assert events("mail.login") == [("", "", "late@example.test", "")]


def test_a_login_reads_its_own_owner_and_client_among_several(mailbox, backend) -> None:
    someone = User.create(email="first@example.org", password_hash="x", is_enabled=False)
    make_client(someone, name="Someone's app", imap_host="imap.someone.example")
    owner = User.create(email="second@example.org", password_hash="x")
    client = make_client(owner, name="Own app", imap_host="imap.own.example")
    account = make_account(owner, "own@example.test", client, status="active")
    linking.add_password(owner, account, "Laptop", "own-password-1")
    User.update(is_enabled=False).where(User.id == mailbox.owner_id).execute()

    grant = backend.authenticate("imap", "own@example.test", "own-password-1", "192.0.2.7")
    backend.flush()
    assert grant.upstream.host == "imap.own.example"
    assert events("mail.login") == [("second@example.org", "192.0.2.7", "own@example.test", "imap")]


def test_a_presets_mail_server_is_allowed_whatever_the_custom_host_policy(mailbox, app) -> None:
    OAuthClient.update(provider="microsoft365").where(OAuthClient.id == mailbox.client_id).execute()
    backend = AppBackend({**app.config, "CUSTOM_CLIENT_HOSTS": "*.example.org"})
    grant = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    backend.close()
    assert grant.upstream.host == "outlook.office365.com"


def test_bookkeeping_writes_run_one_at_a_time_in_order_in_their_named_thread(
    mailbox, backend
) -> None:
    done: list[tuple[str, str]] = []
    first_started = threading.Event()

    def write(name: str, pause: float) -> None:
        first_started.set()
        time.sleep(pause)
        done.append((name, threading.current_thread().name))

    backend.later(write, "first", 0.3)
    assert first_started.wait(10)  # the first drain took its batch; the next one queues
    backend.later(write, "second", 0.0)
    backend.flush()
    assert [name for name, _ in done] == ["first", "second"]
    assert all(thread.startswith("mail-bookkeeping") for _, thread in done), done


def test_an_smtp_policy_refusal_in_automatic_mode_switches_the_mailbox_to_graph(
    mailbox, backend
) -> None:
    OAuthClient.update(smtp_delivery="auto").where(OAuthClient.id == mailbox.client_id).execute()
    switched = backend.smtp_auth_refused(mailbox.id, "mail server: " + SMTP_OFF)
    backend.flush()

    assert switched is not None
    assert (switched.account_id, switched.address) == (mailbox.id, "box@example.test")
    assert (switched.upstream.host, switched.upstream.port) == ("smtp.example.com", 587)
    assert switched.mechanism == "OAUTHBEARER"
    assert switched.deliver is True and switched.max_message == graphsend.MAX_MESSAGE
    event = AuditEvent.get(AuditEvent.action == "mail.smtp_auth_refused")
    assert event.detail == "switched to Microsoft Graph"
    later = backend.authenticate("smtp", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert later.deliver is True  # from now on every SMTP login delivers through Graph
    imap = backend.authenticate("imap", "box@example.test", MAIL_PASSWORD, "192.0.2.7")
    assert imap.deliver is False


def test_an_accounts_last_use_is_written_when_its_ip_changes_or_a_minute_passed(app, account):
    backend = AppBackend(app.config, app)

    def last_use() -> tuple[str, object]:
        backend.flush()
        with app.app_context():
            row = Account.get_by_id(account.id)
        return row.last_used_ip, row.last_used_at

    try:
        backend.session_opened(account.id, "imap", "192.0.2.1")
        ip, first = last_use()
        assert ip == "192.0.2.1" and first is not None
        backend.session_opened(account.id, "imap", "192.0.2.1")  # a device polling again
        assert last_use() == ("192.0.2.1", first)
        backend.session_opened(account.id, "pop3", "192.0.2.2")  # another place: at once
        ip, second = last_use()
        assert ip == "192.0.2.2" and second > first
        ip, at = backend._last_seen[account.id]
        backend._last_seen[account.id] = (ip, at - LAST_USE_EVERY)  # a minute later
        backend.session_opened(account.id, "imap", "192.0.2.2")
        assert last_use()[1] > second
    finally:
        backend.close()


def test_bookkeeping_writes_queued_together_share_one_transaction(app, account):
    """A login's writes (audit row, last use) come milliseconds apart: one commit for them."""
    from store.db import database

    backend = AppBackend(app.config, app)
    seen: list[int] = []

    def note() -> None:
        seen.append(id(database.top_transaction()))

    try:
        backend.later(note)
        backend.later(_account_used, account.id, "192.0.2.1", utcnow())
        backend.later(note)  # the second write after the first has been handed over
        backend.flush()
    finally:
        backend.close()
    assert len(seen) == 2 and seen[0] == seen[1]
