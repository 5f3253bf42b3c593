"""Forms, one class per screen; ``validate_<field>`` methods hold the checks that need the data."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField, SubmitField
from wtforms.validators import DataRequired, Email, EqualTo, Length, ValidationError

from models import User

MIN_PASSWORD = 10


def _new_password(label: str = "Password") -> PasswordField:
    return PasswordField(
        label,
        validators=[
            DataRequired(),
            Length(min=MIN_PASSWORD, max=1024, message=f"Use at least {MIN_PASSWORD} characters."),
        ],
    )


def _confirm(label: str = "Repeat password", of: str = "password") -> PasswordField:
    return PasswordField(
        label, validators=[DataRequired(), EqualTo(of, message="The passwords do not match.")]
    )


def _email() -> EmailField:
    return EmailField(
        "Email",
        validators=[DataRequired(), Email(message="Enter an email address."), Length(max=254)],
        filters=[lambda v: v.strip().lower() if v else v],
    )


class EmptyForm(FlaskForm):
    """For buttons that change state: a POST carrying only the CSRF token."""

    submit = SubmitField("Submit")


class LoginForm(FlaskForm):
    email = _email()
    password = PasswordField("Password", validators=[DataRequired()])
    remember = BooleanField("Keep me signed in on this device")
    submit = SubmitField("Sign in")


class SetupForm(FlaskForm):
    email = _email()
    password = _new_password()
    confirm = _confirm()
    submit = SubmitField("Create administrator")


class InviteAcceptForm(FlaskForm):
    password = _new_password()
    confirm = _confirm()
    submit = SubmitField("Set password")


class PasswordChangeForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    password = _new_password("New password")
    confirm = _confirm("Repeat new password")
    submit = SubmitField("Change password")


class NewUserForm(FlaskForm):
    email = _email()
    password = PasswordField(
        "Password",
        description="Leave empty to create an invite link instead.",
        validators=[Length(max=1024)],
    )
    can_custom_clients = BooleanField("May add custom OAuth clients")
    submit = SubmitField("Create user")

    def validate_email(self, field: StringField) -> None:
        if User.by_email(field.data or ""):
            raise ValidationError("A user with this email already exists.")

    def validate_password(self, field: PasswordField) -> None:
        if field.data and len(field.data) < MIN_PASSWORD:
            raise ValidationError(f"Use at least {MIN_PASSWORD} characters.")


class ResetPasswordForm(FlaskForm):
    password = _new_password("New password")
    submit = SubmitField("Set password")


class InstanceSettingsForm(FlaskForm):
    new_users_custom_clients = BooleanField("New users may add custom OAuth clients")
    allow_ropc = BooleanField(
        "Allow the legacy Resource Owner Password grant (Microsoft; fails with MFA)"
    )
    submit = SubmitField("Save settings")
