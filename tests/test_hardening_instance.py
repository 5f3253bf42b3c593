"""Issue 12, the instance: a wrong vault.key refused at start, where clients may point the server,
plain-text mail logins from loopback."""

from __future__ import annotations

import html
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import config
from mailproxy import ProxyAuthError
from models import User
from oauth import errors as oauth_errors
from tests.helpers.accounts import MAIL_PASSWORD
from tests.helpers.app import ADMIN_EMAIL, make_app
from tests.helpers.web import AuthActions, post_form

# ---- a wrong vault.key is refused at start -----------------------------------------------------


def _swap_key_bytes(instance: Path) -> None:
    """vault.key with the same key id and other key bytes (a copy from another instance)."""
    from store.vault import Keyring, write_private

    ring = Keyring.loads((instance / "vault.key").read_text())
    ring.keys[ring.current] = os.urandom(32)
    write_private(instance / "vault.key", ring.dump())


def test_a_wrong_key_with_the_right_id_is_refused_at_start(instance: Path) -> None:
    from models import Meta
    from store.vault import KeyFileError, Keyring

    app = make_app(instance)
    key_id = Keyring.loads((instance / "vault.key").read_text()).current
    with app.app_context():
        assert Meta.get_or_none(Meta.key == f"vault_check:{key_id}") is not None
    _swap_key_bytes(instance)
    with pytest.raises(KeyFileError, match=f"vault key {key_id} .* does not decrypt"):
        make_app(instance)


def test_an_instance_from_before_check_values_gets_one_only_with_the_right_key(
    instance: Path,
) -> None:
    from models import Meta, OAuthClient
    from store.vault import KeyFileError
    from tests.helpers.app import stored_client

    app = make_app(instance)
    with app.app_context():
        owner = User.create(email="o@example.org", password_hash="x")
        stored_client(owner, "c", "client-secret-value")
        Meta.delete().where(Meta.key.startswith("vault_check:")).execute()
    right_key = (instance / "vault.key").read_text()
    _swap_key_bytes(instance)
    with pytest.raises(KeyFileError, match="does not decrypt"):
        make_app(instance)
    (instance / "vault.key").write_text(right_key)
    again = make_app(instance)
    with again.app_context():
        assert Meta.select().where(Meta.key.startswith("vault_check:")).count() == 1
        assert OAuthClient.get().client_secret == "client-secret-value"


def test_serve_refuses_to_start_with_a_wrong_key(instance: Path) -> None:
    make_app(instance)
    _swap_key_bytes(instance)
    env = {**os.environ, "AUTH_EMAIL_INSTANCE": str(instance), "AUTH_EMAIL_BIND": "127.0.0.1:0"}
    done = subprocess.run(
        [sys.executable, "serve.py"],
        env=env,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot start" in done.stderr and "does not decrypt" in done.stderr


def test_rotating_the_key_writes_the_new_keys_check_value(app: Flask, runner: Any) -> None:
    from models import Meta
    from store.vault import Keyring

    result = runner.invoke(args=["rotate-key"])
    assert result.exit_code == 0, result.output
    current = Keyring.loads((Path(app.instance_path) / "vault.key").read_text()).current
    with app.app_context():
        assert Meta.get_or_none(Meta.key == f"vault_check:{current}") is not None
    make_app(Path(app.instance_path))  # and it starts with it


# ---- where clients may point this server -------------------------------------------------------

PRESET_HOSTS = frozenset({"login.microsoftonline.com", "outlook.office365.com"})


@pytest.mark.parametrize(
    ("hosts", "loopback", "host", "allowed"),
    [
        ("*", False, "login.example.com", True),
        ("*", False, "8.8.8.8", True),
        ("*", False, "127.0.0.1", False),
        ("*", False, "localhost", False),
        ("*", False, "[::1]", False),
        ("*", False, "app.localhost", False),
        ("*", False, "10.0.0.5", False),
        ("*", False, "169.254.169.254", False),
        ("*", False, "192.168.1.1", False),
        ("*", True, "127.0.0.1", True),
        ("*", True, "localhost", True),
        ("*.corp.example", False, "mail.corp.example", True),
        ("*.corp.example", False, "corp.example", True),
        ("*.corp.example", False, "evilcorp.example", False),
        ("*.corp.example", False, "login.example.com", False),
        ("*.corp.example, 10.0.0.5", False, "10.0.0.5", True),
        ("imap.corp.example", False, "IMAP.corp.example.", True),
        ("*.corp.example", False, "login.microsoftonline.com", True),  # a built-in provider's
        ("", False, "outlook.office365.com", True),
        ("", False, "login.example.com", False),
    ],
)
def test_the_host_policy(hosts: str, loopback: bool, host: str, allowed: bool) -> None:
    policy = config.HostPolicy.from_config(
        {"CUSTOM_CLIENT_HOSTS": hosts, "CUSTOM_CLIENT_LOOPBACK": loopback}, PRESET_HOSTS
    )
    assert (policy.refusal(host) is None) is allowed


def test_the_built_in_providers_hosts_are_known() -> None:
    from oauth import providers

    assert {"login.microsoftonline.com", "outlook.office365.com", "imap.gmail.com"} <= (
        providers.preset_hosts()
    )


@pytest.fixture
def strict_app(tmp_path: Path) -> Iterator[Flask]:
    """An instance as deployed: no loopback for clients, and only hosts under corp.example."""
    app = make_app(
        tmp_path / "instance", CUSTOM_CLIENT_LOOPBACK=False, CUSTOM_CLIENT_HOSTS="*.corp.example"
    )
    yield app
    make_app(tmp_path / "other")  # the next test's grants settings again (tests share a process)


CUSTOM_CLIENT = {
    "name": "Own IdP",
    "provider": "other",
    "grant": "authorization_code",
    "tenant": "",
    "authorize_url": "https://login.corp.example/authorize",
    "token_url": "https://login.corp.example/token",
    "device_url": "",
    "scope": "mail offline_access",
    "client_id": "own-client",
    "client_secret": "own-secret-value",
    "imap_host": "imap.corp.example",
    "imap_port": "993",
    "imap_security": "tls",
    "pop3_host": "pop.corp.example",
    "pop3_port": "995",
    "pop3_security": "tls",
    "smtp_host": "smtp.corp.example",
    "smtp_port": "587",
    "smtp_security": "starttls",
    "sasl_mechanism": "XOAUTH2",
    "revocation_url": "",
    "submit": "Save client",
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("token_url", "https://idp.elsewhere.example/token", "not among the hosts"),
        ("authorize_url", "https://127.0.0.1/authorize", "loopback host"),
        ("revocation_url", "https://10.1.2.3/revoke", "not an address this server allows"),
        ("imap_host", "127.0.0.1", "loopback host"),
        ("pop3_host", "localhost", "loopback host"),
        ("smtp_host", "smtp.elsewhere.example", "not among the hosts"),
        ("token_url", "http://127.0.0.1:9000/token", "loopback host"),
    ],
)
def test_the_client_form_keeps_to_the_allowed_hosts(
    strict_app: Flask, field: str, value: str, message: str
) -> None:
    from models import OAuthClient

    browser = strict_app.test_client()
    AuthActions(strict_app, browser).setup_admin()
    good = post_form(browser, "/settings/clients/new", {**CUSTOM_CLIENT, "name": "good"})
    assert good.status_code == 302, good.get_data(as_text=True)
    answer = post_form(browser, "/settings/clients/new", {**CUSTOM_CLIENT, field: value})
    assert answer.status_code == 400
    assert message in html.unescape(answer.get_data(as_text=True))
    with strict_app.app_context():
        assert OAuthClient.select().count() == 1


def test_hosts_are_checked_again_at_use(strict_app: Flask) -> None:
    """A client saved under a wider setting: tokens and mail logins refuse its hosts."""
    from mailboxes import linking, mailbackend
    from oauth import grants
    from tests.helpers.accounts import make_account, make_client

    AuthActions(strict_app, strict_app.test_client()).setup_admin()
    with strict_app.app_context():
        with pytest.raises(oauth_errors.GrantError, match="loopback host"):
            grants.check_endpoint("http://127.0.0.1:9/token")
        with pytest.raises(oauth_errors.GrantError, match="not among the hosts"):
            grants.check_endpoint("https://login.example.com/token")
        grants.check_endpoint("https://login.corp.example/token")
        owner = User.by_email(ADMIN_EMAIL)
        assert owner is not None
        client = make_client(owner, imap_host="127.0.0.1", imap_port=143, imap_security="plain")
        account = make_account(owner, "box@corp.example", client, status="active")
        linking.add_password(owner, account, "Laptop", MAIL_PASSWORD)
        backend = mailbackend.AppBackend(strict_app.config)
        with pytest.raises(ProxyAuthError, match="mail server is refused"):
            backend.authenticate("imap", "box@corp.example", MAIL_PASSWORD, "192.0.2.1")
        backend.close()


def test_plain_mail_login_from_loopback_can_be_turned_off(tmp_path: Path) -> None:
    import imaplib

    from mailboxes import mailbackend

    app = make_app(
        tmp_path / "instance",
        MAIL_PLAINTEXT_FROM_LOOPBACK=False,
        **{f"{n.upper()}_LISTEN": "" for n in ("imaps", "pop3", "pop3s", "submission", "smtps")},
        IMAP_LISTEN="127.0.0.1:0",
    )
    assert mailbackend.proxy_settings(app).allow_plaintext_from_loopback is False
    service = mailbackend.MailProxyService(app)
    service.start()
    try:
        conn = imaplib.IMAP4("127.0.0.1", service.controller.listening["imap"][1], timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="(?i)tls"):
            conn.login("someone@example.test", "a-password")
        conn.shutdown()
    finally:
        service.stop()
    on = make_app(tmp_path / "default")
    assert mailbackend.proxy_settings(on).allow_plaintext_from_loopback is True
