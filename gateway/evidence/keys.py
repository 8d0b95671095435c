"""The gateway's own cryptographic keys, one directory of 0600 files (the directory 0700).

- `log-signing.key`: the Ed25519 key that signs checkpoints, as a `PRIVATE+KEY+...` signer key whose name
  is the log's origin. Earlier signing keys stay as `log-signing.<n>.key` after a rotation, so that old
  checkpoints still verify (`verifiers()`).
- `master-<epoch>.key`: the encryption master keys (32 random bytes, base64), one per epoch; data keys for
  each segment are derived from them with HKDF. Rotation adds an epoch and keeps the old ones, so old
  entries stay readable.
- `watermark.key`: the watermark master key (32 random bytes, base64), used by the marks.

Nothing here ever logs or prints a secret; only `public()` output leaves the directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..files import locked, write_atomically
from .note import ALG_ED25519, NoteError, NoteKey, Signer

SIGNING = "log-signing.key"
WATERMARK = "watermark.key"


class KeysError(Exception):
    """Keys missing or malformed: says which file and what to run."""


def _master_path(directory: Path, epoch: int) -> Path:
    return directory / f"master-{epoch}.key"


def init_keys(directory: Path, origin: str) -> list[str]:
    """Create whatever keys are missing; returns the names of files created. Never overwrites."""
    with _locked(directory):  # workers starting together create one set of keys
        return _create_missing(directory, origin)


@contextlib.contextmanager
def _locked(directory: Path):
    """The key folder's lock, which every change takes: a start that finds no signing key while a rotation
    is between keys would make one that the rotation then overwrites."""
    with locked(directory):
        os.chmod(directory, 0o700)  # an existing folder too
        yield


def _create_missing(directory: Path, origin: str) -> list[str]:
    created = []
    if not (directory / SIGNING).exists():
        write_atomically(directory / SIGNING, (Signer(origin, secrets.token_bytes(32)).skey() + "\n").encode())
        created.append(SIGNING)
    if not _numbered(directory, "master-*.key"):
        write_atomically(_master_path(directory, 0), base64.b64encode(secrets.token_bytes(32)) + b"\n")
        created.append(_master_path(directory, 0).name)
    if not (directory / WATERMARK).exists():
        write_atomically(directory / WATERMARK, base64.b64encode(secrets.token_bytes(32)) + b"\n")
        created.append(WATERMARK)
    return created


def rotate(directory: Path) -> int:
    """A new encryption epoch and a new signing key (returns the epoch); the old ones stay for reading and
    verifying. The key's verifier is named for each log it signs (Keys.verifiers), not here."""
    with _locked(directory):
        keys = Keys.load(directory)
        epoch = keys.current_epoch + 1
        write_atomically(_master_path(directory, epoch), base64.b64encode(secrets.token_bytes(32)) + b"\n")
        retired = max(_numbered(directory, "log-signing.*.key"), default=-1) + 1
        os.replace(directory / SIGNING, directory / f"log-signing.{retired}.key")
        fresh = Signer(keys.signer.name, secrets.token_bytes(32))
        write_atomically(directory / SIGNING, (fresh.skey() + "\n").encode())
        return epoch


def _numbered(directory: Path, pattern: str) -> dict[int, Path]:
    """The files matching `pattern` whose `*` is a number, by number; others (a copy named `master-old.key`)
    are not keys of this folder's scheme and are left alone."""
    prefix, _, suffix = pattern.partition("*")
    found = {}
    for path in directory.glob(pattern):
        number = path.name[len(prefix) : len(path.name) - len(suffix)]
        if number.isascii() and number.isdigit():
            found[int(number)] = path
    return found


@dataclass(frozen=True)
class Keys:
    signer: Signer
    masters: dict[int, bytes]
    watermark: bytes
    retired_signers: tuple[Signer, ...] = ()
    directory: Path | None = None  # where they were loaded from (tenant keys live beside them)

    @property
    def current_epoch(self) -> int:
        return max(self.masters)

    @property
    def address_key(self) -> bytes:
        """The key client addresses are hashed under: from the first epoch's master key, so that one
        address hashes the same across rotations (and can be looked up by whoever holds the keys)."""
        info = b"canarygate client address hash"
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self.masters[min(self.masters)])

    def verifiers(self, origin: str) -> list[NoteKey]:
        """Verifier keys named for a log's origin (a key signs as that name): the current one first."""
        return [NoteKey(origin, ALG_ED25519, s.verifier.public) for s in (self.signer, *self.retired_signers)]

    @classmethod
    def load(cls, directory: Path) -> Keys:
        if not (directory / SIGNING).exists():
            raise KeysError(f"{directory}: no {SIGNING}; run `canarygate keys init`")
        masters = {epoch: _secret(path) for epoch, path in _numbered(directory, "master-*.key").items()}
        if not masters:
            raise KeysError(f"{directory}: no master-*.key; run `canarygate keys init`")
        retired = tuple(_signer(path) for _, path in sorted(_numbered(directory, "log-signing.*.key").items()))
        return cls(_signer(directory / SIGNING), masters, _secret(directory / WATERMARK), retired, directory)


def address_hash(key: bytes, address: str) -> str:
    return "hmac-sha256:" + hmac.new(key, address.encode(), hashlib.sha256).hexdigest()[:32]


def _signer(path: Path) -> Signer:
    try:
        return Signer.parse(path.read_text().strip())
    except NoteError as e:
        raise KeysError(f"{path}: {e}") from None


def _secret(path: Path) -> bytes:
    try:
        value = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError):
        raise KeysError(f"{path}: missing or not base64") from None
    if len(value) != 32:
        raise KeysError(f"{path}: must hold 32 bytes")
    return value
