"""Per-app state: what ``create_app`` sets up for one app, kept on that app, never in a module.

Each layer that needs something from the configuration (the database, the vault key, the
password hasher, the token endpoints' settings, Graph's) declares a ``Slot`` and fills it for
each app in its ``init_app``. Code reads the slot through the *current app*: Flask's app
context in a request or a CLI command; in the serving process's own threads (the mail proxy's
backend, upkeep) the app they were started for (``bound``). So a second ``create_app`` in one
process (the tests make hundreds, an operator may run two instances) never changes the first.

Outside any app (a script, a test calling a function directly) a slot answers with the value set
last, or its default: the one place a process-wide value remains, and only as that fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

from flask import Flask, current_app, has_app_context

T = TypeVar("T")

_bound: ContextVar[Flask | None] = ContextVar("auth_email_bound_app", default=None)


def current() -> Flask | None:
    """The app the running code works for: the app context's, else the thread's bound app."""
    if has_app_context():
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return app
    return _bound.get()


@contextmanager
def bound(app: Flask | None) -> Iterator[None]:
    """Run the block for ``app`` (a service thread's work); ``None`` changes nothing."""
    if app is None:
        yield
        return
    token = _bound.set(app)
    try:
        yield
    finally:
        _bound.reset(token)


class Slot(Generic[T]):
    """One layer's per-app value, stored in ``app.extensions`` under ``auth_email.<name>``."""

    def __init__(
        self, name: str, default: Callable[[], T] | None = None, *, fallback: bool = True
    ) -> None:
        self.key = f"auth_email.{name}"
        self._default = default
        self._keeps_fallback = fallback
        self._fallback: T | None = None

    def set(self, app: Flask | None, value: T) -> None:
        """Give ``app`` its value (and make it the fallback for code outside any app, unless the
        slot keeps none)."""
        if app is not None:
            app.extensions[self.key] = value
        if self._keeps_fallback:
            self._fallback = value

    def is_fallback(self, value: T) -> bool:
        """Whether code outside any app uses ``value`` (so it must outlive its app)."""
        return self._fallback is value

    def of(self, app: Flask) -> T | None:
        found: T | None = app.extensions.get(self.key)
        return found

    def get_or_none(self) -> T | None:
        app = current()
        if app is not None and self.key in app.extensions:
            value: T = app.extensions[self.key]
            return value
        if self._fallback is None and self._default is not None:
            self._fallback = self._default()
        return self._fallback

    def get(self) -> T:
        value = self.get_or_none()
        if value is None:
            raise RuntimeError(f"{self.key} is not set up: create the app first")
        return value
