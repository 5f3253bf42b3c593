"""Instance settings the admin changes on the web: stored in ``Setting``, over the config defaults.

Every screen and flow reads them here (the per-provider default OAuth client is kept with the
clients, in ``oauth.clients``, since deleting a client clears it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models import Setting

#: Setting key -> the configuration setting that gives its default.
FLAGS = {"allow_ropc": "ALLOW_ROPC", "new_users_custom_clients": "NEW_USERS_CUSTOM_CLIENTS"}


def flag(key: str, config: Mapping[str, Any]) -> bool:
    value = Setting.read(key)
    return bool(config[FLAGS[key]]) if value is None else value == "1"


def ropc_allowed(config: Mapping[str, Any]) -> bool:
    """Whether the legacy Resource Owner Password grant may be used."""
    return flag("allow_ropc", config)


def new_users_custom_clients(config: Mapping[str, Any]) -> bool:
    """Whether new users may add custom OAuth clients (the admin's choice per user starts here)."""
    return flag("new_users_custom_clients", config)


def save(*, allow_ropc: bool, new_users_custom_clients: bool) -> None:
    Setting.write("new_users_custom_clients", "1" if new_users_custom_clients else "0")
    Setting.write("allow_ropc", "1" if allow_ropc else "0")
