"""SASL PLAIN (RFC 4616) decoding, shared by the three protocols."""

from __future__ import annotations

import base64


def decode_plain(response: bytes) -> tuple[str, str]:
    """base64 'authzid NUL authcid NUL passwd' -> (address, password). Raises ValueError."""
    raw = base64.b64decode(response.strip(), validate=True)
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        raise ValueError("not a PLAIN response")
    authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    if not authcid or (authzid and authzid != authcid):
        raise ValueError("authorization identity differs")
    return authcid, passwd
