"""Log entries: a versioned canonical form, salted commitments to content, and sealing of the openings.

The leaf is the canonical JSON of the public entry (sorted keys, no spaces, ASCII), so the same entry
always hashes the same. Content fields (prompt, response, client address) appear in the leaf only as
commitments SHA-256(salt || value) with a fresh 32-byte salt: the tree proves integrity without exposing
content, and a short prompt cannot be found by guessing. Values and salts are sealed beside the leaf with
AES-256-GCM under a data key derived per segment with HKDF from the master key of the segment's epoch;
the leaf index and identity are bound as associated data, so a sealed opening cannot be moved to another
entry. Revealing one field (its value and salt) lets anyone recompute its commitment.
"""

from __future__ import annotations

import base64
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .verifier import canonical, commitment

__all__ = [
    "SCHEMA_VERSION",
    "Sealer",
    "canonical",
    "commit",
    "commitment",
    "data_key",
    "random_bytes",
    "seal_record",
    "split_sealed",
    "unpack_openings",
]

SCHEMA_VERSION = 1


_pool = bytearray()  # random bytes drawn 4 KiB at a time: one getrandom call for many salts and nonces
os.register_at_fork(after_in_child=_pool.clear)  # a forked child must never reuse its parent's bytes


def random_bytes(count: int) -> bytes:
    """Bytes from the OS's CSPRNG, as os.urandom gives them, fetched in bulk."""
    if len(_pool) < count:
        _pool.extend(os.urandom(max(4096, count)))
    out = bytes(_pool[:count])
    del _pool[:count]
    return out


def commit(fields: dict[str, bytes]) -> tuple[dict[str, str], bytes]:
    """Commitments for the leaf, and the openings (each field's salt and value) packed to be sealed beside it.

    Packed as, per field: u8 name length, name, 32-byte salt, u32 value length, value."""
    commitments, packed = {}, bytearray()
    salts = random_bytes(32 * len(fields))
    for position, (name, value) in enumerate(fields.items()):
        salt = salts[32 * position : 32 * position + 32]
        commitments[name] = commitment(salt, value)
        packed += bytes([len(name)]) + name.encode() + salt + struct.pack(">I", len(value)) + value
    return commitments, bytes(packed)


def unpack_openings(packed: bytes) -> dict[str, dict[str, str]]:
    """Packed openings as {field: {"salt": base64, "value": base64}}."""
    openings, offset = {}, 0
    while offset < len(packed):
        size = packed[offset]
        name = packed[offset + 1 : offset + 1 + size].decode()
        offset += 1 + size
        salt = packed[offset : offset + 32]
        (length,) = struct.unpack_from(">I", packed, offset + 32)
        value = packed[offset + 36 : offset + 36 + length]
        offset += 36 + length
        openings[name] = {"salt": base64.b64encode(salt).decode(), "value": base64.b64encode(value).decode()}
    return openings


def data_key(master: bytes, origin: str, segment: int) -> bytes:
    info = b"canarygate evidence data key\x00" + origin.encode() + struct.pack(">Q", segment)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _aad(index: int, identity: str | None) -> bytes:
    return struct.pack(">Q", index) + (identity or "").encode()


def seal_record(sealer: Sealer, index: int, identity: str | None, openings: bytes, reference: str) -> bytes:
    """A record's sealed part: u8 length | the name of the key that sealed it ("" for the log's own data key,
    else a tenant key's reference) | nonce | ciphertext, the key's name bound into the associated data."""
    name = reference.encode()
    return bytes([len(name)]) + name + sealer.seal(index, identity, openings, b"\x00" + name)


def split_sealed(sealed: bytes) -> tuple[str, bytes, bytes]:
    """(key reference, sealed bytes, associated-data context) of a version 2 record's sealed part."""
    size = sealed[0]
    name = sealed[1 : 1 + size]
    return name.decode(), sealed[1 + size :], b"\x00" + name


class Sealer:
    """AES-256-GCM under one segment's data key. Nonces are random: an index can be reused after a crash
    cut off an unsynced record, so a nonce derived from the index could repeat under the same key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, index: int, identity: str | None, openings: bytes, context: bytes = b"") -> bytes:
        nonce = random_bytes(12)
        return nonce + self._aead.encrypt(nonce, openings, _aad(index, identity) + context)

    def unseal(
        self, index: int, identity: str | None, sealed: bytes, context: bytes = b""
    ) -> dict[str, dict[str, str]]:
        return unpack_openings(self._aead.decrypt(sealed[:12], sealed[12:], _aad(index, identity) + context))
