"""Moving over from email-oauth2-proxy: its ``emailproxy.config`` as clients and accounts.

The file is an INI file: server sections (``[IMAP-1993]``, ``[POP-1995]``, ``[SMTP-1587]``) name
the upstream servers its local ports relay to; a section per account (its address as the heading)
holds the OAuth client (URLs, scope, client ID and secret, flow) and, once used, cached tokens;
``[emailproxy]`` holds global options. Each distinct client becomes one custom OAuth client of the
importing user (its secret into the vault), each account a mailbox that needs one authorization:
the cached tokens are encrypted with the mail client's password there and cannot be reused.

Everything is checked before anything is written; a file with errors changes nothing. Nothing a
message says ever contains a value from an account section (where the secrets are).
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

import click
import peewee as pw
from flask import current_app
from flask.cli import with_appcontext

from errors import PersonError
from mailboxes.linking import normalize_address
from mailproxy.backend import Endpoint
from models import Account, AccountStatus, OAuthClient, User, utcnow
from oauth import providers
from people import audit
from store.db import database

# Sections that hold only the sample file's documentation.
DOCUMENTATION_SECTIONS = {
    "email oauth 2.0 proxy configuration file",
    "server setup",
    "account setup",
    "advanced proxy configuration",
}
SERVER_SECTION = re.compile(r"(IMAP|POP|SMTP)-(\d{1,5})", re.IGNORECASE)
SERVER_KEYS = {
    "documentation",
    "local_address",
    "server_address",
    "server_port",
    "starttls",
    "local_certificate_path",
    "local_key_path",
}
ACCOUNT_KEYS = {
    "documentation",
    "permission_url",
    "token_url",
    "oauth2_scope",
    "oauth2_flow",
    "redirect_uri",
    "redirect_listen_address",
    "client_id",
    "client_secret",
    "client_secret_encrypted",
    "username",
    "password",
}
# Tokens the proxy cached for an account: encrypted with the mail client's password, not reusable.
CACHED_KEYS = {
    "access_token",
    "access_token_expiry",
    "refresh_token",
    "token_salt",
    "token_iterations",
    "last_activity",
}
REQUIRED_KEYS = ("token_url", "oauth2_scope", "client_id")
FLOWS = {
    "authorization_code": providers.AUTHORIZATION_CODE,
    "client_credentials": providers.CLIENT_CREDENTIALS,
    "password": providers.PASSWORD,
}
PROTOCOLS = {"imap": "imap", "pop": "pop3", "smtp": "smtp"}
PLACEHOLDER = re.compile(r"\*\*\*.*\*\*\*")


class ImportFileError(PersonError):
    """The file cannot be imported; ``problems`` lists every reason (none holds a secret)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class ClientPlan:
    """One OAuth client the file describes, shared by the accounts that use the same values."""

    provider: str
    grant: str
    tenant: str
    authorize_url: str
    token_url: str
    scope: str
    client_id: str
    client_secret: str | None
    servers: dict[str, Endpoint] = field(default_factory=dict)
    addresses: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.grant, self.authorize_url, self.token_url, self.scope, self.client_id)


@dataclass
class Plan:
    clients: list[ClientPlan] = field(default_factory=list)
    # What the file holds that Auth-Email does not take over, one line each.
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    clients_created: list[str] = field(default_factory=list)
    clients_reused: list[str] = field(default_factory=list)
    accounts_created: list[str] = field(default_factory=list)
    accounts_kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_config(text: str) -> configparser.RawConfigParser:
    """The parsed file; syntax errors become ``ImportFileError`` naming only line numbers."""
    parser = configparser.RawConfigParser(strict=True, default_section="\x00none")
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source="emailproxy.config")
    except configparser.MissingSectionHeaderError as error:
        raise ImportFileError(
            [f"line {error.lineno}: a setting before the first [section] heading"]
        ) from None
    except configparser.DuplicateSectionError as error:
        raise ImportFileError(
            [f"line {error.lineno}: section [{error.section}] appears twice"]
        ) from None
    except configparser.DuplicateOptionError as error:
        raise ImportFileError(
            [f"line {error.lineno}: {error.option!r} appears twice in [{error.section}]"]
        ) from None
    except configparser.ParsingError as error:
        # Its message quotes the lines, which may hold a secret: give their numbers only.
        lines = ", ".join(str(number) for number, _ in error.errors)
        raise ImportFileError(
            [f"line {lines}: not a `name = value` line or a [section] heading"]
        ) from None
    return parser


def plan(text: str) -> Plan:
    """Check the whole file and describe what importing it would create."""
    parser = read_config(text)
    problems: list[str] = []
    result = Plan()
    servers: dict[str, list[Endpoint]] = {"imap": [], "pop3": [], "smtp": []}
    accounts: list[tuple[str, configparser.SectionProxy]] = []
    for name in parser.sections():
        section = parser[name]
        lowered = name.strip().lower()
        if lowered in DOCUMENTATION_SECTIONS:
            continue
        if lowered == "emailproxy":
            for key in section:
                result.notes.append(f"[emailproxy] {key}: a global option of email-oauth2-proxy")
            continue
        server = SERVER_SECTION.fullmatch(name.strip())
        if server:
            endpoint = _server(name, section, problems)
            if endpoint is not None:
                servers[PROTOCOLS[server.group(1).lower()]].append(endpoint)
            continue
        if "@" in name:
            accounts.append((name.strip(), section))
            continue
        problems.append(
            f"[{name}]: unknown section (expected an email address, IMAP-/POP-/SMTP-<port> or "
            "emailproxy)"
        )
    if servers["imap"] or servers["pop3"] or servers["smtp"]:
        result.notes.append(
            "server sections: Auth-Email's own listeners replace the local ports "
            "(IMAP_LISTEN, POP3_LISTEN, SUBMISSION_LISTEN, ...); clients of other providers use "
            "their upstream servers"
        )
    by_key: dict[tuple[str, ...], ClientPlan] = {}
    seen: set[str] = set()
    for name, section in accounts:
        client = _account(name, section, servers, problems, result.notes)
        if client is None:
            continue
        address = normalize_address(name)
        if address in seen:
            problems.append(f"[{name}]: the address appears twice")
            continue
        seen.add(address)
        existing = by_key.get(client.key)
        if existing is not None and existing.client_secret != client.client_secret:
            problems.append(
                f"[{name}]: the same client ID as [{existing.addresses[0]}] with another secret"
            )
            continue
        if existing is None:
            by_key[client.key] = existing = client
            result.clients.append(client)
        existing.addresses.append(address)
    if problems:
        raise ImportFileError(problems)
    if not result.clients:
        raise ImportFileError(["the file describes no account (a section per email address)"])
    return result


def _server(name: str, section: configparser.SectionProxy, problems: list[str]) -> Endpoint | None:
    for key in section:
        if key not in SERVER_KEYS:
            problems.append(f"[{name}]: unknown setting {key!r}")
    host = section.get("server_address", "").strip()
    port = section.get("server_port", "").strip()
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"[{name}]: needs server_address and a server_port between 1 and 65535")
        return None
    starttls = section.get("starttls", "false").strip().lower() in {"true", "yes", "1", "on"}
    return Endpoint(host, int(port), "starttls" if starttls else "tls")


def _account(
    name: str,
    section: configparser.SectionProxy,
    servers: dict[str, list[Endpoint]],
    problems: list[str],
    notes: list[str],
) -> ClientPlan | None:
    """The client of one account section; problems and notes name keys, never values."""
    before = len(problems)
    for key in section:
        if key not in ACCOUNT_KEYS | CACHED_KEYS:
            problems.append(f"[{name}]: unknown setting {key!r}")
    if name.startswith("@") or name.startswith("*"):
        notes.append(f"[{name}]: catch-all accounts are not imported (add each address)")
        return None
    local, _, domain = name.partition("@")
    if not local or "." not in domain or " " in name:
        problems.append(f"[{name}]: not an email address")
    for key in REQUIRED_KEYS:
        if not section.get(key, "").strip():
            problems.append(f"[{name}]: {key} is missing")
    for key in ("client_id", "client_secret"):
        if PLACEHOLDER.search(section.get(key, "")):
            problems.append(f"[{name}]: {key} is still the sample file's placeholder")
    flow = section.get("oauth2_flow", "authorization_code").strip().lower()
    if len(problems) > before:
        return None
    if "client_secret_encrypted" in section and "client_secret" not in section:
        notes.append(
            f"[{name}]: client_secret_encrypted is encrypted with a mail password; not imported "
            "(set the secret in the client editor)"
        )
    if any(key in section for key in CACHED_KEYS):
        notes.append(f"[{name}]: cached tokens not reused; authorize the account once")
    if "username" in section or "password" in section:
        notes.append(f"[{name}]: username/password are not imported")
    grant = FLOWS.get(flow)
    if grant is None:
        notes.append(f"[{name}]: oauth2_flow {flow!r} is not supported; account not imported")
        return None
    token_url = section["token_url"].strip()
    provider, tenant = _provider(token_url)
    preset = providers.get(provider)
    if grant not in preset.grants:
        label = providers.GRANT_LABELS[grant]
        notes.append(f"[{name}]: {preset.name} does not allow {label}; account not imported")
        return None
    authorize_url = section.get("permission_url", "").strip()
    if grant == providers.AUTHORIZATION_CODE and not authorize_url:
        problems.append(f"[{name}]: permission_url is missing")
        return None
    chosen: dict[str, Endpoint] = {}
    if preset.is_custom:
        for proto, found in servers.items():
            if len(found) == 1:
                chosen[proto] = found[0]
            elif found:
                notes.append(f"[{name}]: several {proto} servers; set the right one in the client")
        if not chosen:
            notes.append(f"[{name}]: no server section for its provider; set the mail servers")
    secret = section.get("client_secret", "").strip() or None
    return ClientPlan(
        provider=provider,
        grant=grant,
        tenant=tenant,
        authorize_url=authorize_url if grant == providers.AUTHORIZATION_CODE else "",
        token_url=token_url,
        scope=" ".join(section["oauth2_scope"].split()),
        client_id=section["client_id"].strip(),
        client_secret=secret,
        servers=chosen,
    )


def _provider(token_url: str) -> tuple[str, str]:
    """(preset key, tenant) of a token URL: a preset whose token URL it is, else "other"."""
    for preset in providers.PRESETS.values():
        for defaults in preset.grants.values():
            template = defaults.token_url
            if not template:
                continue
            pattern = re.escape(template).replace(re.escape("{tenant}"), r"(?P<tenant>[^/\s]+)")
            found = re.fullmatch(pattern, token_url)
            if found:
                tenant = found.groupdict().get("tenant") or ""
                if preset.has_tenant or tenant in ("", preset.default_tenant):
                    return preset.key, tenant if preset.has_tenant else ""
    return providers.OTHER, ""


def apply(user: User, text: str) -> Result:
    """Import the file for ``user`` in one transaction; ``ImportFileError`` changes nothing."""
    planned = plan(text)
    if not user.may_use_custom_clients:
        raise ImportFileError(
            [f"{user.email} may not add custom OAuth clients (Admin → Users allows it)"]
        )
    result = Result(notes=list(planned.notes))
    problems: list[str] = []
    with database.atomic() as transaction:
        for client_plan in planned.clients:
            client, created = _client(user, client_plan)
            (result.clients_created if created else result.clients_reused).append(client.name)
            for address in client_plan.addresses:
                own = Account.get_or_none((Account.owner == user) & (Account.address == address))
                if own is not None:
                    result.accounts_kept.append(address)
                    continue
                if Account.linked_at(address) is not None:
                    problems.append(f"[{address}]: already linked by another user")
                    continue
                Account.create(
                    owner=user,
                    address=address,
                    provider=client.provider,
                    client=client,
                    status=AccountStatus.NEEDS_REAUTH.value,
                    status_detail="Imported from email-oauth2-proxy: authorize it once.",
                )
                result.accounts_created.append(address)
        if problems:
            transaction.rollback()
            raise ImportFileError(problems)
        audit.record(
            "import.emailproxy",
            actor=user,
            ip="cli",
            target=user.email,
            detail=f"{len(result.clients_created)} client(s), "
            f"{len(result.accounts_created)} account(s)",
        )
    return result


def _client(user: User, plan: ClientPlan) -> tuple[OAuthClient, bool]:
    """The user's client with these values (a rerun finds it), or a new one."""
    for client in OAuthClient.select().where(
        (OAuthClient.owner == user)
        & (OAuthClient.client_id == plan.client_id)
        & (OAuthClient.token_url == plan.token_url)
        & (OAuthClient.grant == plan.grant)
    ):
        if client.scope == plan.scope and (client.client_secret or None) == plan.client_secret:
            return client, False
    preset = providers.get(plan.provider)
    host = urlsplit(plan.token_url).hostname or "custom"
    label = preset.name.split(" (")[0] if not preset.is_custom else host
    base = f"{label} (imported)"
    name, number = base, 1
    while OAuthClient.select().where((OAuthClient.owner == user) & (OAuthClient.name == name)):
        number += 1
        name = f"{base} {number}"
    client = OAuthClient(
        owner=user,
        name=name[:100],
        provider=plan.provider,
        grant=plan.grant,
        tenant=plan.tenant,
        authorize_url=plan.authorize_url,
        token_url=plan.token_url,
        scope=plan.scope,
        client_id=plan.client_id,
        sasl_mechanism=preset.sasl_mechanism,
    )
    if plan.client_secret:
        client.client_secret = plan.client_secret
        client.secret_set_at = utcnow()
    for proto, endpoint in plan.servers.items():
        setattr(client, f"{proto}_host", endpoint.host)
        setattr(client, f"{proto}_port", endpoint.port)
        setattr(client, f"{proto}_security", endpoint.security)
    try:
        with database.atomic():
            client.save()
    except pw.IntegrityError:
        raise ImportFileError([f"cannot save the client {name!r}"]) from None
    return client, True


# --- Command line ----------------------------------------------------------------------------


@click.command("import-emailproxy")
@with_appcontext
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--user", "email", required=True, help="The Auth-Email user who gets everything.")
def import_command(file: TextIO, email: str) -> None:
    """Create the clients and accounts of an email-oauth2-proxy ``emailproxy.config``."""
    try:
        text = file.read()
    except UnicodeDecodeError:
        raise click.ClickException("The file is not UTF-8 text.") from None
    with database.connection_context():
        user = User.by_email(email)
        if user is None:
            raise click.ClickException(f"No user {email.strip().lower()}.")
        try:
            result = apply(user, text)
        except ImportFileError as error:
            lines = "\n".join(f"  {problem}" for problem in error.problems)
            raise click.ClickException(f"Nothing was imported:\n{lines}") from None
    for label, names in (
        ("Clients created", result.clients_created),
        ("Clients already present", result.clients_reused),
        ("Accounts created", result.accounts_created),
        ("Accounts already present (unchanged)", result.accounts_kept),
    ):
        if names:
            click.echo(f"{label}: {', '.join(names)}")
    redirect = current_app.config["PUBLIC_URL"] + "/authorize"
    click.echo(
        f"Register the redirect URI {redirect} with each app registration; then authorize each "
        "account once on the accounts page (its cached tokens cannot be reused)."
    )
    if result.notes:
        click.echo("Not imported:")
        for note in result.notes:
            click.echo(f"  {note}")
