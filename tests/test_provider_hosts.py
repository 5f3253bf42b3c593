"""PROVIDER_HOSTS: the built-in providers' hosts moved elsewhere (a test tenant, another cloud's
front door, the test bed's simulators), and refused at start when the value cannot be used."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from config import HostPolicy
from mailproxy.backend import Endpoint
from oauth import providers
from tests.helpers.app import make_app

MOVED = {
    "login.microsoftonline.com": "login.test.example:8443",
    "outlook.office365.com:993": "10.1.2.3:9993",
    "outlook.office365.com:995": "10.1.2.3:9995",
    "smtp.office365.com": "127.0.0.1",
    "oauth2.googleapis.com": "[::1]:4443",
}


@pytest.fixture(autouse=True)
def shipped_afterwards() -> Iterator[None]:
    yield
    providers.configure({})


def preset_client(provider: str) -> SimpleNamespace:
    return SimpleNamespace(provider=provider, revocation_url="")


def test_the_presets_follow_the_moved_hosts() -> None:
    providers.configure({"PROVIDER_HOSTS": MOVED})
    code = providers.defaults_for("microsoft365", "authorization_code", "contoso.example")
    assert code["authorize_url"] == (
        "https://login.test.example:8443/contoso.example/oauth2/v2.0/authorize"
    )
    assert code["token_url"] == "https://login.test.example:8443/contoso.example/oauth2/v2.0/token"
    assert code["scope"].startswith("https://outlook.office.com/IMAP.AccessAsUser.All")  # as is
    assert providers.endpoints_for(preset_client("microsoft365")) == {  # type: ignore[arg-type]
        "imap": Endpoint("10.1.2.3", 9993, "tls"),
        "pop3": Endpoint("10.1.2.3", 9995, "tls"),
        "smtp": Endpoint("127.0.0.1", 587, "starttls"),  # no port given: the preset's own
    }
    google = providers.defaults_for("google", "authorization_code")
    assert google["token_url"] == "https://[::1]:4443/token"
    assert google["authorize_url"] == "https://accounts.google.com/o/oauth2/v2/auth"  # not moved
    assert providers.revocation_url_for(preset_client("google")) == (  # type: ignore[arg-type]
        "https://[::1]:4443/revoke"
    )
    # another cloud's hosts are not touched
    gcc = providers.defaults_for("microsoft_gcc_high", "authorization_code", "x")
    assert gcc["token_url"].startswith("https://login.microsoftonline.us/")
    # a stored URL with the shipped host is still a default, so it follows on save
    shipped = "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    assert providers.is_a_default("token_url", shipped)
    assert providers.is_a_default("token_url", code["token_url"])
    assert providers.PRESETS["microsoft365"].imap == Endpoint("outlook.office365.com", 993, "tls")


def test_the_environment_form_and_going_back() -> None:
    providers.configure(
        {"PROVIDER_HOSTS": "imap.gmail.com=127.0.0.1:2993, smtp.gmail.com=127.0.0.1:2465"}
    )
    endpoints = providers.endpoints_for(preset_client("google"))  # type: ignore[arg-type]
    assert endpoints["imap"] == Endpoint("127.0.0.1", 2993, "tls")
    assert endpoints["smtp"] == Endpoint("127.0.0.1", 2465, "tls")
    assert endpoints["pop3"] == Endpoint("pop.gmail.com", 995, "tls")
    providers.configure({"PROVIDER_HOSTS": ""})
    assert providers.endpoints_for(preset_client("google"))["imap"].host == "imap.gmail.com"  # type: ignore[arg-type]


def test_moved_hosts_are_allowed_like_the_shipped_ones() -> None:
    """The operator named them: a moved host on loopback or a private address is reached even
    where clients may not name such hosts themselves."""
    providers.configure({"PROVIDER_HOSTS": MOVED})
    policy = HostPolicy.from_config({"CUSTOM_CLIENT_HOSTS": "*"}, providers.preset_hosts())
    for host in ("127.0.0.1", "10.1.2.3", "login.test.example", "::1", "outlook.office365.com"):
        assert policy.refusal(host) is None, host
    assert policy.refusal("10.9.9.9") is not None
    assert policy.refusal("localhost") is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"login.microsoft.com": "x.example"}, "'login.microsoft.com' is no host of a built-in"),
        ("outlook.office365.com:993", "has no value (write outlook.office365.com:993=host"),
        ({"imap.gmail.com": "bad host"}, "'bad host' is not a host name or IPv4 address"),
        ({"imap.gmail.com": "127.0.0.1:70000"}, "the port must be 1 to 65535"),
        ({"imap.gmail.com:x": "127.0.0.1"}, "'imap.gmail.com:x' is not host or host:port"),
        ({"imap.gmail.com": "[1::2::3]:1"}, "[1::2::3] is not an IPv6 address"),
        ("imap.gmail.com=a.example IMAP.gmail.com=b.example", "imap.gmail.com is given twice"),
        (["imap.gmail.com"], "must be a dict or a string of host=host[:port] pairs, not list"),
    ],
)
def test_a_value_that_cannot_be_used_is_refused_with_the_reason(
    instance: Path, value: object, message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        make_app(instance, PROVIDER_HOSTS=value)
    assert str(refused.value).startswith("PROVIDER_HOSTS: ")
    assert message in str(refused.value)
    assert providers.endpoints_for(preset_client("google"))["imap"].host == "imap.gmail.com"  # type: ignore[arg-type]


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ValueError) as refused:
        providers.parse_provider_hosts("nowhere.example=a.example imap.gmail.com=")
    assert "'nowhere.example' is no host" in str(refused.value)
    assert "'imap.gmail.com' has no value" in str(refused.value)


def test_the_service_refuses_to_start_with_a_malformed_value(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AUTH_EMAIL_INSTANCE": str(tmp_path / "instance"),
        "AUTH_EMAIL_PROVIDER_HOSTS": "login.microsoftonline.com=127.0.0.1:notaport",
        "AUTH_EMAIL_BIND": "127.0.0.1:0",
    }
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "serve.py")],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "auth-email: cannot start: PROVIDER_HOSTS: '127.0.0.1:notaport' "
        "(for login.microsoftonline.com) is not host or host:port"
    ) in done.stderr
