"""Linking an address another user has linked looks, to the second user, exactly like linking a
free one until the provider has granted access; then it is refused without naming the owner, and
nothing of the first user's account changes (issue 12, "already linked by another user").

Each flow (Authorization Code, Device Code, Client Credentials) is run twice through the web
routes against the real peers, by two users who are alike in everything but the address they
try: one nobody has, one a third user has linked. Every response up to the grant is compared
after the values that differ anyway (ids, nonces, the address, codes, times) are normalised.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from flask import Flask
from flask.testing import FlaskClient

from mailboxes import linking
from mailboxes.mailbackend import AppBackend
from models import Account, AuditEvent, MailPassword, OAuthClient, PendingAuthorization, User
from people import users
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD, make_app
from tests.helpers.linking import (
    PUBLIC,
    REDIRECT,
    PeerInfo,
    mailbox,
    op_sign_in,
    path_and_query,
    peer_client,
    register,
)
from tests.helpers.web import AuthActions, csrf_token, post_form

pytestmark = pytest.mark.peers

HOLDER = "holder@example.org"
MAIL_PASSWORD = "holders mail password 1"


@pytest.fixture
def bed(peers: Any) -> PeerInfo:
    return PeerInfo(peers)


@pytest.fixture
def site(instance: Path, bed: PeerInfo) -> Flask:
    """The app, trusting the peers' CA (``test_linking.peer_app``)."""
    app = make_app(instance, UPSTREAM_CA_FILE=bed.ca_file, PUBLIC_URL=PUBLIC)
    with app.app_context():
        users.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    return app


@dataclass
class Holder:
    """The first user, who has linked the address, and a snapshot of everything they own."""

    user: User
    account: Account
    snapshot: dict[str, Any] = field(default_factory=dict)


def snapshot(user_id: int, account_id: int) -> dict[str, Any]:
    """Every stored value of the holder's user, account and mail passwords (ciphertexts too)."""
    return {
        "user": dict(User.get_by_id(user_id).__data__),
        "account": dict(Account.get_by_id(account_id).__data__),
        "passwords": [
            dict(row.__data__)
            for row in MailPassword.select().where(MailPassword.account == account_id)
        ],
    }


@pytest.fixture
def holder(site: Flask, bed: PeerInfo) -> Holder:
    with site.app_context():
        user = AuthActions(site, site.test_client()).create_user(HOLDER, True)
        address = mailbox("held")
        reg = register(bed, mailbox=address)
        started = linking.start(
            user, address, peer_client(user, bed, reg, grant="client_credentials"), REDIRECT
        )
        assert started.done is not None and started.done.ok, started.done
        account = Account.get(Account.address == address)
        linking.add_password(user, account, "Laptop", MAIL_PASSWORD)
        return Holder(user, account, snapshot(user.id, account.id))


@dataclass
class Prober:
    """A signed-in user trying one address, and every response they got, as shapes."""

    client: FlaskClient
    user: User
    address: str
    seen: list[tuple[str, int, str, str]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    def keep(self, step: str, response: Any) -> Any:
        location = response.headers.get("Location", "")
        body = response.get_data(as_text=True)
        self.raw += [location, body]
        self.seen.append((step, response.status_code, self.normal(location), self.normal(body)))
        return response

    def get(self, step: str, path: str) -> Any:
        return self.keep(step, self.client.get(path))

    def post(self, step: str, path: str, data: dict[str, str], form_page: str) -> Any:
        token = csrf_token(self.client, form_page)
        return self.keep(step, self.client.post(path, data={"csrf_token": token, **data}))

    def normal(self, text: str) -> str:
        """``text`` without what differs between any two attempts (ids, nonces, times, who)."""
        text = text.replace("<wbr>", "")
        for form in (self.address, quote(self.address, safe=""), quote_plus(self.address)):
            text = text.replace(form, "ADDRESS")
        text = text.replace(self.user.email, "USER")
        text = re.sub(r"/accounts/\d+", "/accounts/ID", text)
        text = re.sub(r'data-account="\d+"', 'data-account="ID"', text)
        text = re.sub(r"/device/[\w-]+", "/device/STATE", text)
        text = re.sub(r'(name="csrf_token"[^>]*value=")[^"]+', r"\1TOKEN", text)
        text = re.sub(r'value="\d+"', 'value="ID"', text)  # the clients' ids
        text = re.sub(r'id="authorize-client-\d+"', 'id="authorize-client-ID"', text)
        text = re.sub(r"\b(state|code_challenge|nonce)=[\w.~-]+", r"\1=NONCE", text)
        text = re.sub(r"(client_id=)[\w.~-]+", r"\1CLIENT", text)
        text = re.sub(r'(id="user-code"[^>]*|value=")[A-Z0-9]{4}-?[A-Z0-9]{4}', r"\1CODE", text)
        text = re.sub(r"user_code=[\w-]+", "user_code=CODE", text)
        text = re.sub(r'datetime="[^"]+"', 'datetime="T"', text)
        text = re.sub(r'title="\d{4}-\d\d-\d\d [^"]+"', 'title="T"', text)
        return text


def prober(site: Flask, email: str, address: str) -> Prober:
    client = site.test_client()
    auth = AuthActions(site, client)
    user = auth.create_user(email, True)
    auth.login(email, USER_PASSWORD)
    return Prober(client, user, address)


def same_until_the_grant(free: Prober, taken: Prober) -> None:
    assert len(free.seen) == len(taken.seen)
    for mine, theirs in zip(free.seen, taken.seen, strict=True):
        assert mine[:3] == theirs[:3], (mine[:3], theirs[:3])
        diff = difflib.unified_diff(mine[3].splitlines(), theirs[3].splitlines(), lineterm="")
        assert mine[3] == theirs[3], f"step {mine[0]!r} differs:\n" + "\n".join(diff)


def refused_without_a_trace(taken: Prober, holder: Holder, final: Any) -> None:
    """The refusal, and everything around it, for the prober of the taken address."""
    page = final.get_data(as_text=True)
    assert final.status_code == 409
    assert "already linked in this instance" in page and "Ask your administrator" in page
    assert HOLDER not in page and "Laptop" not in page
    for text in taken.raw:  # no URL or page the prober saw names the holder or their account
        assert HOLDER not in text
        held = holder.account.id
        assert not re.search(rf'/accounts/{held}\b|data-account="{held}"', text), text[:300]
    assert Account.get_or_none(Account.owner == taken.user) is None  # no placeholder left
    assert PendingAuthorization.get_or_none(PendingAuthorization.owner == taken.user) is None
    assert snapshot(holder.user.id, holder.account.id) == holder.snapshot
    refused = AuditEvent.get(AuditEvent.action == "account.link_refused_taken")
    assert (refused.actor_id, refused.target) == (taken.user.id, holder.account.address)
    assert HOLDER not in refused.detail
    assert taken.client.get(f"/accounts/{holder.account.id}").status_code == 404


def holder_still_signs_in(site: Flask, holder: Holder) -> None:
    grant = AppBackend(site.config).authenticate(
        "imap", holder.account.address, MAIL_PASSWORD, "127.0.0.1"
    )
    assert grant.account_id == holder.account.id


def start_form(p: Prober, client: OAuthClient) -> tuple[str, dict[str, str], str]:
    data = {"address": p.address, "provider": "other", "client": str(client.id)}
    return "/accounts/new", data, f"/accounts/new?address={quote(p.address)}"


def browse_after_start(p: Prober) -> None:
    """What the prober can look at while the provider's page is open: the dashboard, and the
    placeholder's own page (the Cancel link of the Device Code page)."""
    p.get("dashboard", "/")
    own = Account.get((Account.owner == p.user) & (Account.address == p.address))
    assert own.status == "pending"
    p.get("placeholder page", f"/accounts/{own.id}")


# ---------------------------------------------------------------------------------- the flows


def code_flow(p: Prober, bed: PeerInfo, client: OAuthClient) -> Any:
    path, data, page = start_form(p, client)
    p.get("form", page)
    start = p.post("start", path, data, page)
    assert start.status_code == 302 and start.headers["Location"].startswith(bed.auth_url)
    browse_after_start(p)
    back = op_sign_in(bed, start.headers["Location"], p.address)
    return p.client.get(path_and_query(back))  # the grant: not compared


def test_authorization_code_for_a_taken_address_looks_free_until_the_grant(
    site: Flask, bed: PeerInfo, holder: Holder
) -> None:
    reg = register(bed)
    free = prober(site, "free@example.org", mailbox("free"))
    taken = prober(site, "taken@example.org", holder.account.address)
    clients = [peer_client(p.user, bed, reg, name="My app") for p in (free, taken)]

    linked = code_flow(free, bed, clients[0])
    final = code_flow(taken, bed, clients[1])

    same_until_the_grant(free, taken)
    assert linked.status_code == 302
    assert Account.get(Account.address == free.address).status == "active"
    refused_without_a_trace(taken, holder, final)
    holder_still_signs_in(site, holder)


def device_flow(p: Prober, bed: PeerInfo, client: OAuthClient) -> tuple[Any, Any]:
    path, data, page = start_form(p, client)
    p.get("form", page)
    start = p.post("start", path, data, page)
    device_page = start.headers["Location"]
    shown = p.get("device page", device_page)
    p.post("check before signing in", device_page, {}, device_page)
    browse_after_start(p)
    cancel = re.search(r'<a href="([^"]+)">Cancel</a>', shown.get_data(as_text=True))
    assert cancel is not None
    p.get("cancel", cancel.group(1))
    code = re.search(r'value="([^"]+)" id="user-code"', shown.get_data(as_text=True))
    assert code is not None
    bed.approve_device(code.group(1), p.address)
    final = post_form(p.client, device_page, {})  # the grant: not compared
    return final, p.client.get(device_page)


def test_device_code_for_a_taken_address_looks_free_until_the_grant(
    site: Flask, bed: PeerInfo, holder: Holder
) -> None:
    reg = register(bed)
    free = prober(site, "free@example.org", mailbox("free"))
    taken = prober(site, "taken@example.org", holder.account.address)
    clients = [
        peer_client(p.user, bed, reg, grant="device_code", name="My app") for p in (free, taken)
    ]

    linked, _ = device_flow(free, bed, clients[0])
    final, after = device_flow(taken, bed, clients[1])

    same_until_the_grant(free, taken)
    assert linked.status_code == 302
    assert Account.get(Account.address == free.address).status == "active"
    refused_without_a_trace(taken, holder, final)
    assert after.status_code == 404  # the attempt is gone, as after any refused first link
    holder_still_signs_in(site, holder)


def cc_flow(p: Prober, client: OAuthClient) -> Any:
    path, data, page = start_form(p, client)
    p.get("form", page)
    token = csrf_token(p.client, page)
    return p.client.post(path, data={"csrf_token": token, **data})  # the grant: not compared


def test_client_credentials_for_a_taken_address_looks_free_until_the_grant(
    site: Flask, bed: PeerInfo, holder: Holder
) -> None:
    free = prober(site, "free@example.org", mailbox("free"))
    taken = prober(site, "taken@example.org", holder.account.address)
    clients = [
        peer_client(p.user, bed, register(bed, mailbox=p.address), "client_credentials",
                    name="My app")
        for p in (free, taken)
    ]  # fmt: skip

    linked = cc_flow(free, clients[0])
    final = cc_flow(taken, clients[1])

    same_until_the_grant(free, taken)
    assert linked.status_code == 302
    assert Account.get(Account.address == free.address).status == "active"
    refused_without_a_trace(taken, holder, final)
    holder_still_signs_in(site, holder)
    admin = site.test_client()
    AuthActions(site, admin).login()
    log = admin.get("/admin/audit").get_data(as_text=True).replace("<wbr>", "")
    assert "could not link a mailbox another user has already linked" in log
    assert taken.user.email in log and holder.account.address in log


def test_when_two_users_race_for_a_free_address_the_first_grant_wins(
    site: Flask, bed: PeerInfo
) -> None:
    """Both have a placeholder; the one whose grant completes first links it, the other is
    refused as for any linked address, and the winner's account is untouched."""
    reg = register(bed)
    address = mailbox("race")
    first = prober(site, "first@example.org", address)
    second = prober(site, "second@example.org", address)
    started = {
        p.user.id: linking.start(p.user, address, peer_client(p.user, bed, reg), REDIRECT)
        for p in (first, second)
    }
    assert Account.select().where(Account.address == address).count() == 2  # two placeholders
    backs = {uid: op_sign_in(bed, s.url, address) for uid, s in started.items()}

    won = second.client.get(path_and_query(backs[second.user.id]))
    winner = Account.linked_at(address)
    assert winner is not None
    before = snapshot(second.user.id, winner.id)
    lost = first.client.get(path_and_query(backs[first.user.id]))

    assert won.status_code == 302 and lost.status_code == 409
    assert [a.owner_id for a in Account.select().where(Account.address == address)] == [
        second.user.id
    ]
    assert snapshot(second.user.id, winner.id) == before


def test_the_database_holds_one_linked_account_per_address(site: Flask) -> None:
    """Placeholders may share an address; linked accounts may not, whatever the code does."""
    import peewee as pw

    auth = AuthActions(site, site.test_client())
    with site.app_context():
        one, two = (auth.create_user(f"{n}@example.org", True) for n in ("one", "two"))
        Account.create(owner=one, address="box@example.test", provider="other", status="active")
        other = Account.create(owner=two, address="box@example.test", provider="other")
        with pytest.raises(pw.IntegrityError):
            Account.create(owner=one, address="box@example.test", provider="other")
        with pytest.raises(pw.IntegrityError):
            Account.update(status="active").where(Account.id == other.id).execute()
