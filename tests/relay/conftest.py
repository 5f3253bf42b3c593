"""Fixtures of the relay tests: the scripted upstreams and a proxy in front of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailproxy import Controller, Endpoint
from tests.helpers.proxy import Account, RecordingBackend, running_proxy
from tests.helpers.upstreams import FakeIMAP, FakePOP3, FakeSMTP


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeIMAP]:
    f = FakeIMAP()
    yield f
    f.close()


@pytest.fixture(scope="module")
def fake_pop3() -> Iterator[FakePOP3]:
    f = FakePOP3()
    yield f
    f.close()


@pytest.fixture(scope="module")
def fake_smtp() -> Iterator[FakeSMTP]:
    f = FakeSMTP()
    yield f
    f.close()


@pytest.fixture
def backend(fake: FakeIMAP, fake_pop3: FakePOP3, fake_smtp: FakeSMTP) -> RecordingBackend:
    for f in (fake, fake_pop3, fake_smtp):
        f.reset()
    upstreams = {
        "imap": Endpoint("127.0.0.1", fake.port, "plain"),
        "pop3": Endpoint("127.0.0.1", fake_pop3.port, "plain"),
        "smtp": Endpoint("127.0.0.1", fake_smtp.port, "plain"),
    }
    acct = Account(7, "carol@example.test", "pw", upstreams)
    return RecordingBackend(accounts={acct.address: acct}, token_source=lambda a, force: "good")


@pytest.fixture
def proxy(backend: RecordingBackend) -> Iterator[Controller]:
    listeners = {"imap": "127.0.0.1:0", "pop3": "127.0.0.1:0", "submission": "127.0.0.1:0"}
    with running_proxy(backend, listeners=listeners, idle_timeout=2.0) as c:
        yield c
