"""Settings get the type of their default in one place, whichever layer set them."""

from __future__ import annotations

from pathlib import Path

import pytest

import config
from tests.helpers.app import make_app


def test_environment_values_are_typed_like_their_defaults() -> None:
    found = config.from_environ(
        {"AUTH_EMAIL_TOKEN_BACKOFF": "0.25", "AUTH_EMAIL_ALLOW_ROPC": "yes", "AUTH_EMAIL_X": "1"}
    )
    assert found == {"TOKEN_BACKOFF": 0.25, "ALLOW_ROPC": True}


def test_instance_and_test_layers_are_typed_too(instance: Path) -> None:
    instance.mkdir(parents=True)
    (instance / "config.py").write_text('MAIL_IDLE_TIMEOUT = "30"\nINVITE_HOURS = "12"\n')
    app = make_app(instance, TOKEN_HTTP_TIMEOUT=5, NEW_USERS_CUSTOM_CLIENTS=1)
    assert app.config["MAIL_IDLE_TIMEOUT"] == 30.0
    assert app.config["INVITE_HOURS"] == 12
    assert isinstance(app.config["TOKEN_HTTP_TIMEOUT"], float)
    assert app.config["NEW_USERS_CUSTOM_CLIENTS"] is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("INVITE_HOURS", "soon", "INVITE_HOURS must be a whole number, not 'soon'"),
        ("INVITE_HOURS", 1.5, "INVITE_HOURS must be a whole number, not 1.5"),
        ("TOKEN_BACKOFF", "fast", "TOKEN_BACKOFF must be a number, not 'fast'"),
        ("ALLOW_ROPC", "maybe", "ALLOW_ROPC must be true or false, not 'maybe'"),
    ],
)
def test_a_mistyped_setting_stops_the_start_with_its_name(
    instance: Path, name: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_app(instance, **{name: value})


def test_lists_are_comma_separated() -> None:
    assert config._coerce("X", " a, b ,,c", []) == ["a", "b", "c"]
    assert config._coerce("X", ("a",), []) == ["a"]


def test_durations_may_be_fractional_seconds() -> None:
    found = config.from_environ({"AUTH_EMAIL_MAIL_HANDSHAKE_TIMEOUT": "2.5"})
    assert found == {"MAIL_HANDSHAKE_TIMEOUT": 2.5}
    assert config.typed({"GRAPH_TIMEOUT": 5, "MAIL_IDLE_TIMEOUT": "90"}) == {
        "GRAPH_TIMEOUT": 5.0,
        "MAIL_IDLE_TIMEOUT": 90.0,
    }
