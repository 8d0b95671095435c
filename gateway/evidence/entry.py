"""Log entries: a versioned canonical form, salted commitments to content, and sealing of the openings.

The leaf is the canonical JSON of the public entry (sorted keys, no spaces, UTF-8), so the same entry
always hashes the same. Content fields (prompt, response, client address) appear in the leaf only as
commitments SHA-256(salt || value) with a fresh 32-byte salt: the tree proves integrity without exposing
content, and a short prompt cannot be found by guessing. Values and salts are sealed beside the leaf with
AES-256-GCM under a data key derived per segment with HKDF from the master key of the segment's epoch;
the leaf index and identity are bound as associated data, so a sealed opening cannot be moved to another
entry. Revealing one field (its value and salt) lets anyone recompute its commitment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SCHEMA_VERSION = 1
CONTENT_FIELDS = ("prompt", "response", "client")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def commitment(salt: bytes, value: bytes) -> str:
    return hashlib.sha256(salt + value).hexdigest()


def commit(fields: dict[str, bytes]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Commitments for the leaf, and the openings (salt and value, base64) to seal beside it."""
    commitments, openings = {}, {}
    for name, value in fields.items():
        salt = os.urandom(32)
        commitments[name] = commitment(salt, value)
        openings[name] = {"salt": base64.b64encode(salt).decode(), "value": base64.b64encode(value).decode()}
    return commitments, openings


def data_key(master: bytes, origin: str, segment: int) -> bytes:
    info = b"canarygate evidence data key\x00" + origin.encode() + struct.pack(">Q", segment)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _aad(index: int, identity: str | None) -> bytes:
    return struct.pack(">Q", index) + (identity or "").encode()


def seal(key: bytes, index: int, identity: str | None, openings: dict) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, canonical(openings), _aad(index, identity))


def unseal(key: bytes, index: int, identity: str | None, sealed: bytes) -> dict:
    return json.loads(AESGCM(key).decrypt(sealed[:12], sealed[12:], _aad(index, identity)))
