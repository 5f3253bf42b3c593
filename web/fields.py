"""Form fields as HTML: the markup of WTForms' own widgets, built in one pass.

WTForms formats every attribute through ``Markup.format``, finds a field's flags with ``dir()``
and inspects a select's option renderer once per option: on the client editor that was a third
of the page's CPU (bench/README.md). The widgets the forms use (inputs, selects, text areas,
labels) are rendered here to the same markup, through WTForms' public field API; any other
widget is left to WTForms. ``tests/test_field_markup.py`` holds every form's fields equal to
WTForms' own rendering, so an upgrade of WTForms that changes its markup fails there.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape
from wtforms import widgets
from wtforms.fields import Field

_INPUTS = (
    widgets.TextInput,
    widgets.PasswordInput,
    widgets.EmailInput,
    widgets.URLInput,
    widgets.NumberInput,
    widgets.DateInput,
    widgets.HiddenInput,
    widgets.CheckboxInput,
    widgets.SubmitInput,
)


def clean_key(key: str) -> str:
    """An attribute's name as WTForms writes it: ``class_`` is ``class``, ``data_x_y`` is
    ``data-x-y``."""
    key = key.rstrip("_")
    return key.replace("_", "-") if key.startswith(("data_", "aria_")) else key


def attributes(kwargs: dict[str, Any]) -> str:
    """``html_params``' output: sorted by key, ``True`` bare, ``False`` left out."""
    parts = []
    for key in sorted(kwargs):
        value = kwargs[key]
        if value is True:
            parts.append(clean_key(key))
        elif value is not False:
            text = str(escape(value)).replace('"', "&quot;")
            parts.append(f'{clean_key(key)}="{text}"')
    return " ".join(parts)


def label(field: Field) -> Markup:
    """``{{ field.label }}``: the label bound to the field's id."""
    return Markup(f'<label for="{escape(field.id)}">{escape(field.label.text)}</label>')


def control(field: Field, attrs: dict[str, Any]) -> Markup:
    """``field(**attrs)``: the field's input, select or text area."""
    widget = field.widget
    kind = type(widget)
    kwargs = {clean_key(k): v for k, v in attrs.items()}
    if field.render_kw is not None:
        kwargs = {**{clean_key(k): v for k, v in field.render_kw.items()}, **kwargs}
    if kind in _INPUTS and getattr(field, "_datalist", None) is None:
        return _input(field, widget, kwargs)
    if kind is widgets.Select and not widget.multiple and not field.has_groups():
        return _select(field, kwargs)
    if kind is widgets.TextArea:
        kwargs.setdefault("id", field.id)
        _add_flags(field, widget, kwargs, call=False)
        value = escape(field._value())
        return Markup(
            f"<textarea {attributes({'name': field.name, **kwargs})}>\r\n{value}</textarea>"
        )
    return field(**attrs)


def _input(field: Field, widget: Any, kwargs: dict[str, Any]) -> Markup:
    kind = type(widget)
    if kind is widgets.PasswordInput and widget.hide_value:
        kwargs["value"] = ""
    elif kind is widgets.CheckboxInput and getattr(field, "checked", field.data):
        kwargs.setdefault("checked", True)
    elif kind is widgets.SubmitInput:
        kwargs.setdefault("value", field.label.text)
    elif kind is widgets.NumberInput:
        for name in ("step", "min", "max"):
            if getattr(widget, name) is not None:
                kwargs.setdefault(name, getattr(widget, name))
    kwargs.setdefault("id", field.id)
    kwargs.setdefault("type", widget.input_type)
    if "value" not in kwargs:
        kwargs["value"] = field._value()
    _add_flags(field, widget, kwargs, call=True)
    return Markup(f"<input {attributes({'name': field.name, **kwargs})}>")


def _select(field: Any, kwargs: dict[str, Any]) -> Markup:
    kwargs.setdefault("id", field.id)
    _add_flags(field, field.widget, kwargs, call=False)
    html = [f"<select {attributes({'name': field.name, **kwargs})}>"]
    for choice in field.iter_choices():
        value = str(choice.value) if isinstance(choice.value, bool) else choice.value
        options = {"value": value, **(choice.render_kw or {})}
        if choice.selected:
            options["selected"] = True
        html.append(
            f"<option {attributes(options)}>{escape(choice.label or choice.value)}</option>"
        )
    html.append("</select>")
    return Markup("".join(html))


def _add_flags(field: Field, widget: Any, kwargs: dict[str, Any], call: bool) -> None:
    """The validators' flags the widget turns into attributes (``required``, ``maxlength``...)."""
    for name, value in vars(field.flags).items():
        if name in widget.validation_attrs and name not in kwargs:
            kwargs[name] = value() if call and callable(value) else value


def init_app(app: Any) -> None:
    """The templates' ``field_label`` and ``field_control`` (templates/_forms.html)."""
    app.jinja_env.globals.update(field_label=label, field_control=control)
