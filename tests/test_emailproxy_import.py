"""``flask import-emailproxy``: an email-oauth2-proxy configuration as clients and accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import Account, AuditEvent, OAuthClient, User
from store.db import database

M365_SECRET = "m365-Secret~value-9f2"
GOOGLE_SECRET = "GOCSPX-google-secret-77"
OTHER_SECRET = "custom-provider-secret-3"
SECRETS = (M365_SECRET, GOOGLE_SECRET, OTHER_SECRET)

CONFIG = f"""
[Email OAuth 2.0 Proxy configuration file]
documentation = Some words
\tover two lines.

[IMAP-1993]
local_address = 0.0.0.0
server_address = imap.example.net
server_port = 993

[SMTP-1587]
server_address = smtp.example.net
server_port = 587
starttls = True

[Alice@Team.example]
permission_url = https://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/authorize
token_url = https://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All
\thttps://outlook.office365.com/SMTP.Send offline_access
redirect_uri = http://localhost
client_id = 11111111-2222-3333-4444-555555555555
client_secret = {M365_SECRET}
token_salt = c2FsdA==
token_iterations = 1200000
access_token = gAAAAABencrypted-by-a-mail-password
refresh_token = gAAAAABencrypted-too
access_token_expiry = 1760000000

[bob@team.example]
permission_url = https://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/authorize
token_url = https://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All  https://outlook.office365.com/SMTP.Send
  offline_access
redirect_uri = http://localhost
client_id = 11111111-2222-3333-4444-555555555555
client_secret = {M365_SECRET}

[carol@gmail.com]
permission_url = https://accounts.google.com/o/oauth2/auth
token_url = https://oauth2.googleapis.com/token
oauth2_scope = https://mail.google.com/
redirect_uri = http://localhost
client_id = 9999-abc.apps.googleusercontent.com
client_secret = {GOOGLE_SECRET}

[dave@example.net]
permission_url = https://id.example.net/authorize
token_url = https://id.example.net/token
oauth2_scope = mail
client_id = custom-client
client_secret = {OTHER_SECRET}

[@catchall.example]
token_url = https://id.example.net/token
oauth2_scope = mail
client_id = custom-client

[emailproxy]
delete_account_token_on_password_error = False
"""


@pytest.fixture
def owner(app, auth) -> User:
    auth.setup_admin()
    return auth.create_user("owner@example.org", can_custom_clients=True)


def run_import(runner, tmp_path: Path, text: str, user: str = "owner@example.org"):
    path = tmp_path / "emailproxy.config"
    path.write_text(text)
    return runner.invoke(args=["import-emailproxy", str(path), "--user", user])


def assert_no_secret(output: str) -> None:
    for secret in (*SECRETS, "gAAAAAB", "pw-of-the-user"):
        assert secret not in output


def test_import_creates_clients_with_vaulted_secrets_and_accounts(app, runner, owner, tmp_path):
    result = run_import(runner, tmp_path, CONFIG)
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    assert "Accounts created: alice@team.example, bob@team.example" in result.output
    assert "cached tokens not reused" in result.output
    assert "[@catchall.example]: catch-all accounts are not imported" in result.output
    assert "[emailproxy] delete_account_token_on_password_error" in result.output
    assert "http://127.0.0.1:8080/authorize" in result.output

    with app.app_context(), database.connection_context():
        clients = {c.provider: c for c in OAuthClient.select().where(OAuthClient.owner == owner)}
        assert set(clients) == {"microsoft365", "google", "other"}  # alice and bob share one
        m365 = clients["microsoft365"]
        assert m365.tenant == "0f1e2d3c"
        assert m365.client_secret == M365_SECRET
        assert m365.scope.split()[-1] == "offline_access"
        assert clients["google"].client_secret == GOOGLE_SECRET
        other = clients["other"]
        assert (other.imap_host, other.imap_port, other.imap_security) == (
            "imap.example.net",
            993,
            "tls",
        )
        assert (other.smtp_host, other.smtp_port, other.smtp_security) == (
            "smtp.example.net",
            587,
            "starttls",
        )
        stored = " ".join(
            str(row)
            for row in database.execute_sql(
                f"SELECT * FROM {OAuthClient._meta.table_name}"
            ).fetchall()
        )
        assert_no_secret(stored)
        accounts = {a.address: a for a in Account.select()}
        assert set(accounts) == {
            "alice@team.example",
            "bob@team.example",
            "carol@gmail.com",
            "dave@example.net",
        }
        assert {a.status for a in accounts.values()} == {"needs_reauth"}
        assert accounts["alice@team.example"].client_id == m365.id
        assert accounts["alice@team.example"].refresh_token is None
        assert AuditEvent.get(AuditEvent.action == "import.emailproxy").actor_id == owner.id


def test_a_second_import_changes_nothing(app, runner, owner, tmp_path):
    assert run_import(runner, tmp_path, CONFIG).exit_code == 0
    again = run_import(runner, tmp_path, CONFIG)
    assert again.exit_code == 0, again.output
    assert "Clients created" not in again.output
    assert "Accounts already present (unchanged): alice@team.example" in again.output
    with app.app_context(), database.connection_context():
        assert OAuthClient.select().count() == 3
        assert Account.select().count() == 4


BROKEN = [
    (CONFIG + "\n[bob@team.example]\nclient_id = x\n", "section [bob@team.example] appears twice"),
    (f"client_secret = {M365_SECRET}\n" + CONFIG, "line 1: a setting before the first [section]"),
    (CONFIG + f"\n[erin@example.net]\nthis line has no equals {GOOGLE_SECRET}\n", "not a `name"),
    (
        CONFIG.replace(
            "redirect_uri = http://localhost\nclient_id = 9999", "colour = blue\nclient_id = 9999"
        ),
        "[carol@gmail.com]: unknown setting 'colour'",
    ),
    (CONFIG + "\n[Mystery section]\nx = 1\n", "[Mystery section]: unknown section"),
    (
        CONFIG.replace(
            "token_url = https://id.example.net/token\noauth2_scope = mail\n"
            "client_id = custom-client\nclient_secret",
            "oauth2_scope = mail\nclient_id = custom-client\nclient_secret",
        ),
        "[dave@example.net]: token_url is missing",
    ),
    (
        CONFIG.replace(
            f"client_secret = {GOOGLE_SECRET}", "client_secret = *** your client secret here ***"
        ),
        "client_secret is still the sample file's placeholder",
    ),
    (
        CONFIG.replace("server_port = 587", "server_port = many"),
        "[SMTP-1587]: needs server_address and a server_port",
    ),
    (CONFIG.replace("[carol@gmail.com]", "[Alice@team.example]"), "the address appears twice"),
    ("[emailproxy]\nx = 1\n", "the file describes no account"),
]


@pytest.mark.parametrize(("text", "message"), BROKEN)
def test_bad_file_gives_a_clear_error_and_imports_nothing(
    app, runner, owner, tmp_path, text, message
):
    result = run_import(runner, tmp_path, text)
    assert result.exit_code != 0
    assert "Nothing was imported" in result.output
    assert message in result.output
    assert_no_secret(result.output)
    with app.app_context(), database.connection_context():
        assert OAuthClient.select().count() == 0
        assert Account.select().count() == 0


def test_an_address_of_another_user_rolls_everything_back(app, runner, owner, auth, tmp_path):
    other = auth.create_user("other@example.org")
    with app.app_context(), database.connection_context():
        Account.create(owner=other, address="carol@gmail.com", provider="google", status="active")
    result = run_import(runner, tmp_path, CONFIG)
    assert result.exit_code != 0
    assert "[carol@gmail.com]: already linked by another user" in result.output
    with app.app_context(), database.connection_context():
        assert OAuthClient.select().count() == 0
        assert Account.select().count() == 1


def test_user_without_custom_clients_or_unknown_user_is_refused(app, runner, auth, tmp_path):
    auth.setup_admin()
    auth.create_user("plain@example.org", can_custom_clients=False)
    refused = run_import(runner, tmp_path, CONFIG, user="plain@example.org")
    assert refused.exit_code != 0 and "may not add custom OAuth clients" in refused.output
    unknown = run_import(runner, tmp_path, CONFIG, user="nobody@example.org")
    assert unknown.exit_code != 0 and "No user nobody@example.org" in unknown.output
    with app.app_context(), database.connection_context():
        assert OAuthClient.select().count() == 0


def test_a_file_that_is_not_text_is_refused(app, runner, owner, tmp_path):
    path = tmp_path / "emailproxy.config"
    path.write_bytes(b"\xff\xfe[bin\x00")
    result = runner.invoke(args=["import-emailproxy", str(path), "--user", "owner@example.org"])
    assert result.exit_code != 0 and "not UTF-8" in result.output
