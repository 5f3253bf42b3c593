"""The tables, and the queries that belong to them (as model methods).

Every secret column is an ``EncryptedField``; a row that holds one is a ``SecretModel`` whose
``uid`` binds the ciphertext to that row.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from enum import StrEnum
from typing import Any

import flask
import peewee as pw
from flask_login import UserMixin

from store.db import BaseModel, EncryptedField, Prepared, SecretModel


def utcnow() -> dt.datetime:
    """Naive UTC, the form stored in every DateTimeField."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Meta(BaseModel):
    """Instance facts kept with the data, such as the schema version."""

    key = pw.CharField(primary_key=True, max_length=64)
    value = pw.TextField()


class Setting(BaseModel):
    """Settings the admin changes in the UI (defaults come from config)."""

    key = pw.CharField(primary_key=True, max_length=64)
    value = pw.TextField()

    @classmethod
    def read(cls, key: str, default: str | None = None) -> str | None:
        """A setting's value. In a web request every setting is read at once, on the first read,
        and kept for the rest of that request (a dashboard reads a dozen)."""
        known = _request_settings()
        if known is not None:
            return known.get(key, default)
        rows = _setting_by_key(key)
        return rows[0].value if rows else default

    @classmethod
    def write(cls, key: str, value: str | None) -> None:
        if value is None:
            cls.delete().where(cls.key == key).execute()
        else:
            cls.insert(key=key, value=value).on_conflict(
                conflict_target=[cls.key], update={cls.value: value}
            ).execute()
            known = _request_settings(load=False)
            if known is not None:
                known[key] = value

    @classmethod
    def delete(cls) -> pw.ModelDelete:
        """Any delete makes the request's copy read again (its condition may be on the value)."""
        if flask.has_request_context():
            flask.g.pop("settings", None)
        return super().delete()


_setting_by_key = Prepared(lambda key: Setting.select().where(Setting.key == key))
_all_settings = Prepared(lambda: Setting.select())


def _request_settings(load: bool = True) -> dict[str, str] | None:
    """The current web request's copy of every setting (None outside a request).

    Kept on ``g`` together with the request it belongs to: a test's app context can outlive
    several requests, and each request reads afresh."""
    if not flask.has_request_context():
        return None
    request = flask.request._get_current_object()  # type: ignore[attr-defined]
    held = flask.g.get("settings")
    if held is not None and held[0] is request:
        return held[1]  # type: ignore[no-any-return]
    if not load:
        return None
    values = {row.key: row.value for row in _all_settings()}
    flask.g.settings = (request, values)
    return values


class User(UserMixin, BaseModel):
    email = pw.CharField(unique=True, max_length=254)
    password_hash = pw.CharField(max_length=255)
    is_admin = pw.BooleanField(default=False)
    is_enabled = pw.BooleanField(default=True)
    can_custom_clients = pw.BooleanField(default=False)
    # Bumped on password change or disable: sessions carrying an older value end.
    session_version = pw.IntegerField(default=1)
    created_at = pw.DateTimeField(default=utcnow)
    last_login_at = pw.DateTimeField(null=True)

    @property
    def is_active(self) -> bool:  # flask-login
        return bool(self.is_enabled)

    def get_id(self) -> str:
        return f"{self.id}:{self.session_version}"

    @property
    def may_use_custom_clients(self) -> bool:
        return bool(self.is_admin or self.can_custom_clients)

    @classmethod
    def by_email(cls, email: str) -> User | None:
        return cls.get_or_none(cls.email == email.strip().lower())


class Invite(BaseModel):
    """A one-time, expiring link by which someone sets their own password."""

    token_hash = pw.CharField(unique=True, max_length=64)
    email = pw.CharField(max_length=254)
    can_custom_clients = pw.BooleanField(default=False)
    created_by = pw.ForeignKeyField(User, on_delete="CASCADE")
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)


class AuditEvent(BaseModel):
    """Who did what, when, from where. Never holds a secret."""

    at = pw.DateTimeField(default=utcnow, index=True)
    actor = pw.ForeignKeyField(User, null=True, on_delete="SET NULL", backref="audit_events")
    actor_id: int | None  # peewee's column of the foreign key
    actor_email = pw.CharField(max_length=254, default="")
    ip = pw.CharField(max_length=64, default="")
    action = pw.CharField(max_length=64)
    target = pw.CharField(max_length=255, default="")
    detail = pw.TextField(default="")


class Throttle(BaseModel):
    """Failure counts per key (an address or an IP) shared by web and mail logins."""

    key = pw.CharField(primary_key=True, max_length=320)
    failures = pw.IntegerField(default=0)
    last_failure_at = pw.DateTimeField(default=utcnow)
    blocked_until = pw.DateTimeField(null=True)


class OAuthClient(SecretModel):
    """An app registration (Entra, Google, ...) a user added, or the instance's default one."""

    owner = pw.ForeignKeyField(User, on_delete="CASCADE", backref="clients")
    owner_id: int  # peewee's column of the foreign key
    name = pw.CharField(max_length=100)
    provider = pw.CharField(max_length=32)
    grant = pw.CharField(max_length=32, default="authorization_code")
    tenant = pw.CharField(max_length=255, default="")
    authorize_url = pw.CharField(max_length=1000, default="")
    token_url = pw.CharField(max_length=1000)
    device_url = pw.CharField(max_length=1000, default="")
    revocation_url = pw.CharField(max_length=1000, default="")
    scope = pw.TextField()
    client_id = pw.CharField(max_length=255)
    client_secret = EncryptedField(null=True)
    secret_set_at = pw.DateTimeField(null=True)
    # For a certificate credential: the certificate's last day (expiry warnings read this).
    secret_expires_on = pw.DateField(null=True)
    # "secret" (client_secret_basic) or "certificate" (private_key_jwt, RFC 7523).
    credential = pw.CharField(max_length=16, default="secret")
    private_key = EncryptedField(null=True)  # PEM (PKCS#8) of the certificate's key
    certificate = pw.TextField(default="")  # PEM, public: what the app registration holds
    shared = pw.BooleanField(default=False)
    # Mail servers; used by "Other (custom server)", presets bring their own.
    imap_host = pw.CharField(max_length=255, default="")
    imap_port = pw.IntegerField(null=True)
    imap_security = pw.CharField(max_length=10, default="tls")
    pop3_host = pw.CharField(max_length=255, default="")
    pop3_port = pw.IntegerField(null=True)
    pop3_security = pw.CharField(max_length=10, default="tls")
    smtp_host = pw.CharField(max_length=255, default="")
    smtp_port = pw.IntegerField(null=True)
    smtp_security = pw.CharField(max_length=10, default="starttls")
    sasl_mechanism = pw.CharField(max_length=16, default="XOAUTH2")
    # Microsoft 365: how mail from devices goes out by default (see smtpdelivery.MODES).
    smtp_delivery = pw.CharField(max_length=8, default="smtp")
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("owner", "name"), True),)

    @classmethod
    def usable_by(cls, user: User) -> pw.ModelSelect[OAuthClient]:
        """Clients the user may authorize with: their own (if permitted) and shared ones."""
        query = cls.select().where(cls.shared == True)  # noqa: E712
        if user.may_use_custom_clients:
            query = cls.select().where((cls.owner == user) | (cls.shared == True))  # noqa: E712
        return query.order_by(cls.name)

    @classmethod
    def list_usable_by(cls, user: User) -> list[OAuthClient]:
        """``usable_by`` as a list, from a query built once (every account page shows it)."""
        if user.may_use_custom_clients:
            return cls.list_own_or_shared(user)
        return _shared_clients(True)

    @classmethod
    def list_own_or_shared(cls, user: User) -> list[OAuthClient]:
        """The user's own clients and every shared one, by name (a query built once)."""
        return _own_or_shared_clients(user.id, True)

    @classmethod
    def editable_by(cls, user: User) -> pw.ModelSelect[OAuthClient]:
        """Own clients; the admin also edits shared ones."""
        if user.is_admin:
            return cls.select().where((cls.owner == user) | (cls.shared == True))  # noqa: E712
        return cls.select().where(cls.owner == user)


LINKED_ADDRESS_INDEX = "account_linked_address"


class AccountStatus(StrEnum):
    """Where a linked mailbox stands; every change goes through ``Account.set_status``.

    pending --authorized, upstream login verified--> active
    active | error --"Test sign-in" or re-authorization--> active | error
    active | error --grant refused (token refresh, client deleted)--> needs_reauth
    (imported from email-oauth2-proxy) --> needs_reauth --re-authorized and verified--> active
    Only active accounts relay mail; pending and needs_reauth ones ask for an authorization.
    """

    PENDING = "pending"
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    ERROR = "error"
    DISABLED = "disabled"

    @property
    def label(self) -> str:
        return _STATUS_TEXT[self][0]

    @property
    def phrase(self) -> str:
        """The status in a sentence ("not usable yet (sign-in failed)")."""
        return _STATUS_TEXT[self][1]

    @property
    def explanation(self) -> str:
        return _STATUS_TEXT[self][2]

    @property
    def works(self) -> bool:
        return self is AccountStatus.ACTIVE

    @property
    def testable(self) -> bool:
        """A sign-in check may (re)decide between active and error."""
        return self in (AccountStatus.ACTIVE, AccountStatus.ERROR)

    @property
    def needs_attention(self) -> bool:
        return self in (AccountStatus.NEEDS_REAUTH, AccountStatus.ERROR)

    @property
    def needs_authorization(self) -> bool:
        return self in (AccountStatus.NEEDS_REAUTH, AccountStatus.PENDING)


# status -> (badge label, the status in a sentence, what it means for the mailbox)
_STATUS_TEXT = {
    AccountStatus.PENDING: (
        "Pending",
        "Authorization not finished",
        "The authorization was not finished.",
    ),
    AccountStatus.ACTIVE: ("Active", "Active", "This mailbox works through Auth-Email."),
    AccountStatus.NEEDS_REAUTH: (
        "Needs re-authorization",
        "Needs re-authorization",
        "The provider no longer accepts this mailbox's authorization: authorize it again "
        "(your mail-client passwords stay).",
    ),
    AccountStatus.ERROR: ("Error", "Sign-in failed", "The last sign-in check failed."),
    AccountStatus.DISABLED: ("Disabled", "Disabled", "This mailbox is disabled."),
}


class Account(SecretModel):
    """A linked mailbox: its tokens (encrypted) and the state of its authorization.

    An address is unique per user, and unique in the instance only once linked (any status but
    ``pending``): each user who starts linking an address gets their own pending placeholder,
    whoever else has it, so that trying an address tells nothing about other users' mailboxes.
    """

    owner = pw.ForeignKeyField(User, on_delete="CASCADE", backref="accounts")
    address = pw.CharField(max_length=254)
    provider = pw.CharField(max_length=32)
    client = pw.ForeignKeyField(OAuthClient, null=True, on_delete="SET NULL", backref="accounts")
    owner_id: int  # peewee's columns of the foreign keys, and a backref
    client_id: int | None
    passwords: pw.ModelSelect
    status = pw.CharField(max_length=16, default=AccountStatus.PENDING.value)
    status_detail = pw.TextField(default="")
    # The identity that signed in, when it differs from the mailbox (shared mailboxes).
    signed_in_as = pw.CharField(max_length=254, default="")
    access_token = EncryptedField(null=True)
    refresh_token = EncryptedField(null=True)
    token_expires_at = pw.DateTimeField(null=True)
    # Compare-and-swap counter: one refresh at a time across threads and processes.
    token_version = pw.IntegerField(default=0)
    refresh_claimed_until = pw.DateTimeField(null=True)
    last_refresh_at = pw.DateTimeField(null=True)
    last_error = pw.TextField(default="")
    # The scope the provider granted (its token response's ``scope``): a refresh never asks
    # for more. Empty when the provider did not say.
    granted_scope = pw.TextField(default="")
    # A refresh that failed is remembered here, so that logins meanwhile get the reason at once
    # and the token endpoint is asked again only at ``next_refresh_at`` (back-off, Retry-After).
    refresh_failures = pw.IntegerField(default=0)
    refresh_failing_since = pw.DateTimeField(null=True)
    next_refresh_at = pw.DateTimeField(null=True)
    refresh_error_kind = pw.CharField(max_length=16, default="")
    # Per protocol (imap, pop3, smtp): the mail server's last refusal of a fresh token, as JSON
    # (see ``upstream_state``). Empty while every protocol works.
    protocol_state = pw.TextField(default="")
    last_used_at = pw.DateTimeField(null=True)
    last_used_ip = pw.CharField(max_length=64, default="")
    bytes_relayed = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField(default=utcnow)
    # Microsoft Graph delivery (smtpdelivery.py, graphsend.py): the mode ("" = the client's),
    # the separate Graph access token, and when the tenant refused SMTP AUTH by policy.
    smtp_delivery = pw.CharField(max_length=8, default="")
    graph_access_token = EncryptedField(null=True)
    graph_token_expires_at = pw.DateTimeField(null=True)
    smtp_auth_refused_at = pw.DateTimeField(null=True)
    smtp_auth_refused_detail = pw.TextField(default="")

    class Meta:
        indexes = ((("owner", "address"), True),)

    @classmethod
    def owned_by(cls, user: User) -> pw.ModelSelect[Account]:
        return cls.select().where(cls.owner == user)

    @classmethod
    def linked(cls) -> pw.ModelSelect[Account]:
        """Accounts past their placeholder stage: at most one per address in the instance."""
        return cls.select().where(cls.status != AccountStatus.PENDING.value)

    @classmethod
    def linked_at(cls, address: str) -> Account | None:
        """The account that holds ``address`` in this instance, if any (never a placeholder)."""
        return cls.linked().where(cls.address == address).first()

    @property
    def state(self) -> AccountStatus:
        return AccountStatus(self.status)

    @classmethod
    def set_status(
        cls, where: Any, status: AccountStatus | str, detail: str = "", **also: Any
    ) -> int:
        """The one place an account's status changes (with ``also``: other columns in the same
        UPDATE); ``where`` selects the accounts. See ``AccountStatus`` for the transitions."""
        status = AccountStatus(status)
        return cls.update(status=status.value, status_detail=detail, **also).where(where).execute()

    @classmethod
    def owned_with_client(cls, user: User, account_id: int) -> Account | None:
        """The user's account ``account_id`` with its client loaded in the same query."""
        rows = _owned_account(user.id, account_id)
        return rows[0] if rows else None

    @classmethod
    def list_owned_with_clients(cls, user: User) -> list[Account]:
        """The user's accounts by address, each with its client (the home page)."""
        return _owned_accounts(user.id)

    def has_tokens(self) -> bool:
        return self.has_secret("refresh_token") or self.has_secret("access_token")


# The instance-wide uniqueness of linked addresses (a partial index: placeholders are left out).
Account.add_index(
    Account.index(
        Account.address,
        unique=True,
        where=(Account.status != AccountStatus.PENDING.value),
        name=LINKED_ADDRESS_INDEX,
    )
)


class MailPassword(BaseModel):
    """A password a mail client uses for one account (one per device), stored as a hash.

    ``lookup`` is a keyed digest of (address, password) under the instance's secret
    ``mail_password_lookup``: a login finds the one candidate to verify without hashing against
    every password of the account, so a failed login costs the same whoever it names. Rows from
    before migration 4 have none until their password is next used.
    """

    account = pw.ForeignKeyField(Account, on_delete="CASCADE", backref="passwords")
    label = pw.CharField(max_length=100)
    password_hash = pw.CharField(max_length=255)
    lookup = pw.CharField(max_length=64, null=True, index=True)
    created_at = pw.DateTimeField(default=utcnow)
    last_used_at = pw.DateTimeField(null=True)
    last_used_ip = pw.CharField(max_length=64, default="")
    # The addresses this password was used from (space separated, the latest 20): a login from
    # one not among them is a "new address" notification.
    known_ips = pw.TextField(default="")

    @classmethod
    def note_use(cls, password_id: int, ip: str) -> bool:
        """Record a use from ``ip``; True when the password was used before, from elsewhere."""
        row = cls.get_or_none(cls.id == password_id)
        if row is None:
            return False
        known = row.known_ips.split() or ([row.last_used_ip] if row.last_used_ip else [])
        ip = ip[:64]
        new = bool(known) and ip not in known
        if ip and ip not in known:
            known = [*known, ip][-20:]
        cls.update(last_used_at=utcnow(), last_used_ip=ip, known_ips=" ".join(known)).where(
            cls.id == password_id
        ).execute()
        return new

    @classmethod
    def of_account(cls, account_id: int) -> list[MailPassword]:
        """An account's mail-client passwords, oldest first (the account page lists them)."""
        return _passwords_of(account_id)


class PendingAuthorization(SecretModel):
    """An authorization in flight (state, PKCE verifier or device code), kept server-side."""

    state = pw.CharField(unique=True, max_length=64)
    owner = pw.ForeignKeyField(User, on_delete="CASCADE")
    account = pw.ForeignKeyField(Account, on_delete="CASCADE")
    client = pw.ForeignKeyField(OAuthClient, on_delete="CASCADE")
    code_verifier = EncryptedField(null=True)
    device_code = EncryptedField(null=True)
    user_code = pw.CharField(max_length=64, default="")
    verification_uri = pw.CharField(max_length=1000, default="")
    interval = pw.IntegerField(default=5)
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField()
    consumed_at = pw.DateTimeField(null=True)


class InstanceSecret(SecretModel):
    """A secret of the instance itself, kept encrypted with the others (rotated with them)."""

    name = pw.CharField(unique=True, max_length=64)
    value = EncryptedField()

    @classmethod
    def value_of(cls, name: str) -> str:
        """The secret called ``name``, made (random, 256 bits) the first time it is asked for."""
        row = cls.get_or_none(cls.name == name)
        if row is None:
            try:
                with cls._meta.database.atomic():
                    cls.create(name=name, value=secrets.token_hex(32))
            except pw.IntegrityError:
                pass  # another process made it first
            row = cls.get(cls.name == name)
        return str(row.value)


MAIL_LOOKUP_SECRET = "mail_password_lookup"
NOTIFY_RELAY_PASSWORD = "notify_relay_password"


# ---------------------------------------------------------------------------------- notifications
#: Event kinds a person can be told about (mailboxes/notifications.py gives their words).
NOTIFY_KINDS = ("reauth", "policy_refusal", "renewal_failing", "credential_expiring", "new_ip")
NOTIFY_CHANNELS = ("email", "webhook")
#: Minutes a token endpoint must keep refusing before "renewal_failing" is sent (admin setting).
FAILING_MINUTES_KEY = "notify_failing_minutes"
FAILING_MINUTES_DEFAULT = 60


class NotificationSettings(SecretModel):
    """One person's choice of events and channels; the webhook's signing secret is encrypted.

    No row: every event, by email to the login address (when the instance has a sender).
    """

    user = pw.ForeignKeyField(User, unique=True, on_delete="CASCADE", backref="notify_settings")
    kinds = pw.TextField(default=" ".join(NOTIFY_KINDS))
    email_enabled = pw.BooleanField(default=True)
    webhook_enabled = pw.BooleanField(default=False)
    webhook_url = pw.CharField(max_length=2000, default="")
    webhook_secret = EncryptedField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)

    @classmethod
    def of(cls, user_id: int) -> NotificationSettings:
        """The stored row, or an unsaved one with the defaults."""
        found = _notification_settings_of(user_id)
        return found[0] if found else cls(user=user_id)

    def wants(self, kind: str) -> bool:
        return kind == "test" or kind in self.kinds.split()


class Notification(BaseModel):
    """The outbox: one message for one channel, sent in the background (notifications.py).

    ``dedup`` (kind, subject and day) is unique per person and channel: the same event about the
    same mailbox is told once a day, however many processes notice it. Never holds a secret.
    """

    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="notifications")
    account = pw.ForeignKeyField(Account, null=True, on_delete="SET NULL")
    user_id: int
    account_id: int | None
    kind = pw.CharField(max_length=32)
    subject = pw.CharField(max_length=254, default="")  # the mailbox, or the client's name
    dedup = pw.CharField(max_length=400)
    channel = pw.CharField(max_length=16)
    title = pw.CharField(max_length=300, default="")
    detail = pw.TextField(default="")
    status = pw.CharField(max_length=16, default="pending")  # pending, sent, failed
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(default=utcnow, index=True)
    claimed_until = pw.DateTimeField(null=True)
    last_error = pw.TextField(default="")
    created_at = pw.DateTimeField(default=utcnow)
    sent_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("user", "dedup", "channel"), True),)

    @classmethod
    def raise_event(
        cls,
        user_id: int,
        kind: str,
        subject: str,
        title: str,
        detail: str = "",
        *,
        account_id: int | None = None,
        period: str | None = None,
    ) -> int:
        """Queue ``kind`` about ``subject`` on each channel the person chose; returns how many
        messages were queued (0 when already told today, or nothing is chosen).

        :param period: what "once" means (default: today's date, UTC).
        """
        prefs = NotificationSettings.of(user_id)
        if not prefs.wants(kind):
            return 0
        channels = []
        if prefs.email_enabled and Setting.read("notify_sender"):
            channels.append("email")
        if prefs.webhook_enabled and prefs.webhook_url and prefs.has_secret("webhook_secret"):
            channels.append("webhook")
        key = f"{kind}|{subject}|{period or utcnow().date().isoformat()}"[:400]
        queued = 0
        try:
            # a savepoint: the callers' own transaction (a recorded refusal) never fails for it
            with cls._meta.database.atomic():
                for channel in channels:
                    queued += (
                        cls.insert(
                            user=user_id,
                            account=account_id,
                            kind=kind,
                            subject=subject[:254],
                            dedup=key,
                            channel=channel,
                            title=title[:300],
                            detail=detail[:4000],
                        )
                        .on_conflict_ignore()
                        .as_rowcount()
                        .execute()
                    )
        except pw.PeeweeException as error:
            logging.getLogger("auth_email.notifications").warning(
                "notification %s about %s not queued: %s", kind, subject, error
            )
            return 0
        return queued

    @classmethod
    def failing_minutes(cls) -> int:
        try:
            return max(1, int(Setting.read(FAILING_MINUTES_KEY) or FAILING_MINUTES_DEFAULT))
        except ValueError:
            return FAILING_MINUTES_DEFAULT


SECRET_MODELS: list[Any] = [
    OAuthClient,
    Account,
    PendingAuthorization,
    InstanceSecret,
    NotificationSettings,
]
ALL_MODELS: list[Any] = [
    Meta,
    Setting,
    User,
    Invite,
    AuditEvent,
    Throttle,
    OAuthClient,
    Account,
    MailPassword,
    PendingAuthorization,
    InstanceSecret,
    NotificationSettings,
    Notification,
]


# Queries of every page view, built once (see store.db.Prepared). Constants are arguments too:
# a prepared query's parameters are exactly its arguments, in order.
_shared_clients = Prepared(
    lambda shared: (
        OAuthClient.select().where(OAuthClient.shared == shared).order_by(OAuthClient.name)
    )
)
_own_or_shared_clients = Prepared(
    lambda owner_id, shared: (
        OAuthClient.select()
        .where((OAuthClient.owner == owner_id) | (OAuthClient.shared == shared))
        .order_by(OAuthClient.name)
    )
)
_owned_account = Prepared(
    lambda owner_id, account_id: (
        Account.select(Account, OAuthClient)
        .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=Account.client == OAuthClient.id)
        .where(Account.owner == owner_id, Account.id == account_id)
    )
)
_owned_accounts = Prepared(
    lambda owner_id: (
        Account.select(Account, OAuthClient)
        .join(OAuthClient, pw.JOIN.LEFT_OUTER, on=Account.client == OAuthClient.id)
        .where(Account.owner == owner_id)
        .order_by(Account.address)
    )
)
_passwords_of = Prepared(
    lambda account_id: (
        MailPassword.select()
        .where(MailPassword.account == account_id)
        .order_by(MailPassword.created_at, MailPassword.id)
    )
)
_notification_settings_of = Prepared(
    lambda user_id: NotificationSettings.select().where(NotificationSettings.user == user_id)
)
