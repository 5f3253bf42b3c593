"""The base of every error meant for a person: its ``message`` says what went wrong and what to do.

Screens show ``exc.message`` (a flash, a form error, a page), the CLI prints it; nothing else
about the exception reaches people. The mail proxy has its own (``mailproxy.ProxyAuthError``).
"""

from __future__ import annotations


class PersonError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
