"""Provider presets: endpoints, scopes and mail servers per provider, kept as data.

Everything the code needs to know about Microsoft, Google, Fastmail ... lives in ``PRESETS``; the
functions below read it, so adding a provider is adding a ``Preset``, not another branch.
Microsoft URLs are templates with ``{tenant}``.

``PROVIDER_HOSTS`` (``configure``) moves the presets' hosts elsewhere, the way an operator points
them at a test tenant, a national cloud's front door or the test bed's simulators: the functions
below then answer with the moved table, ``PRESETS`` itself stays as shipped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from mailproxy.backend import Endpoint
from store import appstate

if TYPE_CHECKING:
    from flask import Flask

    from models import OAuthClient

AUTHORIZATION_CODE = "authorization_code"
CLIENT_CREDENTIALS = "client_credentials"
DEVICE_CODE = "device_code"
PASSWORD = "password"  # the legacy Resource Owner Password grant

GRANT_LABELS = MappingProxyType(
    {
        AUTHORIZATION_CODE: "Authorization Code",
        CLIENT_CREDENTIALS: "Client Credentials",
        DEVICE_CODE: "Device Code",
        PASSWORD: "Resource Owner Password (legacy)",
    }
)
MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
URL_FIELDS = ("authorize_url", "token_url", "device_url")
DEFAULT_FIELDS = (*URL_FIELDS, "scope")
OTHER = "other"


@dataclass(frozen=True)
class GrantDefaults:
    """The prefilled *Permission URL*, *Token URL*, device URL and *OAuth scope* of one grant."""

    token_url: str
    scope: str
    authorize_url: str = ""
    device_url: str = ""


@dataclass(frozen=True)
class Preset:
    key: str
    name: str
    # Grant key -> defaults; the keys are the grants the provider allows.
    grants: MappingProxyType[str, GrantDefaults]
    imap: Endpoint | None = None
    pop3: Endpoint | None = None
    smtp: Endpoint | None = None
    sasl_mechanism: str = "XOAUTH2"
    authorize_params: MappingProxyType[str, str] = field(default_factory=lambda: _frozen({}))
    revocation_url: str = ""
    # The provider no longer accepts new app registrations (existing client IDs still work).
    registrations_closed: bool = False
    # Shows the *Directory (tenant) ID* field; ``default_tenant`` fills ``{tenant}`` otherwise.
    has_tenant: bool = False
    default_tenant: str = ""
    domains: tuple[str, ...] = ()
    # A short note shown in the editor.
    note: str = ""

    @property
    def is_custom(self) -> bool:
        """'Other': every URL and mail server is typed by hand."""
        return self.key == OTHER

    @property
    def is_microsoft(self) -> bool:
        return any("{tenant}" in d.token_url for d in self.grants.values())


def _frozen(mapping: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(dict(mapping))


def _microsoft(login: str, resource: str) -> MappingProxyType[str, GrantDefaults]:
    """Entra endpoints of one cloud (global or 21Vianet); ``resource`` is its Exchange host."""
    base = f"https://{login}/{{tenant}}/oauth2/v2.0"
    delegated = (
        f"https://{resource}/IMAP.AccessAsUser.All https://{resource}/POP.AccessAsUser.All "
        f"https://{resource}/SMTP.Send offline_access"
    )
    return _frozen(
        {
            AUTHORIZATION_CODE: GrantDefaults(
                authorize_url=f"{base}/authorize", token_url=f"{base}/token", scope=delegated
            ),
            CLIENT_CREDENTIALS: GrantDefaults(
                token_url=f"{base}/token", scope=f"https://{_app_resource(resource)}/.default"
            ),
            DEVICE_CODE: GrantDefaults(
                device_url=f"{base}/devicecode", token_url=f"{base}/token", scope=delegated
            ),
            PASSWORD: GrantDefaults(token_url=f"{base}/token", scope=delegated),
        }
    )


def _app_resource(resource: str) -> str:
    # Application permissions are requested against the Exchange Online resource itself.
    return "outlook.office365.com" if resource == "outlook.office.com" else resource


def _servers(imap: str, pop3: str, smtp: str, smtp_port: int = 587) -> dict[str, Any]:
    return {
        "imap": Endpoint(imap, 993, "tls"),
        "pop3": Endpoint(pop3, 995, "tls"),
        "smtp": Endpoint(smtp, smtp_port, "starttls" if smtp_port == 587 else "tls"),
    }


_MS_GLOBAL = _microsoft("login.microsoftonline.com", "outlook.office.com")
_MS_CHINA = _microsoft("login.chinacloudapi.cn", "partner.outlook.cn")
# US Government clouds: their own Entra host, and Exchange Online under office365.us.
_MS_GCC_HIGH = _microsoft("login.microsoftonline.us", "outlook.office365.us")
_MS_DOD = _microsoft("login.microsoftonline.us", "outlook-dod.office365.us")

PRESETS: MappingProxyType[str, Preset] = _frozen(
    {
        "microsoft365": Preset(
            key="microsoft365",
            name="Microsoft 365 / Entra ID",
            grants=_MS_GLOBAL,
            **_servers("outlook.office365.com", "outlook.office365.com", "smtp.office365.com"),
            has_tenant=True,
            default_tenant="organizations",
        ),
        "outlook": Preset(
            key="outlook",
            name="Outlook.com (personal Microsoft accounts)",
            grants=_frozen(
                {g: _MS_GLOBAL[g] for g in (AUTHORIZATION_CODE, DEVICE_CODE)},
            ),
            **_servers("outlook.office365.com", "outlook.office365.com", "smtp-mail.outlook.com"),
            default_tenant="consumers",
            domains=("outlook.com", "hotmail.com", "live.com", "msn.com"),
        ),
        "google": Preset(
            key="google",
            name="Google (Gmail, Google Workspace)",
            grants=_frozen(
                {
                    AUTHORIZATION_CODE: GrantDefaults(
                        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
                        token_url="https://oauth2.googleapis.com/token",
                        scope="https://mail.google.com/",
                    )
                }
            ),
            **_servers("imap.gmail.com", "pop.gmail.com", "smtp.gmail.com", 465),
            authorize_params=_frozen({"access_type": "offline", "prompt": "consent"}),
            revocation_url="https://oauth2.googleapis.com/revoke",
            domains=("gmail.com", "googlemail.com"),
        ),
        "microsoft_china": Preset(
            key="microsoft_china",
            name="Microsoft 365 operated by 21Vianet (China)",
            grants=_MS_CHINA,
            **_servers("partner.outlook.cn", "partner.outlook.cn", "partner.outlook.cn"),
            has_tenant=True,
            default_tenant="organizations",
        ),
        "microsoft_gcc_high": Preset(
            key="microsoft_gcc_high",
            name="Microsoft 365 GCC High (US Government)",
            grants=_MS_GCC_HIGH,
            **_servers("outlook.office365.us", "outlook.office365.us", "smtp.office365.us"),
            has_tenant=True,
            default_tenant="organizations",
        ),
        "microsoft_dod": Preset(
            key="microsoft_dod",
            name="Microsoft 365 DoD (US Government)",
            grants=_MS_DOD,
            **_servers(
                "outlook-dod.office365.us", "outlook-dod.office365.us", "smtp-dod.office365.us"
            ),
            has_tenant=True,
            default_tenant="organizations",
        ),
        "fastmail": Preset(
            key="fastmail",
            name="Fastmail",
            grants=_frozen(
                {
                    AUTHORIZATION_CODE: GrantDefaults(
                        authorize_url="https://api.fastmail.com/oauth/authorize",
                        token_url="https://api.fastmail.com/oauth/refresh",
                        scope="https://www.fastmail.com/dev/protocol-imap "
                        "https://www.fastmail.com/dev/protocol-pop "
                        "https://www.fastmail.com/dev/protocol-smtp",
                    )
                }
            ),
            **_servers("imap.fastmail.com", "pop.fastmail.com", "smtp.fastmail.com", 465),
            sasl_mechanism="OAUTHBEARER",
            revocation_url="https://api.fastmail.com/oauth/revoke",
            registrations_closed=True,
            domains=("fastmail.com", "fastmail.fm"),
            note="Fastmail registers OAuth clients only on request; there is no self-service "
            "console.",
        ),
        "yahoo": Preset(
            key="yahoo",
            name="Yahoo Mail",
            grants=_frozen(
                {
                    AUTHORIZATION_CODE: GrantDefaults(
                        authorize_url="https://api.login.yahoo.com/oauth2/request_auth",
                        token_url="https://api.login.yahoo.com/oauth2/get_token",
                        scope="mail-w",
                    )
                }
            ),
            **_servers("imap.mail.yahoo.com", "pop.mail.yahoo.com", "smtp.mail.yahoo.com", 465),
            registrations_closed=True,
            domains=("yahoo.com", "ymail.com", "rocketmail.com"),
            note="Yahoo no longer grants mail access to new app registrations.",
        ),
        "aol": Preset(
            key="aol",
            name="AOL Mail",
            grants=_frozen(
                {
                    AUTHORIZATION_CODE: GrantDefaults(
                        authorize_url="https://api.login.aol.com/oauth2/request_auth",
                        token_url="https://api.login.aol.com/oauth2/get_token",
                        scope="mail-w",
                    )
                }
            ),
            **_servers("imap.aol.com", "pop.aol.com", "smtp.aol.com", 465),
            registrations_closed=True,
            domains=("aol.com", "aim.com"),
            note="AOL no longer grants mail access to new app registrations.",
        ),
        OTHER: Preset(
            key=OTHER,
            name="Other (custom server)",
            grants=_frozen({g: GrantDefaults(token_url="", scope="") for g in GRANT_LABELS}),
            note="Enter every URL and the three mail servers by hand.",
        ),
    }
)


# ------------------------------------------------------------------ PROVIDER_HOSTS


@dataclass(frozen=True)
class HostMove:
    """One entry of PROVIDER_HOSTS: where a preset's ``host`` (at ``port`` only, when given)
    is reached instead; ``new_port`` None keeps each endpoint's own port."""

    host: str
    port: int | None
    new_host: str
    new_port: int | None


class _Table:
    """One app's presets as PROVIDER_HOSTS moves them, and the patterns built from them."""

    def __init__(self, presets: MappingProxyType[str, Preset]) -> None:
        self.presets = presets
        self.patterns: dict[str, list[re.Pattern[str]]] = {}


_TABLE: appstate.Slot[_Table] = appstate.Slot("providers", default=lambda: _Table(PRESETS))


def init_app(app: Flask) -> None:
    """Take PROVIDER_HOSTS from the app's config."""
    configure(app.config, app)


def configure(config: Mapping[str, Any], app: Flask | None = None) -> None:
    """The presets for ``app`` (or, without one, for code outside any app) as ``config``'s
    PROVIDER_HOSTS moves them; ValueError with every problem listed when the value cannot be
    used, so the service refuses to start."""
    moves = parse_provider_hosts(config.get("PROVIDER_HOSTS") or "")
    _TABLE.set(app, _Table(_move_table(PRESETS, moves) if moves else PRESETS))


def _presets() -> MappingProxyType[str, Preset]:
    return _TABLE.get().presets


_HOST = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


def _host_port(text: str, what: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; ValueError naming ``what``."""
    text = text.strip().lower().rstrip(".")
    found = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if not found:
        raise ValueError(f"{text!r}{what} is not host or host:port")
    v6, v6_port, name, name_port = found.groups()
    host, port_text = (v6, v6_port) if v6 else (name, name_port)
    if v6:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}{what}: [{host}] is not an IPv6 address") from None
    elif not _HOST.fullmatch(host):
        raise ValueError(f"{text!r}{what}: {host!r} is not a host name or IPv4 address")
    port = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}{what}: the port must be 1 to 65535")
    return host, port


def parse_provider_hosts(raw: Any) -> tuple[HostMove, ...]:
    """PROVIDER_HOSTS as moves. A mapping (instance/config.py) or a string (the environment):
    ``"login.microsoftonline.com=login.test.example, outlook.office365.com:993=10.0.0.5:9993"``.
    Each key is a host the built-in providers name, with ``:port`` to move only the endpoint at
    that port (IMAP and POP3 share Exchange's host); each value the host[:port] to use instead.
    """
    if isinstance(raw, Mapping):
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, str):
        pairs = []
        for item in raw.replace(",", " ").split():
            key, equals, value = item.partition("=")
            pairs.append((key, value if equals else ""))
    else:
        raise ValueError(
            "PROVIDER_HOSTS: must be a dict or a string of host=host[:port] pairs, "
            f"not {type(raw).__name__}"
        )
    known = _hosts_of(PRESETS)
    problems, moves = [], []
    for key, value in pairs:
        try:
            host, port = _host_port(key, "")
            if host not in known:
                raise ValueError(
                    f"{host!r} is no host of a built-in provider (one of: "
                    f"{', '.join(sorted(known))})"
                )
            if not value.strip():
                raise ValueError(f"{key!r} has no value (write {key}=host[:port])")
            new_host, new_port = _host_port(value, f" (for {key})")
        except ValueError as error:
            problems.append(str(error))
            continue
        moves.append(HostMove(host, port, new_host, new_port))
    seen = [(m.host, m.port) for m in moves]
    problems += [
        f"{h}{':' + str(p) if p else ''} is given twice"
        for h, p in set(seen)
        if seen.count((h, p)) > 1
    ]
    if problems:
        raise ValueError("PROVIDER_HOSTS: " + "; ".join(problems))
    return tuple(moves)


def _moved_to(moves: tuple[HostMove, ...], host: str, port: int) -> tuple[str, int] | None:
    """Where ``host:port`` goes: an entry for that very port first, then one for the host."""
    for exact in (True, False):
        for move in moves:
            if move.host == host and (move.port == port if exact else move.port is None):
                return move.new_host, move.new_port or port
    return None


def _move_url(moves: tuple[HostMove, ...], url: str) -> str:
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    moved = _moved_to(moves, host, port)
    if moved is None:
        return url
    new_host, new_port = moved
    shown = f"[{new_host}]" if ":" in new_host else new_host
    default = 443 if parts.scheme == "https" else 80
    netloc = shown if new_port == default else f"{shown}:{new_port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _move_endpoint(moves: tuple[HostMove, ...], endpoint: Endpoint | None) -> Endpoint | None:
    if endpoint is None:
        return None
    moved = _moved_to(moves, endpoint.host, endpoint.port)
    return endpoint if moved is None else replace(endpoint, host=moved[0], port=moved[1])


def _move_table(
    table: Mapping[str, Preset], moves: tuple[HostMove, ...]
) -> MappingProxyType[str, Preset]:
    """``table`` with every URL and mail server that ``moves`` names moved (scheme, path,
    security as they were)."""
    moved = {}
    for key, preset in table.items():
        grants = {
            name: replace(g, **{f: _move_url(moves, getattr(g, f)) for f in URL_FIELDS})
            for name, g in preset.grants.items()
        }
        moved[key] = replace(
            preset,
            grants=_frozen(grants),
            revocation_url=_move_url(moves, preset.revocation_url),
            imap=_move_endpoint(moves, preset.imap),
            pop3=_move_endpoint(moves, preset.pop3),
            smtp=_move_endpoint(moves, preset.smtp),
        )
    return _frozen(moved)


def _hosts_of(table: Mapping[str, Preset]) -> frozenset[str]:
    hosts: set[str] = set()
    for preset in table.values():
        urls = [preset.revocation_url]
        for grant in preset.grants.values():
            urls += [grant.authorize_url, grant.token_url, grant.device_url]
        hosts.update(urlsplit(url).hostname or "" for url in urls if url)
        hosts.update(ep.host for ep in (preset.imap, preset.pop3, preset.smtp) if ep is not None)
    hosts.discard("")
    return frozenset(hosts)


def get(key: str) -> Preset:
    """The preset ``key``; KeyError for an unknown one."""
    return _presets()[key]


def choices() -> list[tuple[str, str]]:
    """(key, display name) for a select, in display order."""
    return [(p.key, p.name) for p in _presets().values()]


def grant_choices(provider_key: str | None = None) -> list[tuple[str, str]]:
    """(grant, label) of every grant, or of those ``provider_key`` allows."""
    preset = _presets().get(provider_key or "")
    allowed = preset.grants if preset is not None else GRANT_LABELS
    return [(g, label) for g, label in GRANT_LABELS.items() if g in allowed]


def guess_provider(address: str) -> str | None:
    """The preset whose domains include the address's domain (an address or a bare domain)."""
    domain = (address or "").rsplit("@", 1)[-1].strip().lower().rstrip(".")
    for preset in _presets().values():
        if domain in preset.domains:
            return preset.key
    return None


def tenant_for(preset: Preset, tenant: str = "") -> str:
    """The value for ``{tenant}``: the typed one where the preset has the field, else its own."""
    if preset.has_tenant and tenant.strip():
        return tenant.strip()
    return preset.default_tenant


def defaults_for(provider_key: str, grant: str, tenant: str = "") -> dict[str, str]:
    """authorize_url, token_url, device_url and scope of a provider and grant (empty if none)."""
    preset = get(provider_key)
    defaults = preset.grants.get(grant)
    if defaults is None:
        return dict.fromkeys(DEFAULT_FIELDS, "")
    value = tenant_for(preset, tenant)
    return {name: getattr(defaults, name).replace("{tenant}", value) for name in DEFAULT_FIELDS}


def is_a_default(name: str, value: str) -> bool:
    """Whether ``value`` of field ``name`` is some preset's default (for any tenant).

    Such a value was not typed by the user, so it follows a change of provider, grant or tenant.
    """
    value = (value or "").strip()
    if not value:
        return True
    return any(pattern.fullmatch(value) for pattern in _default_patterns(name))


def _default_patterns(name: str) -> list[re.Pattern[str]]:
    cache = _TABLE.get().patterns
    found = cache.get(name)
    if found is None:
        tables = (PRESETS, _presets())
        templates = {
            getattr(d, name) for t in tables for p in t.values() for d in p.grants.values()
        }
        found = [
            re.compile(re.escape(t).replace(re.escape("{tenant}"), r"[^/\s]+"))
            for t in sorted(templates)
            if t
        ]
        cache[name] = found
    return found


def editor_data() -> dict[str, Any]:
    """The presets as the editor's script needs them (embedded as JSON in the page)."""
    return {
        p.key: {
            "name": p.name,
            "grants": {g: vars(d) for g, d in p.grants.items()},
            "has_tenant": p.has_tenant,
            "default_tenant": p.default_tenant,
            "custom": p.is_custom,
            "microsoft": p.is_microsoft,
            "registrations_closed": p.registrations_closed,
            "note": p.note,
        }
        for p in _presets().values()
    }


def preset_hosts() -> frozenset[str]:
    """The hosts the built-in providers name, as shipped and as PROVIDER_HOSTS moves them
    (always allowed, whatever CUSTOM_CLIENT_HOSTS says)."""
    return _hosts_of(PRESETS) | _hosts_of(_presets())


def endpoints_for(client: OAuthClient) -> dict[str, Endpoint]:
    """The upstream servers, keyed 'imap', 'pop3', 'smtp': the preset's, or the client's own."""
    preset = _presets().get(client.provider)
    if preset is not None and not preset.is_custom:
        found = {"imap": preset.imap, "pop3": preset.pop3, "smtp": preset.smtp}
        return {name: ep for name, ep in found.items() if ep is not None}
    servers = {}
    for name in ("imap", "pop3", "smtp"):
        host = getattr(client, f"{name}_host")
        port = getattr(client, f"{name}_port")
        if host and port:
            servers[name] = Endpoint(host, int(port), getattr(client, f"{name}_security"))
    return servers


def sasl_mechanism_for(client: OAuthClient) -> str:
    """XOAUTH2 or OAUTHBEARER: the preset's, or the one chosen for a custom server."""
    preset = _presets().get(client.provider)
    if preset is not None and not preset.is_custom:
        return preset.sasl_mechanism
    return client.sasl_mechanism or "XOAUTH2"


def extra_authorize_params(client: OAuthClient) -> dict[str, str]:
    """Parameters added to the authorize URL (Google needs offline access and consent)."""
    preset = _presets().get(client.provider)
    return dict(preset.authorize_params) if preset is not None else {}


def revocation_url_for(client: OAuthClient) -> str:
    """Where to revoke a refresh token on unlink; empty when the provider has none."""
    if client.revocation_url:
        return client.revocation_url
    preset = _presets().get(client.provider)
    return preset.revocation_url if preset is not None else ""
