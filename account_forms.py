"""Forms of the accounts screens (kept apart from forms.py, which other screens extend)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Optional, ValidationError

import linking
import providers

MIN_MAIL_PASSWORD = 12


def _mailbox_address(form: FlaskForm, field: EmailField) -> None:
    # Not wtforms' Email(): it refuses reserved names (.test, .local) some sites use in-house.
    try:
        linking.normalize_address(field.data or "")
    except linking.LinkError as exc:
        raise ValidationError(exc.message) from None


def _address(**kwargs: object) -> EmailField:
    return EmailField(
        "Mailbox address",
        validators=[DataRequired(), _mailbox_address, Length(max=254)],
        filters=[lambda v: v.strip().lower() if v else v],
        **kwargs,  # type: ignore[arg-type]
    )


def provider_choices() -> list[tuple[str, str]]:
    return [("", "Guess from the address"), *providers.choices()]


class AddressForm(FlaskForm):
    """The address (and provider) the authorization page is for; a GET form, no CSRF."""

    class Meta:
        csrf = False

    address = _address()
    provider = SelectField("Provider", choices=[], validate_choice=False)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.provider.choices = provider_choices()


class AuthorizeForm(FlaskForm):
    """Start an authorization; ``client`` is the pressed button's value ("default" or an id)."""

    address = _address()
    provider = SelectField("Provider", choices=[], validate_choice=False)
    client = StringField("Client", validators=[DataRequired(message="Choose a client.")])
    # Only for the legacy password grant.
    username = StringField("Sign-in name", validators=[Optional(), Length(max=254)])
    password = PasswordField("Mailbox password", validators=[Optional(), Length(max=1024)])

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.provider.choices = provider_choices()


class MailPasswordForm(FlaskForm):
    """A password for mail clients: typed twice, or generated and shown once."""

    label = StringField(
        "Device or program",
        description="For example “Laptop Thunderbird” or “Office scanner”.",
        validators=[Length(max=100)],
        filters=[lambda v: v.strip() if v else v],
    )
    generate = BooleanField("Generate a strong password for me (shown once)")
    password = PasswordField("Password", validators=[Length(max=1024)])
    confirm = PasswordField(
        "Repeat password", validators=[EqualTo("password", message="The passwords do not match.")]
    )

    def validate_password(self, field: PasswordField) -> None:
        if self.generate.data:
            return
        if not field.data:
            raise ValidationError("Enter a password, or let one be generated.")
        if len(field.data) < MIN_MAIL_PASSWORD:
            raise ValidationError(f"Use at least {MIN_MAIL_PASSWORD} characters.")
