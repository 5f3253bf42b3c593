"""WTForms' HTML attributes, written without ``Markup.format``.

``wtforms.widgets.html_params`` formats each attribute through ``Markup.format`` (a
``string.Formatter`` that escapes): ~0.1 ms per input, and the client editor renders ~75 inputs
and options. ``html_params`` below gives the same string with ``escape`` and an f-string, and
``install`` puts it where WTForms' widgets and labels look it up (tests/test_web_widgets.py
compares the two).
"""

from __future__ import annotations

import functools
from typing import Any

from markupsafe import Markup, escape
from wtforms import widgets
from wtforms.widgets import core

original_html_params = core.html_params
original_dispatch = core.Select._dispatch_render_option.__func__  # type: ignore[attr-defined]


def html_params(**kwargs: Any) -> Markup:
    """``wtforms.widgets.html_params``: sorted attributes, True as a bare name, False left out,
    values escaped (and a quote in a value that is already Markup as ``&quot;``)."""
    params = []
    for key, value in sorted(kwargs.items()):
        key = core.clean_key(key)
        if value is True:
            params.append(str(escape(key)))
        elif value is not False:
            params.append(f'{escape(key)}="{str(escape(value)).replace(chr(34), "&quot;")}"')
    return Markup(" ".join(params))


def install() -> None:
    """Idempotent; the widgets hold ``html_params`` as a module global and as a class attribute.
    Also: ``Select`` reads its ``render_option``'s signature (``inspect``) on every render, though
    it depends only on the class; kept per class."""
    select: Any = core.Select
    per_class: Any = functools.cache(original_dispatch)
    select._dispatch_render_option = classmethod(per_class)
    core.html_params = html_params
    widgets.html_params = html_params
    for widget in vars(core).values():
        if isinstance(widget, type) and "html_params" in vars(widget):
            held: Any = widget
            held.html_params = staticmethod(html_params)
