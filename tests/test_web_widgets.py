"""The faster WTForms attribute rendering (web/widgets.py) writes the same HTML as WTForms'."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from markupsafe import Markup
from wtforms import widgets as wtf_widgets
from wtforms.widgets import core

from web import widgets


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"name": "email", "id": "email", "type": "email", "value": "a\"<b>&'c"},
        {"checked": True, "readonly": False, "class_": "wide", "for_": "x"},
        {"data_step_key": "share", "aria_described_by": "email-help", "required": True},
        {"value": Markup('already "safe" <i>markup</i>')},
        {"maxlength": 254, "min": 0, "value": None},
        {"a<b": "odd key"},
    ],
)
def test_html_params_writes_what_wtforms_writes(attrs: dict[str, object]) -> None:
    ours, theirs = widgets.html_params(**attrs), widgets.original_html_params(**attrs)
    assert ours == theirs and isinstance(ours, Markup)


@pytest.fixture
def wtforms_own() -> Iterator[None]:
    """WTForms as shipped for the length of a test, then ours again."""
    saved = (core.html_params, wtf_widgets.html_params, core.Select._dispatch_render_option)
    core.html_params = wtf_widgets.html_params = widgets.original_html_params
    core.Input.html_params = core.SubmitInput.html_params = staticmethod(  # type: ignore[method-assign]
        widgets.original_html_params
    )
    core.Select._dispatch_render_option = classmethod(widgets.original_dispatch)  # type: ignore[method-assign,assignment]
    yield
    core.html_params, wtf_widgets.html_params, core.Select._dispatch_render_option = saved
    widgets.install()


PAGES = ("/accounts/new?address=a@example.test", "/settings/clients/new", "/settings/")


def _render(client: FlaskClient) -> dict[str, str]:
    """The pages with their CSRF tokens blanked (a token is signed with the time)."""
    return {
        path: re.sub(r'(name="csrf_token"[^>]*value=")[^"]+"', r'\1"', client.get(path).text)
        for path in PAGES
    }


def test_forms_render_the_same_html_as_with_wtforms_own(
    admin_client: FlaskClient, wtforms_own: None
) -> None:
    admin_client.get("/")  # shows (and so drops) the welcome message of the sign-up
    theirs = _render(admin_client)
    widgets.install()
    assert core.html_params is widgets.html_params
    assert _render(admin_client) == theirs
    assert "<select" in theirs["/settings/clients/new"] and "<label" in theirs["/settings/"]
