"""The admin settings page's section for the per-provider default OAuth clients (its form is
posted to the clients screen); shared by both screens, so neither imports the other."""

from __future__ import annotations

from typing import Any

from flask import render_template
from markupsafe import Markup

from models import OAuthClient
from oauth import clients as oauth_clients
from oauth import providers
from web.forms import DefaultClientsForm


def defaults_form(**kwargs: Any) -> tuple[DefaultClientsForm, dict[str, list[OAuthClient]]]:
    candidates = oauth_clients.all_default_candidates()
    options = {
        key: [(str(c.id), f"{c.name} ({c.client_id})") for c in found]
        for key, found in candidates.items()
    }
    return DefaultClientsForm.build(options, **kwargs), candidates


def default_clients_section() -> Markup:
    """The admin settings page's section: per provider, the default client."""
    form, candidates = defaults_form()
    for key in providers.PRESETS:
        chosen = oauth_clients.default_client(key)
        getattr(form, f"default_{key}").data = str(chosen.id) if chosen else ""
    return Markup(render_template("admin/_default_clients.html", form=form, candidates=candidates))
