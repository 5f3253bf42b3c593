"""The test bed itself: real tokens from the OAuth server work (and only they) at Dovecot.

If these fail, the product's end-to-end tests cannot be trusted either way.
"""

from __future__ import annotations

import http.server
import imaplib
import poplib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.peerbed import OAuthError, Peers, pkce_pair

pytestmark = pytest.mark.peers

CC = ["client_credentials"]


def inbox_count(conn: imaplib.IMAP4) -> int:
    typ, data = conn.select("INBOX", readonly=True)
    assert typ == "OK", data
    return int(data[0])


def cc_token(peers: Peers, mailbox: str, ttl: int | None = None) -> str:
    """A client_credentials access token good for ``mailbox`` from a client of its own."""
    cid, secret = peers.register_client(grant_types=CC, mailbox=mailbox, access_token_ttl=ttl)
    return str(peers.client_credentials_token(cid, secret)["access_token"])


def test_client_credentials_token_opens_imap_over_starttls_and_tls(peers: Peers) -> None:
    address, _ = peers.new_mailbox("cc", messages=3)
    token = cc_token(peers, address)
    assert peers.introspect(token)["email"] == address
    for tls in ("starttls", "implicit"):
        conn = peers.imap(address, token, tls=tls)
        try:
            assert inbox_count(conn) == 3, tls
            assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
        finally:
            conn.logout()
    conn = peers.imap(address, token, tls="implicit", mech="OAUTHBEARER")
    conn.logout()


def test_server_certificate_is_signed_by_the_throwaway_ca(peers: Peers) -> None:
    """The certificate verifies against ca_file only (for 127.0.0.1, localhost, the name)."""
    for name in ("127.0.0.1", "localhost", "mail.example.test", peers.mail_host):
        ctx = peers.ssl_context()
        raw = socket.create_connection((peers.mail_host, peers.imaps_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=name) as sock:
            assert sock.getpeercert()
    no_ca = ssl.create_default_context()  # the system store does not know the throwaway CA
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(peers.mail_host, peers.imaps_port, ssl_context=no_ca, timeout=10)


def test_dovecot_refuses_a_token_sent_before_tls(peers: Peers) -> None:
    """Like real providers, the peer refuses any authentication in clear (IMAP, POP3, SMTP):
    a proxy that skipped the upstream STARTTLS cannot pass a functional test."""
    address, _ = peers.new_mailbox("clear", messages=1)
    token = cc_token(peers, address)
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(address, token, tls="none")
    with pytest.raises(poplib.error_proto):
        peers.pop3(address, token, tls="none")
    with pytest.raises(smtplib.SMTPException):
        peers.smtp(address, token, tls="none")
    peers.imap(address, token, tls="starttls").logout()  # the same token over TLS works


def test_pop3_xoauth2_stls_and_tls(peers: Peers) -> None:
    address, _ = peers.new_mailbox("pop", messages=2)
    token = cc_token(peers, address)
    for tls in ("starttls", "implicit"):
        conn = peers.pop3(address, token, tls=tls)
        try:
            count, _size = conn.stat()
            assert count == 2, tls
            assert any(b"Seed message 1" in line for line in conn.retr(1)[1])
        finally:
            conn.quit()


def test_authorization_code_token_works_and_refresh_tokens_rotate(peers: Peers) -> None:
    address, _ = peers.new_mailbox("code", messages=1)
    redirect = "http://127.0.0.1:9/callback"  # never requested: the helper stops at it
    cid, secret = peers.register_client(redirect_uris=[redirect])
    tokens = peers.authorization_code_tokens(address, cid, secret, redirect)
    assert {"access_token", "refresh_token", "id_token"} <= tokens.keys()
    conn = peers.imap(address, tokens["access_token"])
    assert inbox_count(conn) == 1
    conn.logout()

    first = peers.refresh(tokens["refresh_token"], cid, secret)
    assert first["refresh_token"] != tokens["refresh_token"]
    second = peers.refresh(first["refresh_token"], cid, secret)
    peers.pop3(address, second["access_token"]).quit()
    with pytest.raises(OAuthError) as err:
        peers.refresh(tokens["refresh_token"], cid, secret)  # rotated away
    assert err.value.error == "invalid_grant"


def test_wrong_password_is_refused_at_the_oauth_server(peers: Peers) -> None:
    address, _ = peers.new_mailbox("badpw", messages=0)
    with pytest.raises(OAuthError, match="Invalid email or password"):
        peers.authorization_code_tokens(address, password="not-the-password")


def test_client_secret_post_client(peers: Peers) -> None:
    address, _ = peers.new_mailbox("post", messages=0)
    redirect = "http://127.0.0.1:9/cb"
    cid, secret = peers.register_client(
        redirect_uris=[redirect], token_endpoint_auth_method="client_secret_post"
    )
    tokens = peers.authorization_code_tokens(
        address, cid, secret, redirect, auth_method="client_secret_post"
    )
    peers.imap(address, tokens["access_token"]).logout()


def test_smtp_submission_is_delivered_and_readable_over_imap(peers: Peers) -> None:
    address, _ = peers.new_mailbox("smtp", messages=0)
    token = cc_token(peers, address)
    for tls in ("starttls", "implicit"):
        subject = f"bed smtp {tls} {time.time_ns()}"
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = address, address, subject
        msg.set_content("sent with SMTP AUTH XOAUTH2")
        conn = peers.smtp(address, token, tls=tls)
        conn.send_message(msg)
        conn.quit()
        assert peers.wait_for_message(address, subject, timeout=20), tls
        imap = peers.imap(address, token)
        imap.select("INBOX", readonly=True)
        typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
        imap.logout()
        assert typ == "OK" and found[0].split(), tls
    assert peers.message_count(address) == 2


def test_revoked_tokens_are_refused(peers: Peers) -> None:
    address, _ = peers.new_mailbox("revoke", messages=0)
    redirect = "http://127.0.0.1:9/cb"
    cid, secret = peers.register_client(
        redirect_uris=[redirect], grant_types=["authorization_code", "refresh_token", *CC],
        mailbox=address,
    )  # fmt: skip
    single = peers.client_credentials_token(cid, secret)["access_token"]
    peers.imap(address, single).logout()
    peers.revoke_token(single, cid, secret)
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(address, single)

    tokens = peers.authorization_code_tokens(address, cid, secret, redirect)
    peers.imap(address, tokens["access_token"]).logout()
    assert peers.revoke_grants(email=address)["revoked_grants"] >= 1
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(address, tokens["access_token"])
    with pytest.raises(OAuthError) as err:
        peers.refresh(tokens["refresh_token"], cid, secret)
    assert err.value.error == "invalid_grant"


def test_expired_token_is_refused(peers: Peers) -> None:
    address, _ = peers.new_mailbox("ttl", messages=0)
    cid, secret = peers.register_client(grant_types=CC, mailbox=address, access_token_ttl=2)
    tokens = peers.client_credentials_token(cid, secret)
    assert tokens["expires_in"] == 2
    peers.imap(address, tokens["access_token"]).logout()
    time.sleep(3)
    assert peers.introspect(tokens["access_token"]) == {"active": False}
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(address, tokens["access_token"])


def test_token_of_another_user_or_unknown_token_is_refused(peers: Peers) -> None:
    owner, _ = peers.new_mailbox("owner", messages=0)
    other, _ = peers.new_mailbox("other", messages=0)
    token = cc_token(peers, owner)
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(other, token)
    with pytest.raises(poplib.error_proto):
        peers.pop3(other, token)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        peers.smtp(other, token)
    assert peers.introspect("no-such-token") == {"active": False}
    with pytest.raises(imaplib.IMAP4.error):
        peers.imap(owner, "no-such-token")
    peers.imap(owner, token).logout()  # no auth penalty after the failures


def test_token_endpoint_counter_moves(peers: Peers) -> None:
    address, _ = peers.new_mailbox("count", messages=0)
    cid, secret = peers.register_client(grant_types=CC, mailbox=address)
    assert peers.token_requests(cid) == 0
    before = peers.token_requests()
    peers.client_credentials_token(cid, secret)
    with pytest.raises(OAuthError):
        peers.client_credentials_token(cid, "wrong-secret")
    assert peers.token_requests(cid) == 2
    assert peers.token_requests() >= before + 2
    recent = [r for r in peers.token_stats()["recent"] if r["client_id"] == cid]
    assert [r["status"] for r in recent] == [200, 401]


def test_device_flow(peers: Peers) -> None:
    address, _ = peers.new_mailbox("device", messages=1)
    cid, secret = peers.register_client(
        grant_types=["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]
    )
    start = requests.post(
        peers.device_authorization_url,
        data={"scope": "openid email offline_access"},
        auth=(cid, secret),
        timeout=10,
    )
    assert start.status_code == 200, start.text
    device = start.json()
    grant = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": device["device_code"],
    }
    with pytest.raises(OAuthError) as err:
        peers.token_request(grant, cid, secret)
    assert err.value.error == "authorization_pending"
    peers.approve_device(device["user_code"], address)
    tokens = peers.token_request(grant, cid, secret)
    conn = peers.imap(address, tokens["access_token"])
    assert inbox_count(conn) == 1
    conn.logout()


class _Callback:
    """The redirect URI: a tiny local HTTP server that captures the query of one request."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                parts = urlsplit(self.path)
                if parts.path != "/callback":  # e.g. Chromium's /favicon.ico
                    self.send_response(404)
                    self.end_headers()
                    return
                query = parse_qs(parts.query)
                outer.params = {k: v[0] for k, v in query.items()}
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html><body><h1 id='done'>Signed in</h1></body></html>")
                outer.got.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callback() -> Iterator[_Callback]:
    cb = _Callback()
    yield cb
    cb.close()


@pytest.mark.browser
def test_chromium_signs_in_with_authorization_code_and_pkce(
    peers: Peers, browser, callback: _Callback
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    address, password = peers.new_mailbox("browser", messages=2)
    cid, secret = peers.register_client(redirect_uris=[callback.url])
    verifier, challenge = pkce_pair()
    url = peers.authorization_url(cid, callback.url, challenge, state="st-123")
    wait = WebDriverWait(browser, 20)

    browser.get(url)
    wait.until(lambda d: d.find_elements(By.ID, "login"))
    browser.find_element(By.ID, "login").send_keys(address)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.ID, "allow"))
    assert browser.find_element(By.ID, "client").text == cid
    assert browser.find_element(By.ID, "account").text == address
    browser.find_element(By.ID, "allow").click()
    wait.until(lambda d: d.find_elements(By.ID, "done"))

    assert callback.got.wait(5)
    assert callback.params.get("state") == "st-123"
    data = {
        "grant_type": "authorization_code",
        "code": callback.params["code"],
        "redirect_uri": callback.url,
        "code_verifier": verifier,
    }
    tokens = peers.token_request(data, cid, secret)
    conn = peers.imap(address, tokens["access_token"], tls="implicit")
    assert inbox_count(conn) == 2
    conn.logout()
    assert peers.token_requests(cid) == 1
