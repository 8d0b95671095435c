"""C2SP signed notes and tlog checkpoints with Ed25519 keys. Pure functions: no I/O, no clock.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
`— <name> base64(key id || signature)`. The key id is the first 4 bytes of
SHA-256(name || "\\n" || 0x01 || public key). A checkpoint is a note whose text is
`<origin>\\n<tree size>\\n<base64 root>\\n`. Verifier keys print as `name+hex(key id)+base64(0x01 || key)`;
signer keys as `PRIVATE+KEY+name+hex(key id)+base64(0x01 || seed)`, as golang.org/x/mod/sumdb/note does.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALG_ED25519 = 0x01
DASH = "\u2014"


class NoteError(ValueError):
    """A note, key or checkpoint that is malformed or does not verify."""


def key_id(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclass(frozen=True)
class Verifier:
    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public)

    def vkey(self) -> str:
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        try:
            name, hex_id, encoded = vkey.split("+", 2)
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise NoteError(f"malformed verifier key {vkey!r}") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("verifier key is not an Ed25519 key")
        verifier = cls(name, raw[1:])
        _check_name(name)
        if verifier.key_id.hex() != hex_id:
            raise NoteError("verifier key id does not match its name and key")
        return verifier

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, text)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    name: str
    seed: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def verifier(self) -> Verifier:
        key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return Verifier(self.name, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def skey(self) -> str:
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, skey: str) -> Signer:
        try:
            prefix, key, name, hex_id, encoded = skey.split("+", 4)
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise NoteError("malformed signer key") from None
        if (prefix, key) != ("PRIVATE", "KEY") or len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("signer key is not an Ed25519 PRIVATE+KEY")
        signer = cls(name, raw[1:])
        if signer.verifier.key_id.hex() != hex_id:
            raise NoteError("signer key id does not match its name and key")
        return signer

    def sign(self, text: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(text)


def sign_note(text: str, signer: Signer) -> str:
    if not text.endswith("\n") or "\n\n" in text:
        raise NoteError("note text must end in a newline and contain no blank line")
    signature = signer.sign(text.encode())
    blob = base64.b64encode(signer.verifier.key_id + signature).decode()
    return f"{text}\n{DASH} {signer.name} {blob}\n"


def open_note(note: str, verifier: Verifier) -> str:
    """The note's text, if `verifier` signed it; raises NoteError otherwise. Other signers are ignored."""
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise NoteError("malformed note: no signature block")
    text += "\n"
    for line in signatures[:-1].split("\n"):
        dash, _, rest = line.partition(" ")
        name, _, blob = rest.partition(" ")
        if dash != DASH or not name or not blob:
            raise NoteError(f"malformed signature line {line!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            raise NoteError("malformed signature encoding") from None
        if name == verifier.name and raw[:4] == verifier.key_id and len(raw) == 68:
            if verifier.verify(text.encode(), raw[4:]):
                return text
            raise NoteError(f"signature by {name} does not verify")
    raise NoteError(f"note carries no signature by {verifier.name}")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has an origin, a size and a root, each on its own line")
        try:
            size = int(lines[1])
            root = base64.b64decode(lines[2], validate=True)
        except ValueError:
            raise NoteError("checkpoint size or root is malformed") from None
        if size < 0 or str(size) != lines[1] or len(root) != 32:
            raise NoteError("checkpoint size or root is malformed")
        return cls(lines[0], size, root)


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    return sign_note(checkpoint.text(), signer)


def open_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    checkpoint = Checkpoint.parse(open_note(note, verifier))
    if checkpoint.origin != verifier.name:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not the key's name {verifier.name!r}")
    return checkpoint
