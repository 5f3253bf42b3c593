"""Tests written for mutants that survived ``make mutation`` (see tests/MUTATION.md): each one
pins a behaviour the suite did not check before."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from store.vault import (
    KeyFileError,
    Keyring,
    VaultError,
    load_keyring,
    load_or_create_secret_key,
    lock_instance,
)


def test_the_serving_lock_file_is_private_and_exclusive(tmp_path: Path) -> None:
    first = lock_instance(tmp_path)
    assert first is not None
    try:
        mode = stat.S_IMODE((tmp_path / "serving.lock").stat().st_mode)
        assert mode == 0o600, oct(mode)
        assert lock_instance(tmp_path) is None  # a second holder is refused
    finally:
        os.close(first)
    again = lock_instance(tmp_path)
    assert again is not None
    os.close(again)


def test_an_empty_secret_round_trips_and_bad_blobs_are_named() -> None:
    """The shortest valid value (an empty secret) opens; a value of another format or too short
    is refused as "not a vault value" before any key is looked up."""
    ring = Keyring.generate()
    blob = ring.seal("", b"aad")
    assert len(blob) == 1 + 4 + 12 + 16
    assert ring.open(blob, b"aad") == ""
    for bad in (b"\x02" + blob[1:], blob[:-1]):  # another format; right format, one byte short
        with pytest.raises(VaultError) as refused:
            ring.open(bad, b"aad")
        assert str(refused.value) == "not a vault value"
    with pytest.raises(VaultError, match="not loaded"):
        Keyring.generate().open(blob, b"aad")


def test_a_tampered_or_moved_value_says_so() -> None:
    ring = Keyring.generate()
    blob = ring.seal("value", b"row-1")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad, aad in ((tampered, b"row-1"), (blob, b"row-2")):
        with pytest.raises(VaultError) as refused:
            ring.open(bad, aad)
        assert str(refused.value) == (
            "value does not decrypt here (tampered, or moved from elsewhere)"
        )


def test_the_session_key_is_long_and_the_same_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    created = load_or_create_secret_key(path)
    assert len(created) >= 64  # 48 random bytes, URL-safe
    assert path.read_text() == created + "\n"
    assert load_or_create_secret_key(path) == created  # sessions survive a restart


def test_a_missing_key_file_over_ciphertext_says_exactly_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as refused:
        load_keyring(tmp_path / "vault.key", has_ciphertext=True)
    assert str(refused.value).endswith(
        "Restore it from your backup of the instance folder (a new key cannot read old data)."
    )
    assert not (tmp_path / "vault.key").exists()
