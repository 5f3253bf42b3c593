"""The forms of the notification settings: a person's choices, and the admin's email sender."""

from __future__ import annotations

from typing import Any

from flask import current_app
from wtforms import BooleanField, IntegerField, PasswordField, SelectField, StringField, URLField
from wtforms.validators import Length, NumberRange, Optional, ValidationError

from mailboxes import notifications
from mailboxes.notifychannels import SECURITY, relay_refusal, webhook_url_refusal
from web.forms import Form, _choices, address_rule

SENDER_MODES = [
    ("", "No email (webhooks only)"),
    ("relay", "An SMTP relay"),
    ("mailbox", "One of your linked mailboxes"),
]


class NotificationSettingsForm(Form):
    """Which events, and where: email to the login address and/or a webhook."""

    email_enabled = BooleanField("Email to my login address")
    webhook_enabled = BooleanField("Webhook")
    webhook_url = URLField(
        "Webhook URL",
        description="Receives a JSON POST for each event, signed with your signing secret.",
        # no Optional(): it would skip validate_webhook_url, which needs the URL when enabled
        validators=[Length(max=2000)],
        filters=[lambda v: v.strip() if isinstance(v, str) else v],
    )

    def validate_webhook_url(self, field: StringField) -> None:
        if field.data:
            refusal = webhook_url_refusal(field.data, current_app.config)
            if refusal:
                raise ValidationError(refusal)
        elif self.webhook_enabled.data:
            raise ValidationError("Enter the URL that receives the webhook.")


# One checkbox per event kind, named kind_<kind>.
for _kind, _label in notifications.KINDS.items():
    setattr(NotificationSettingsForm, f"kind_{_kind}", BooleanField(_label))


def kind_fields(form: NotificationSettingsForm) -> list[Any]:
    return [getattr(form, f"kind_{kind}") for kind in notifications.KINDS]


class SenderForm(Form):
    """The instance's email sender and the renewal-failure threshold."""

    mode = SelectField("Send notification emails through", choices=_choices(SENDER_MODES))
    host = StringField("Relay host", validators=[Length(max=255)])
    port = IntegerField(
        "Relay port", default=587, validators=[Optional(), NumberRange(min=1, max=65535)]
    )
    security = SelectField(
        "Relay security", choices=_choices(list(SECURITY.items())), default="starttls"
    )
    username = StringField(
        "Relay user name",
        description="Empty: the relay takes mail without a login.",
        validators=[Optional(), Length(max=255)],
    )
    password = PasswordField(
        "Relay password",
        description="Stored encrypted. Leave empty to keep the stored one.",
        validators=[Optional(), Length(max=1024)],
    )
    clear_password = BooleanField("Remove the stored relay password")
    from_address = StringField("From address", validators=[address_rule, Length(max=254)])
    account = SelectField("Sending mailbox", choices=[], coerce=str, validate_choice=False)
    failing_minutes = IntegerField(
        "Tell about a token endpoint refusing after (minutes)",
        default=60,
        validators=[NumberRange(min=1, max=10080, message="Enter 1 to 10080 minutes.")],
    )

    def validate_host(self, field: StringField) -> None:
        if self.mode.data == "relay":
            if not field.data:
                raise ValidationError("Enter the relay's host name.")
            refusal = relay_refusal(field.data, self.security.data)
            if refusal:
                raise ValidationError(refusal)

    def validate_from_address(self, field: StringField) -> None:
        if self.mode.data == "relay" and not field.data:
            raise ValidationError("Enter the address notifications come from.")

    def validate_account(self, field: SelectField) -> None:
        if self.mode.data == "mailbox":
            if field.data not in {c.value for c in field.choices}:  # type: ignore[union-attr]
                raise ValidationError("Choose one of your linked mailboxes.")
