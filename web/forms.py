"""Forms, one class per screen; ``validate_<field>`` methods hold the checks that need the data."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from flask_wtf import FlaskForm
from markupsafe import Markup
from wtforms import (
    BooleanField,
    DateField,
    EmailField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    SubmitField,
    TextAreaField,
    URLField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import (
    DataRequired,
    EqualTo,
    Length,
    NumberRange,
    Optional,
    ValidationError,
)
from wtforms.widgets import HiddenInput

from config import is_loopback_host
from mailboxes import smtpdelivery
from models import OAuthClient, User
from oauth import grants, providers
from people import addresses
from web.fields import control

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


def address_rule(form: FlaskForm, field: StringField) -> None:
    """The one address rule (``addresses``): internal domains such as ``.test`` are fine."""
    if field.data and not addresses.is_valid(field.data):
        raise ValidationError(addresses.MESSAGE)


def _email(label: str = "Email") -> EmailField:
    return EmailField(
        label,
        validators=[
            DataRequired(message="Enter an email address."),
            address_rule,
            Length(max=254),
        ],
        # Cut to one past the limit: the length error still shows, and a page never echoes
        # megabytes back.
        filters=[lambda v: v.strip().lower()[:255] if isinstance(v, str) else v],
    )


class Form(FlaskForm):
    """The base of every form: its hidden fields carry no id, so that a page with several forms
    (each with its CSRF token) still has unique ids."""

    def hidden_tag(self, *fields: Any) -> Markup:
        hidden = fields or [f for f in self if isinstance(f.widget, HiddenInput)]
        return Markup("\n".join(control(f, {"id": False}) for f in hidden))


class EmptyForm(Form):
    """For buttons that change state: a POST carrying only the CSRF token."""

    submit = SubmitField("Submit")


class LoginForm(Form):
    email = _email()
    password = PasswordField("Password", validators=[DataRequired()])
    remember = BooleanField("Keep me signed in on this device")
    submit = SubmitField("Sign in")


class SetupForm(Form):
    email = _email()
    password = _new_password()
    confirm = _confirm()
    submit = SubmitField("Create administrator")


class InviteAcceptForm(Form):
    password = _new_password()
    confirm = _confirm()
    submit = SubmitField("Set password")


class PasswordChangeForm(Form):
    current = PasswordField("Current password", validators=[DataRequired()])
    password = _new_password("New password")
    confirm = _confirm("Repeat new password")
    submit = SubmitField("Change password")


class NewUserForm(Form):
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


class ResetPasswordForm(Form):
    password = _new_password("New password")
    submit = SubmitField("Set password")


class InstanceSettingsForm(Form):
    new_users_custom_clients = BooleanField("New users may add custom OAuth clients")
    allow_ropc = BooleanField(
        "Allow the legacy Resource Owner Password grant (Microsoft; fails with MFA)"
    )
    submit = SubmitField("Save settings")


# --- Custom OAuth clients (the client editor and the admin's instance defaults) ---------------

_GUID = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}", re.IGNORECASE)
_DOMAIN = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?",
    re.IGNORECASE,
)
# Multi-tenant aliases: they name no directory, so only a user's sign-in can pick one.
_TENANT_ALIASES = {"organizations", "common", "consumers"}
_SECURITY_CHOICES = [("tls", "TLS"), ("starttls", "STARTTLS"), ("plain", "Plain (loopback only)")]


def _choices(pairs: list[tuple[str, str]]) -> list[SelectChoice]:
    return [SelectChoice(value, label) for value, label in pairs]


_SERVER_LABELS = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}


def https_url_error(value: str) -> str | None:
    """Why ``value`` is not an acceptable endpoint: https, or http only for a loopback host."""
    parts = urlsplit(value)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        return "Enter a full URL starting with https://."
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "Use https:// (plain http:// is only allowed for a loopback host such as 127.0.0.1)."
    return grants.host_policy().refusal(parts.hostname)


def _strip(value: str | None) -> str | None:
    return value.strip() if isinstance(value, str) else value


def _host(label: str) -> StringField:
    return StringField(f"{label} server", filters=[_strip])


def _port(label: str, default: int) -> IntegerField:
    return IntegerField(
        f"{label} port",
        default=default,
        validators=[
            Optional(),
            NumberRange(min=1, max=65535, message="Enter a port from 1 to 65535."),
        ],
    )


def _security(label: str, default: str) -> SelectField:
    return SelectField(f"{label} security", choices=_choices(_SECURITY_CHOICES), default=default)


class ClientForm(Form):
    """The client editor. Which fields are required depends on the provider and the grant.

    The secret is write-only: the form never carries the stored value, and blank on edit keeps it.
    """

    name = StringField(
        "Name",
        validators=[DataRequired(message="Give the client a name."), Length(max=100)],
        filters=[_strip],
    )
    provider = SelectField(
        "Service provider",
        choices=_choices(providers.choices()),
        description="Where the mailboxes are hosted.",
    )
    grant = SelectField(
        "OAuth flow / grant",
        choices=_choices(providers.grant_choices()),
        description="How the mailbox's permission is obtained. Authorization Code: each person "
        "signs in once in the browser (the usual choice). Device Code: they sign in on another "
        "device with a code. Client Credentials: the app itself, for mailboxes an Exchange "
        "administrator assigned to it.",
    )
    tenant = StringField(
        "Directory (tenant) ID",
        description="The directory's GUID or a domain such as contoso.onmicrosoft.com.",
        filters=[_strip],
    )
    authorize_url = URLField(
        "Permission URL",
        filters=[_strip],
        description="The page where people sign in and allow access (the authorize endpoint).",
    )
    token_url = URLField(
        "Token URL",
        filters=[_strip],
        description="Where Auth-Email gets and renews the tokens (the token endpoint).",
    )
    device_url = URLField(
        "Device authorization URL",
        filters=[_strip],
        description="Where the sign-in code for another device is requested.",
    )
    scope = TextAreaField(
        "OAuth scope",
        filters=[lambda v: " ".join(v.split()) if v else v],
        description="The permissions asked for, separated by spaces; the default fits mail.",
    )
    client_id = StringField(
        "Client ID",
        validators=[DataRequired(message="Enter the client ID.")],
        filters=[_strip],
        description="The app registration's ID (at Microsoft: Application (client) ID).",
    )
    client_secret = PasswordField("Client secret", validators=[Length(max=4096)])
    clear_secret = BooleanField("Remove the stored secret (a public client has none)")
    secret_expires_on = DateField(
        "Secret expires on",
        validators=[Optional()],
        invalid_value_message="Enter a date like 2026-12-31.",
        description="Optional. You get a warning 30 and 7 days before.",
    )
    imap_host = _host("IMAP")
    imap_port = _port("IMAP", 993)
    imap_security = _security("IMAP", "tls")
    pop3_host = _host("POP3")
    pop3_port = _port("POP3", 995)
    pop3_security = _security("POP3", "tls")
    smtp_host = _host("SMTP")
    smtp_port = _port("SMTP", 587)
    smtp_security = _security("SMTP", "starttls")
    sasl_mechanism = SelectField(
        "SASL mechanism",
        choices=[SelectChoice(m) for m in providers.MECHANISMS],
        default="XOAUTH2",
        description="How the token is handed to the mail server: XOAUTH2 (Microsoft, Google "
        "and most others) or OAUTHBEARER (the standard, RFC 7628).",
    )
    revocation_url = URLField(
        "Revocation URL",
        filters=[_strip],
        description="Optional: where tokens are revoked when an account is removed.",
    )
    smtp_delivery = SelectField(
        "How mail from devices goes out",
        choices=[SelectChoice(k, v) for k, v in smtpdelivery.MODES.items()],
        default=smtpdelivery.AUTO,
        description=(
            "The default of this client's mailboxes (each account can choose its own). "
            "Microsoft Graph is for tenants that turn SMTP AUTH off; it needs the Mail.Send "
            "permission of Microsoft Graph."
        ),
    )
    submit = SubmitField("Save client")
    load_defaults = SubmitField("Load defaults")

    def __init__(
        self,
        *args: Any,
        owner: User | None = None,
        existing: Any = None,
        ropc_allowed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        self.existing = existing
        self.ropc_allowed = ropc_allowed

    @property
    def preset(self) -> providers.Preset:
        # An unknown provider fails its own field; check the rest as for a custom server.
        return providers.PRESETS.get(self.provider.data or "") or providers.get(providers.OTHER)

    def validate_name(self, field: StringField) -> None:
        owner = self.existing.owner if self.existing is not None else self.owner
        query = OAuthClient.select().where(
            (OAuthClient.owner == owner) & (OAuthClient.name == field.data)
        )
        if self.existing is not None:
            query = query.where(OAuthClient.id != self.existing.id)
        if query.exists():
            raise ValidationError(f"You already have a client named “{field.data}”.")

    def validate_grant(self, field: SelectField) -> None:
        if self.provider.data not in providers.PRESETS:
            return
        if field.data not in self.preset.grants:
            label = providers.GRANT_LABELS.get(field.data, field.data)
            raise ValidationError(f"{self.preset.name} does not allow the {label} grant.")
        if field.data == providers.PASSWORD and not self.ropc_allowed:
            raise ValidationError(
                "The Resource Owner Password grant is turned off on this instance; "
                "ask the administrator to allow it."
            )

    def validate_tenant(self, field: StringField) -> None:
        if not self.preset.has_tenant:
            return
        value = field.data or ""
        if not value:
            raise ValidationError(
                "Enter the Directory (tenant) ID: a GUID or a domain such as "
                "contoso.onmicrosoft.com."
            )
        if value.lower() in _TENANT_ALIASES:
            if self.grant.data == providers.CLIENT_CREDENTIALS:
                raise ValidationError(
                    f"Client Credentials needs your directory's own tenant: “{value}” names no "
                    "directory. Enter the Directory (tenant) ID (a GUID) or its domain."
                )
            if value.lower() == "consumers":
                raise ValidationError(
                    "“consumers” is for personal Microsoft accounts: choose the Outlook.com "
                    "provider instead."
                )
            return
        if not (_GUID.fullmatch(value) or _DOMAIN.fullmatch(value)):
            raise ValidationError("A tenant is a GUID or a domain such as contoso.onmicrosoft.com.")

    def validate_client_id(self, field: StringField) -> None:
        if self.preset.is_microsoft and not _GUID.fullmatch(field.data or ""):
            raise ValidationError(
                "A Microsoft client ID is a GUID: the Application (client) ID of the app "
                "registration, like 00000000-0000-0000-0000-000000000000."
            )

    def validate_client_secret(self, field: PasswordField) -> None:
        """Only Client Credentials needs a secret: Device Code, Authorization Code with PKCE
        and the password grant work as public clients (and Entra refuses a secret from a
        public client, AADSTS700025)."""
        if self.grant.data != providers.CLIENT_CREDENTIALS:
            return
        keeps = (
            self.existing is not None
            and self.existing.client_secret
            and not (self.clear_secret.data)
        )
        if not field.data and not keeps:
            raise ValidationError(
                "Enter the client secret: with Client Credentials the app signs in as itself."
            )

    def validate(self, extra_validators: Any = None) -> bool:
        """The field checks, then the ones that depend on the provider and grant."""
        valid = super().validate(extra_validators)
        if self.provider.errors:
            return False
        for name, message in self._conditional_errors():
            getattr(self, name).errors.append(message)
            valid = False
        return valid

    def _conditional_errors(self) -> list[tuple[str, str]]:
        grant = self.grant.data
        required = {"token_url": "Enter the Token URL."}
        if grant == providers.AUTHORIZATION_CODE:
            required["authorize_url"] = "Enter the Permission URL (the authorize endpoint)."
        if grant == providers.DEVICE_CODE:
            required["device_url"] = "Enter the device authorization URL."
        found = []
        for name in (*providers.URL_FIELDS, "revocation_url"):
            value = getattr(self, name).data
            if value:
                error = https_url_error(value)
                if error:
                    found.append((name, error))
            elif name in required:
                found.append((name, required[name]))
        if not self.scope.data:
            found.append(("scope", "Enter at least one scope."))
        if self.preset.is_custom:
            found.extend(self._server_errors())
        return found

    def _server_errors(self) -> list[tuple[str, str]]:
        found = []
        for proto, label in _SERVER_LABELS.items():
            host = getattr(self, f"{proto}_host").data
            port = getattr(self, f"{proto}_port")
            if not host:
                found.append((f"{proto}_host", f"Enter the {label} server's host name."))
            elif not _DOMAIN.fullmatch(host) and not _is_ip(host) and host != "localhost":
                found.append((f"{proto}_host", "Enter a host name or an IP address."))
            elif refusal := grants.host_policy().refusal(host):
                found.append((f"{proto}_host", refusal))
            elif getattr(self, f"{proto}_security").data == "plain" and not is_loopback_host(host):
                found.append(
                    (
                        f"{proto}_security",
                        "Plain connections are only allowed to a loopback host "
                        "(127.0.0.1, localhost); use TLS or STARTTLS.",
                    )
                )
            if port.data is None and not port.errors:
                found.append((f"{proto}_port", "Enter a port from 1 to 65535."))
        return found


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class DefaultClientsForm(Form):
    """The admin's choice, per provider, of the client behind the main authorize button.

    Built per request by ``build``: one select per provider, listing the clients that may serve.
    """

    submit = SubmitField("Save default clients")

    @classmethod
    def build(cls, options: dict[str, list[tuple[str, str]]], **kwargs: Any) -> DefaultClientsForm:
        """``options`` maps provider key -> [(client id, label)]; "" means none."""
        fields = {
            f"default_{key}": SelectField(
                providers.get(key).name,
                choices=_choices([("", "None: custom clients only"), *choices]),
                validate_choice=False,
            )
            for key, choices in options.items()
        }
        return type("BoundDefaultClientsForm", (cls,), fields)(**kwargs)


class DeleteClientForm(Form):
    """Delete a client; when accounts use it, the user picks ``reauth`` (or cancels by a link)."""

    delete = SubmitField("Delete client")
    reauth = SubmitField("Delete and mark these accounts “needs re-authorization”")
