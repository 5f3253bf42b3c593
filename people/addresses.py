"""The one rule for email addresses, used by every form, the mailbox linking and the CLI.

Deliberately simple: one ``@``, no spaces, a dot in the domain. Special-use and internal domains
(``.test``, ``.local``, ``.internal``, ``.lan``) are common in self-hosted teams and are accepted;
deliverability is the provider's business, not this form's.
"""

from __future__ import annotations

import re

from errors import PersonError

MAX_LENGTH = 254
MESSAGE = "Enter an email address such as name@example.com."

_ADDRESS = re.compile(r"^[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+$")


class AddressError(PersonError, ValueError):
    """Not an address by the rule above; the message is for a person."""


def normalize(address: str | None) -> str:
    """The address trimmed and lower-cased; raises ``AddressError`` when it breaks the rule."""
    value = (address or "").strip().lower()
    if len(value) > MAX_LENGTH or not _ADDRESS.match(value):
        raise AddressError(MESSAGE)
    return value


def is_valid(address: str | None) -> bool:
    try:
        normalize(address)
    except AddressError:
        return False
    return True
