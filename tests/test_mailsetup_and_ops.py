"""Mail client setup (autoconfig, Apple profile, setup page), health and metrics."""

from __future__ import annotations

import plistlib
import socket
import xml.etree.ElementTree as ET

import pytest

from models import Account, User
from tests.helpers.app import USER_PASSWORD, make_app
from tests.helpers.web import post_form

THUNDERBIRD_REQUIRED = ("hostname", "port", "socketType", "username", "authentication")


def _account(app, owner_email: str, address: str) -> int:
    with app.app_context():
        owner = User.by_email(owner_email)
        return Account.create(owner=owner, address=address, provider="other", status="active").id


@pytest.mark.parametrize(
    "path", ["/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"]
)
def test_autoconfig_describes_the_proxy_listeners(client, app, path):
    response = client.get(path + "?emailaddress=someone@team.example")
    assert response.status_code == 200
    assert response.mimetype == "application/xml"
    root = ET.fromstring(response.data)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider.get("id") == "team.example"
    assert provider.findtext("domain") == "team.example"
    assert provider.findtext("displayName")
    incoming = provider.findall("incomingServer")
    outgoing = provider.findall("outgoingServer")
    assert {s.get("type") for s in incoming} == {"imap", "pop3"}
    assert len(outgoing) == 2
    for server in incoming + outgoing:
        for tag in THUNDERBIRD_REQUIRED:
            assert server.findtext(tag), tag
        assert server.findtext("authentication") == "password-cleartext"
        assert server.findtext("username") == "%EMAILADDRESS%"
        assert server.findtext("hostname") == "127.0.0.1"
    ports = {(s.get("type"), s.findtext("socketType")): s.findtext("port") for s in incoming}
    assert ports[("imap", "SSL")] == "1993" and ports[("imap", "STARTTLS")] == "1143"


def test_autoconfig_for_unknown_and_known_address_is_the_same_generic_answer(auth, client, app):
    auth.setup_admin()
    _account(app, "admin@example.org", "known@team.example")
    known = client.get("/mail/config-v1.1.xml?emailaddress=known@team.example").data
    unknown = client.get("/mail/config-v1.1.xml?emailaddress=nobody@team.example").data
    assert known == unknown
    assert b"known@" not in known


def test_disabled_listener_is_left_out(instance):
    app = make_app(instance, POP3_LISTEN="", POP3S_LISTEN="")
    root = ET.fromstring(app.test_client().get("/mail/config-v1.1.xml").data)
    assert [s.get("type") for s in root.iter("incomingServer")] == ["imap", "imap"]


def test_apple_profile_has_the_required_keys_and_no_password(auth, admin_client, app):
    account_id = _account(app, "admin@example.org", "me@team.example")
    response = admin_client.get(f"/accounts/{account_id}/auth-email.mobileconfig")
    assert response.status_code == 200
    assert response.mimetype == "application/x-apple-aspen-config"
    profile = plistlib.loads(response.data)
    for key in (
        "PayloadType",
        "PayloadVersion",
        "PayloadIdentifier",
        "PayloadUUID",
        "PayloadDisplayName",
        "PayloadContent",
    ):
        assert key in profile
    assert profile["PayloadType"] == "Configuration"
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    for key in (
        "EmailAccountType",
        "EmailAddress",
        "IncomingMailServerHostName",
        "IncomingMailServerPortNumber",
        "IncomingMailServerUsername",
        "IncomingMailServerAuthentication",
        "OutgoingMailServerHostName",
        "OutgoingMailServerPortNumber",
        "OutgoingMailServerAuthentication",
        "PayloadIdentifier",
        "PayloadUUID",
        "PayloadVersion",
    ):
        assert key in mail, key
    assert mail["EmailAddress"] == "me@team.example"
    assert mail["IncomingMailServerPortNumber"] == 1993 and mail["IncomingMailServerUseSSL"]
    assert not any(
        "Password" in k and k != "OutgoingPasswordSameAsIncomingPassword" and k.endswith("Password")
        for k in mail
    )


def test_someone_elses_profile_and_setup_page_are_404(auth, app):
    auth.setup_admin()
    account_id = _account(app, "admin@example.org", "me@team.example")
    auth.create_user("bob@example.org")
    bob = app.test_client()
    post_form(bob, "/login", {"email": "bob@example.org", "password": USER_PASSWORD})
    assert bob.get(f"/accounts/{account_id}/auth-email.mobileconfig").status_code == 404
    assert bob.get(f"/accounts/{account_id}/mail-client").status_code == 404


def test_setup_page_shows_servers_and_self_signed_fingerprint(auth, admin_client, app):
    account_id = _account(app, "admin@example.org", "me@team.example")
    page = admin_client.get(f"/accounts/{account_id}/mail-client").get_data(as_text=True)
    assert "me@team.example" in page and "1993" in page and "1587" in page
    from mailproxy import fingerprint_sha256

    fingerprint = fingerprint_sha256(str(app.instance_path) + "/tls/cert.pem")
    assert fingerprint in page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_turns_unhealthy_when_a_listener_is_down(instance):
    up = socket.socket()
    up.bind(("127.0.0.1", 0))
    up.listen()
    down_port = _free_port()
    listeners = {
        f"{n}_LISTEN": "" for n in ("IMAP", "IMAPS", "POP3", "POP3S", "SUBMISSION", "SMTPS")
    }
    app = make_app(instance, **{**listeners, "IMAPS_LISTEN": f"127.0.0.1:{up.getsockname()[1]}"})
    client = app.test_client()
    healthy = client.get("/healthz")
    assert healthy.status_code == 200 and healthy.json["checks"] == {
        "database": True,
        "imaps": True,
    }
    app.config["SMTPS_LISTEN"] = f"127.0.0.1:{down_port}"
    sick = client.get("/healthz")
    assert sick.status_code == 503
    assert sick.json["status"] == "unhealthy" and sick.json["checks"]["smtps"] is False
    up.close()


def test_metrics_are_restricted(instance):
    app = make_app(instance)
    client = app.test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 404
    app.config["METRICS_ACCESS"] = "s3cret-token-value"
    assert client.get("/metrics").status_code == 404
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token-value"})
    assert ok.status_code == 200 and b"mailproxy_logins_total" in ok.data
