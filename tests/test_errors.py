"""Errors meant for people share one base, and people see its ``message``."""

from __future__ import annotations

import pytest

from errors import PersonError
from mailboxes.emailproxy_import import ImportFileError
from mailboxes.linking import LinkError
from mailboxes.verification import VerificationFailed
from oauth.clients import ClientError, ClientInUse
from oauth.errors import (
    AuthorizationProblem,
    ClientRefused,
    GrantError,
    NeedsReauthorization,
    TokenError,
    explain,
)
from people.addresses import AddressError
from people.users import UserError


@pytest.mark.parametrize(
    "error",
    [
        LinkError("That address is taken."),
        VerificationFailed("imap.example.com:993 refused the login."),
        ClientError("A client of that name exists."),
        ClientInUse([]),
        TokenError("The token endpoint did not answer."),
        NeedsReauthorization("Authorize again."),
        ClientRefused("The client secret expired.", "invalid_client"),
        GrantError("invalid_grant", "AADSTS70000"),
        UserError("That address has an account already."),
        AuthorizationProblem(explain("access_denied")),
        AddressError("Enter an email address."),
        ImportFileError(["line 3: no such option", "line 9: no address"]),
    ],
)
def test_every_error_for_people_has_a_message(error: PersonError) -> None:
    assert isinstance(error, PersonError)
    assert error.message and error.message == str(error)
