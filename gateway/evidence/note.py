"""C2SP signed notes, tlog checkpoints and cosignatures with Ed25519 keys: the signing side. Pure: no I/O.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
`— <name> base64(key id || signature)`. The key id is the first 4 bytes of
SHA-256(name || "\\n" || algorithm || public key): algorithm 0x01 for a log's note signature, 0x04 for a
witness's cosignature (C2SP tlog-cosignature v1, whose signature is a big-endian u64 timestamp followed by
an Ed25519 signature over "cosignature/v1\\ntime <t>\\n" and the note text). Verifier keys print as
`name+hex(key id)+base64(algorithm || key)`; signer keys as `PRIVATE+KEY+name+hex(key id)+base64(algorithm
|| seed)`, as golang.org/x/mod/sumdb/note does. Verification lives in `verifier.py` (standalone).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .verifier import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    DASH,
    Checkpoint,
    NoteError,
    NoteKey,
    check_key_name,
    cosigned_message,
    open_checkpoint,
    signed_by,
    split_note,
)

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "Checkpoint",
    "NoteError",
    "NoteKey",
    "Signer",
    "cosign",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
]


@dataclass(frozen=True)
class Signer:
    name: str
    seed: bytes
    algorithm: int = ALG_ED25519

    def __post_init__(self) -> None:
        check_key_name(self.name)

    @property
    def verifier(self) -> NoteKey:
        key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return NoteKey(self.name, self.algorithm, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def skey(self) -> str:
        encoded = base64.b64encode(bytes([self.algorithm]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, skey: str) -> Signer:
        try:
            prefix, key, name, hex_id, encoded = skey.split("+", 4)
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise NoteError("malformed signer key") from None
        if (prefix, key) != ("PRIVATE", "KEY") or len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise NoteError("signer key is not an Ed25519 PRIVATE+KEY")
        signer = cls(name, raw[1:], raw[0])
        if signer.verifier.key_id.hex() != hex_id:
            raise NoteError("signer key id does not match its name and key")
        return signer

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)

    def line(self, signature: bytes) -> str:
        return f"{DASH} {self.name} {base64.b64encode(self.verifier.key_id + signature).decode()}\n"


def sign_note(text: str, signer: Signer) -> str:
    if not text.endswith("\n") or "\n\n" in text:
        raise NoteError("note text must end in a newline and contain no blank line")
    return f"{text}\n{signer.line(signer.sign(text.encode()))}"


def cosign(note: str, cosigner: Signer, timestamp: int) -> str:
    """A witness's cosignature line on a note's text (the note's own signatures are not signed)."""
    if cosigner.algorithm != ALG_COSIGNATURE_V1:
        raise NoteError("cosignatures need a cosignature (0x04) key")
    text, _ = split_note(note)
    signed = cosigner.sign(cosigned_message(text, timestamp))
    return cosigner.line(timestamp.to_bytes(8, "big") + signed)


def open_note(note: str, key: NoteKey) -> str:
    """The note's text, if `key` signed it; raises NoteError otherwise. Other signers are ignored."""
    if signed_by(note, key) is None:
        raise NoteError(f"note carries no signature by {key.name}")
    return split_note(note)[0]


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    return sign_note(checkpoint.text(), signer)
