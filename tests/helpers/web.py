"""Driving the web UI as a browser would: CSRF-carrying forms, signing in, a live HTTP server."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from models import User
from tests.helpers.app import ADMIN_EMAIL, ADMIN_PASSWORD, USER_PASSWORD


def csrf_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of the form on ``path`` (the tests submit forms as a browser would)."""
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'name="csrf_token" value="([^"]+)"', page
    )
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def post_form(
    client: FlaskClient,
    path: str,
    data: dict[str, Any],
    form_page: str | None = None,
    **kwargs: Any,
):
    """POST ``data`` to ``path`` with the CSRF token taken from ``form_page`` (default: path)."""
    token = csrf_token(client, form_page or path)
    return client.post(path, data={"csrf_token": token, **data}, **kwargs)


class AuthActions:
    def __init__(self, app: Flask, client: FlaskClient) -> None:
        self.app = app
        self.client = client

    def setup_admin(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> None:
        response = post_form(
            self.client, "/setup", {"email": email, "password": password, "confirm": password}
        )
        assert response.status_code == 302, response.get_data(as_text=True)

    def create_user(self, email: str, can_custom_clients: bool = False) -> User:
        from people import users

        with self.app.app_context():
            return users.create_user(email, USER_PASSWORD, can_custom_clients)

    def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD):
        return post_form(self.client, "/login", {"email": email, "password": password})

    def logout(self):
        return post_form(self.client, "/logout", {}, form_page="/settings/")


class LiveServer:
    """The app served over real HTTP on 127.0.0.1 (for Chromium and for HTTP clients)."""

    def __init__(self, app: Flask) -> None:
        import threading

        from waitress import create_server

        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=0, threads=8)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        app.config["PUBLIC_URL"] = self.url
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close()
