"""The dashboard renders form fields itself (web/fields.py, for speed): every field of every form,
empty, filled and refused, must come out exactly as WTForms' own widgets render it."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from markupsafe import Markup
from werkzeug.datastructures import MultiDict
from wtforms import widgets
from wtforms.fields import HiddenField, SelectChoice, SelectField, StringField

from web import account_forms, fields, forms, notification_forms
from web.forms import Form

# Attributes the templates pass (templates/_forms.html and its callers), quoting included.
ATTRS: list[dict[str, Any]] = [
    {},
    {"autocomplete": "off", "spellcheck": "false", "inputmode": "numeric"},
    {"aria-describedby": "f-help", "aria-invalid": "true", "autocomplete": "new-password"},
    {"placeholder": 'say "hi" <b>&', "data-must-equal": Markup('a"b'), "class_": "wide"},
    {"required": False, "disabled": True, "maxlength": 12},
    {"data_must_equal": "x", "aria_describedby": "y", "for_": "z"},
]


def every_form_class() -> list[type[Form]]:
    found = {
        cls
        for module in (forms, account_forms, notification_forms)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Form) and cls is not Form and cls.__module__ == module.__name__
    }
    return sorted(found, key=lambda c: c.__name__)


def instances(cls: type[Form]) -> Iterator[tuple[str, Form]]:
    """The form empty, filled with odd values, and submitted blank (so validation fails)."""

    def make(data: MultiDict[str, str] | None) -> Form:
        if cls is forms.DefaultClientsForm:
            options = {"microsoft365": [("7", 'Team "app" <x>')], "google": []}
            return cls.build(options, formdata=data, meta={"csrf": False})
        return cls(formdata=data, meta={"csrf": False})

    yield "empty", make(None)
    blank = make(MultiDict())
    blank.validate()
    yield "refused", blank
    filled: MultiDict[str, str] = MultiDict()
    for f in make(None):
        if isinstance(f, SelectField) and f.choices:
            last = f.choices[-1]
            filled.add(f.name, str(last.value if isinstance(last, SelectChoice) else last[0]))
        elif f.type == "BooleanField":
            filled.add(f.name, "y")
        elif f.type in ("IntegerField",):
            filled.add(f.name, "not a number")
        elif f.type == "DateField":
            filled.add(f.name, "2027-02-30")
        else:
            filled.add(f.name, 'x"<y>&z\n')
    filled_form = make(filled)
    filled_form.validate()
    yield "filled", filled_form


def test_the_forms_use_only_widgets_rendered_here(app: Flask) -> None:
    """A new widget would silently fall back to WTForms: this names it, so that the choice is
    made (add it to web/fields.py, or accept WTForms' speed for it)."""
    handled = (*fields._INPUTS, widgets.Select, widgets.TextArea)
    with app.test_request_context():
        unhandled = {
            f"{cls.__name__}.{f.name}: {type(f.widget).__name__}"
            for cls in every_form_class()
            for _, form in instances(cls)
            for f in form
            if type(f.widget) not in handled
        }
    assert not unhandled


@pytest.mark.parametrize("cls", every_form_class(), ids=lambda c: c.__name__)
def test_every_field_renders_as_wtforms_renders_it(app: Flask, cls: type[Form]) -> None:
    with app.test_request_context():
        compared = 0
        for state, form in instances(cls):
            for f in form:
                if f.type == "CSRFTokenField":
                    continue
                assert fields.label(f) == str(f.label), (state, f.name)
                for attrs in ATTRS:
                    ours = fields.control(f, dict(attrs))
                    assert isinstance(ours, Markup)
                    assert ours == f(**attrs), (state, f.name, attrs)
                    compared += 1
        assert compared


def test_options_flags_and_hidden_values_as_wtforms_has_them(app: Flask) -> None:
    """The cases the forms above may not all reach: a selected boolean-valued option, an option
    with its own attributes, a field's render_kw, a length flag and a password shown on
    purpose."""

    class Sample(Form):
        choice = SelectField(
            choices=[SelectChoice(True, "Yes"), SelectChoice(False, "No <never>")], coerce=bool
        )
        extra = SelectField(choices=[SelectChoice("a", "A", {"data-x": "1"}), SelectChoice("b")])
        sized = StringField(render_kw={"class": "wide", "placeholder": "p"})
        shown = StringField(widget=widgets.PasswordInput(hide_value=False))

    with app.test_request_context():
        form = Sample(formdata=MultiDict({"choice": "True", "sized": "v", "shown": "s3cret"}))
        form.sized.flags.maxlength = 20  # as Length(max=20) sets it
        for f in (form.choice, form.extra, form.sized, form.shown):
            for attrs in ATTRS:
                assert fields.control(f, dict(attrs)) == f(**attrs), (f.name, attrs)
        assert 'selected value="True"' in fields.control(form.choice, {})
        assert 'value="s3cret"' in fields.control(form.shown, {})


def test_a_fields_own_widget_is_left_to_wtforms(app: Flask) -> None:
    class Sample(Form):
        colour = StringField(widget=widgets.ColorInput())

    with app.test_request_context():
        f = Sample(meta={"csrf": False}).colour
        assert (
            fields.control(f, {"id": "c"})
            == f(id="c")
            == '<input id="c" name="colour" type="color" value="">'
        )


def test_hidden_fields_with_their_csrf_token_render_as_wtforms_renders_them(app: Flask) -> None:
    class Sample(Form):
        kept = HiddenField(default='a "quoted" <value>')
        name = StringField()

    with app.test_request_context():
        form = Sample()
        wtforms_own = "\n".join(str(f(id=False)) for f in form if f.name != "name")
        assert form.hidden_tag() == wtforms_own
        assert 'name="csrf_token" type="hidden" value="' in wtforms_own
        assert form.hidden_tag(form.kept) == str(form.kept(id=False))
