"""Encryption of every secret the database holds: AES-256-GCM with keys kept in the instance folder.

Each ciphertext names the key that made it and is bound, through associated data, to its table,
column and row, so a value copied to another row or column fails to decrypt.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The instance files that hold the web session key and the vault key (mode 0600 each).
SECRET_KEY_FILE = "secret_key"
VAULT_KEY_FILE = "vault.key"

FORMAT = b"\x01"
KEY_ID_BYTES = 4
NONCE_BYTES = 12


class VaultError(Exception):
    """A value could not be decrypted: wrong key, tampering, or moved to another row."""


class KeyFileError(RuntimeError):
    """The instance key files are unsafe or missing; the message says what to do."""


@dataclass
class Keyring:
    """Keys by id; ``current`` encrypts, all of them decrypt (old ones stay during rotation)."""

    keys: dict[str, bytes]
    current: str
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls) -> Keyring:
        key_id = secrets.token_hex(KEY_ID_BYTES)
        return cls(keys={key_id: AESGCM.generate_key(bit_length=256)}, current=key_id)

    def with_new_key(self) -> Keyring:
        """A keyring whose current key is new and which still reads the old ones."""
        fresh = Keyring.generate()
        return Keyring(keys={**self.keys, **fresh.keys}, current=fresh.current)

    def only_current(self) -> Keyring:
        return Keyring(keys={self.current: self.keys[self.current]}, current=self.current)

    def _cipher(self, key_id: str) -> AESGCM:
        if key_id not in self._ciphers:
            self._ciphers[key_id] = AESGCM(self.keys[key_id])
        return self._ciphers[key_id]

    def seal(self, plaintext: str, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        key_id = bytes.fromhex(self.current)
        body = self._cipher(self.current).encrypt(nonce, plaintext.encode(), FORMAT + key_id + aad)
        return FORMAT + key_id + nonce + body

    def open(self, blob: bytes, aad: bytes) -> str:
        if len(blob) < 1 + KEY_ID_BYTES + NONCE_BYTES + 16 or blob[:1] != FORMAT:
            raise VaultError("not a vault value")
        key_id = blob[1 : 1 + KEY_ID_BYTES]
        nonce = blob[1 + KEY_ID_BYTES : 1 + KEY_ID_BYTES + NONCE_BYTES]
        if key_id.hex() not in self.keys:
            raise VaultError(f"value was encrypted with key {key_id.hex()}, which is not loaded")
        try:
            plain = self._cipher(key_id.hex()).decrypt(
                nonce, blob[1 + KEY_ID_BYTES + NONCE_BYTES :], FORMAT + key_id + aad
            )
        except InvalidTag:
            raise VaultError(
                "value does not decrypt here (tampered, or moved from elsewhere)"
            ) from None
        return plain.decode()

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return bytes(blob[1 : 1 + KEY_ID_BYTES]).hex()

    # -- files -----------------------------------------------------------------------------
    def dump(self) -> str:
        return json.dumps(
            {"current": self.current, "keys": {k: v.hex() for k, v in self.keys.items()}}, indent=1
        )

    @classmethod
    def loads(cls, text: str) -> Keyring:
        data = json.loads(text)
        return cls(
            keys={k: bytes.fromhex(v) for k, v in data["keys"].items()}, current=data["current"]
        )


def aad_for(table: str, column: str, row_uid: str) -> bytes:
    return f"{table}\x00{column}\x00{row_uid}".encode()


def check_private(path: Path) -> None:
    """Refuse a key file others can read: a secret shared with every local user is not one."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} is readable by other users (mode {mode:o}). "
            f"Run `chmod 600 {path}` and start again."
        )


def write_private(path: Path, text: str) -> None:
    """Write a secret file with mode 0600 from the first byte, replacing atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_private(path: Path) -> str:
    check_private(path)
    return path.read_text()


def load_or_create_secret_key(path: Path) -> str:
    """The Flask session key: generated once, then read (never defaulted)."""
    if path.exists():
        return read_private(path).strip()
    key = secrets.token_urlsafe(48)
    write_private(path, key + "\n")
    return key


def load_keyring(path: Path, has_ciphertext: bool) -> Keyring:
    """Load the vault keyring; make one only when no encrypted data could depend on a lost key."""
    if path.exists():
        return Keyring.loads(read_private(path))
    if has_ciphertext:
        raise KeyFileError(
            f"The database holds encrypted secrets but the key file {path} is missing. "
            "Restore it from your backup of the instance folder (a new key cannot read old data)."
        )
    keyring = Keyring.generate()
    write_private(path, keyring.dump())
    return keyring


SERVING_LOCK = "serving.lock"


def lock_instance(instance: Path) -> int | None:
    """Take the instance's serving lock (held by the serving process for its whole life).

    Returns the lock's file descriptor, or None when another process holds it. Key rotation
    needs it: a running process keeps the old key in memory and would write with it.
    """
    fd = os.open(instance / SERVING_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
