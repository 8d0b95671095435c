"""Check a canarygate evidence bundle with nothing but the Python standard library and `cryptography`.

This file is standalone on purpose: `canarygate log export` copies it into every bundle as `verify.py`, so
that an outside expert can check the evidence without installing, or trusting, canarygate. The gateway
imports its proof and note functions from here, so the code the expert runs is the code the tests run.

    python verify.py BUNDLE [--log-key VKEY]... [--witness VKEY]... [--quorum K] [--gossip NOTE]... [--json]

What it checks, per log in the bundle: every checkpoint's Ed25519 signature (C2SP signed note); that each
checkpoint extends the one before it (RFC 9162 consistency proofs); that the last checkpoint carries
cosignatures (C2SP tlog-cosignature v1) from at least K trusted witnesses; every entry's inclusion proof
under that checkpoint; that each leaf is canonical JSON; and that every opened field (value and salt)
matches its commitment in the leaf. `--gossip` adds signed checkpoints seen elsewhere (a witness's latest,
say): two different roots for one tree size, both signed by the log, prove that the log forked; one of a
size the bundle has no checkpoint of cannot be compared, and fails the check rather than pass unchecked.

Keys given on the command line are the ones to trust; without them, the keys shipped in the bundle are
used and the output says so, since a forger would ship its own.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DASH = "\u2014"
ALG_ED25519 = 0x01  # a signed note's signature
ALG_COSIGNATURE_V1 = 0x04  # a witness's timestamped cosignature


class VerificationError(ValueError):
    """Something in the evidence that does not check out; the message names it."""


class ProofError(VerificationError):
    """A Merkle proof that does not verify, or a request for one that cannot exist."""


class NoteError(VerificationError):
    """A note, key or checkpoint that is malformed or does not verify."""


# --- RFC 6962 / 9162 Merkle trees ---


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _check_sizes(*numbers: object) -> None:
    """Indexes and sizes are integers (JSON gives 2.0 or "2" or true as readily): anything else is refused."""
    for number in numbers:
        if type(number) is not int:
            raise ProofError(f"{number!r} is not an integer index or size")


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raises ProofError unless `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `root`
    (RFC 9162 section 2.1.3.2)."""
    _check_sizes(index, size)
    if index >= size or index < 0:
        raise ProofError(f"leaf index {index} is beyond the tree size {size}")
    for value in (leaf, root, *proof):
        _check_hash(value)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Raises ProofError unless `proof` shows the tree (size1, root1) is a prefix of (size2, root2)
    (RFC 9162 section 2.1.4.2)."""
    _check_sizes(size1, size2)
    if size2 < size1:
        raise ProofError(f"size1 {size1} is greater than size2 {size2}")
    if size1 == 0:  # every tree extends the empty one: such a proof proves nothing, so none is accepted
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("trees of equal size need an empty proof")
        if root1 != root2:
            raise ProofError("trees of equal size have different roots")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    for value in (root1, root2, *proof):
        _check_hash(value)
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root")


def _check_hash(value: bytes) -> None:
    if len(value) != 32:
        raise ProofError(f"a proof hash has {len(value)} bytes, not 32")


# --- C2SP signed notes, checkpoints and cosignatures ---


def key_id(name: str, algorithm: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + public).digest()[:4]


def check_key_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclass(frozen=True)
class NoteKey:
    """A verifier key: a log's (algorithm 0x01) or a witness's (0x04, cosignature/v1)."""

    name: str
    algorithm: int
    public: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.algorithm, self.public)

    def vkey(self) -> str:
        encoded = base64.b64encode(bytes([self.algorithm]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, vkey: str) -> NoteKey:
        try:
            name, hex_id, encoded = vkey.strip().split("+", 2)
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise NoteError(f"malformed verifier key {vkey!r}") from None
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise NoteError("verifier key is not an Ed25519 note or cosignature key")
        check_key_name(name)
        key = cls(name, raw[0], raw[1:])
        if key.key_id.hex() != hex_id:
            raise NoteError("verifier key id does not match its name and key")
        return key

    def verify(self, text: str, signature: bytes) -> int | None:
        """Whether `signature` (key id stripped) is this key's over note text `text`: for a cosignature,
        its timestamp; for a note signature, 0; None when it does not verify."""
        timestamp = 0
        message = text.encode()
        if self.algorithm == ALG_COSIGNATURE_V1:
            if len(signature) != 72:
                return None
            timestamp = int.from_bytes(signature[:8], "big")
            message = cosigned_message(text, timestamp)
            signature = signature[8:]
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return None
        return timestamp


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A note's text (with its final newline) and its signature lines as (key name, key id || signature)."""
    text, sep, block = note.rpartition("\n\n")
    if not sep or not block.endswith("\n"):
        raise NoteError("malformed note: no signature block")
    lines = []
    for line in block[:-1].split("\n"):
        dash, _, rest = line.partition(" ")
        name, _, blob = rest.partition(" ")
        if dash != DASH or not name or not blob:
            raise NoteError(f"malformed signature line {line!r}")
        try:
            lines.append((name, base64.b64decode(blob, validate=True)))
        except ValueError:
            raise NoteError("malformed signature encoding") from None
    return text + "\n", lines


def signed_by(note: str, key: NoteKey) -> int | None:
    """The note's verified signature by `key` (its timestamp; 0 for a plain signature), None if it has none.
    A line that names the key and carries its id but does not verify is a forgery: NoteError."""
    text, lines = split_note(note)
    for name, raw in lines:
        if name == key.name and raw[:4] == key.key_id:
            verified = key.verify(text, raw[4:])
            if verified is None:
                raise NoteError(f"signature by {name} does not verify")
            return verified
    return None


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


def open_checkpoint(note: str, keys: Sequence[NoteKey]) -> Checkpoint:
    """The checkpoint, if one of the log's `keys` (named for its origin) signed it; NoteError otherwise."""
    text, _ = split_note(note)
    checkpoint = Checkpoint.parse(text)
    for key in keys:
        if key.algorithm == ALG_ED25519 and key.name == checkpoint.origin and signed_by(note, key) is not None:
            return checkpoint
    raise NoteError(f"checkpoint of {checkpoint.origin!r} at size {checkpoint.size} has no valid signature by its log")


def cosigners(note: str, witnesses: Sequence[NoteKey]) -> dict[str, int]:
    """The trusted witnesses whose valid cosignature the note carries: name -> timestamp."""
    return {w.name: t for w in witnesses if w.algorithm == ALG_COSIGNATURE_V1 and (t := signed_by(note, w)) is not None}


def forks(notes: Sequence[str], keys: Sequence[NoteKey]) -> list[tuple[str, str]]:
    """Pairs of checkpoints signed by the log for one tree size with different roots: proof of a fork."""
    seen: dict[tuple[str, int], tuple[bytes, str]] = {}
    found = []
    for note in notes:
        checkpoint = open_checkpoint(note, keys)
        key = (checkpoint.origin, checkpoint.size)
        if key in seen and seen[key][0] != checkpoint.root:
            found.append((seen[key][1], note))
        seen.setdefault(key, (checkpoint.root, note))
    return found


# --- entries ---


def canonical(obj) -> bytes:
    """Sorted keys, no spaces, ASCII with \\u escapes: the one byte form of an entry."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def commitment(salt: bytes, value: bytes) -> str:
    return hashlib.sha256(salt + value).hexdigest()


SALT_BYTES = 32


def check_openings(public: dict, openings: dict) -> None:
    """Every opened field must hash, with its salt, to the commitment in the leaf. The salt's length is
    fixed: otherwise the first bytes of a value could be moved into its salt and the rest passed off as
    the value under the same commitment."""
    for name, opened in openings.items():
        salt = base64.b64decode(opened["salt"], validate=True)
        value = base64.b64decode(opened["value"], validate=True)
        if len(salt) != SALT_BYTES:
            raise VerificationError(f"field {name!r} has a salt of {len(salt)} bytes, not {SALT_BYTES}")
        if public.get("commit", {}).get(name) != commitment(salt, value):
            raise VerificationError(f"field {name!r} does not match its commitment")


# --- bundles ---

# What a bundle that is not what it claims raises as it is read: a fault found (VerificationError, ProofError),
# or JSON of the wrong shape (a list where an object goes, a string for an index, nesting too deep to parse).
# Each is a rejection with its reason, never a traceback: the bundle is the verifier's untrusted input.
MALFORMED = (VerificationError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError)


def _reason(error: Exception) -> str:
    if isinstance(error, VerificationError | ValueError):
        return str(error)
    return f"malformed bundle ({type(error).__name__}: {str(error)[:200]})"


@dataclass
class Trust:
    log_keys: list[NoteKey]
    witnesses: list[NoteKey]
    quorum: int
    from_bundle: list[str]  # which of the above came from the bundle itself


def verify_log(folder: Path, trust: Trust, gossip: Sequence[str] = ()) -> dict:
    """Check one log of a bundle; returns what was checked, raises VerificationError at the first fault."""
    origin = (folder / "origin").read_text().strip()
    keys = [k for k in trust.log_keys if k.name == origin]
    if not keys:
        raise VerificationError(f"{folder.name}: no trusted key for log {origin!r}")
    notes = json.loads((folder / "checkpoints.json").read_text())
    if not notes:
        raise VerificationError(f"{folder.name}: no checkpoint")
    checkpoints = [_opened(folder, i, note, keys) for i, note in enumerate(notes)]
    _check_chain(folder, checkpoints)
    ours = [n for n in gossip if _origin_of(n) == origin]
    for first, second in forks([*notes, *ours], keys):
        raise VerificationError(f"{origin}: the log signed two trees of one size (a fork):\n{first}\n{second}")
    last = checkpoints[-1]
    _check_gossip_compared(origin, ours, keys, {c.size for c in checkpoints}, last.size)
    cosigned = cosigners(notes[-1], trust.witnesses)
    if len(cosigned) < trust.quorum:
        missing = sorted({w.name for w in trust.witnesses} - set(cosigned))
        raise VerificationError(
            f"{origin}: the last checkpoint has {len(cosigned)} of the {trust.quorum} witness cosignatures "
            f"required (missing: {', '.join(missing)})"
        )
    entries, commitments = _check_entries(folder, last)
    return {
        "origin": origin,
        "tree_size": last.size,
        "checkpoints": len(checkpoints),
        "entries": entries,
        "cosigned_by": cosigned,
        "commitments": commitments,
    }


def _origin_of(note: str) -> str:
    return split_note(note)[0].split("\n", 1)[0]


def _check_gossip_compared(origin: str, gossip: Sequence[str], keys: list[NoteKey], sizes: set[int], last: int):
    """A gossiped checkpoint is compared with the bundle's of its size; one of a size the bundle has none of
    cannot be, and passing it over would read as "no fork" (a split view grows on both sides, so a witness's
    latest is rarely of a size the other side signed)."""
    for note in gossip:
        size = open_checkpoint(note, keys).size
        if size not in sizes:
            why = "its checkpoints skip that size"
            if size > last:
                why = f"it is newer than the bundle's last, {last}: export a later bundle"
            raise VerificationError(
                f"{origin}: a gossiped checkpoint of size {size} cannot be compared: the bundle has no checkpoint of "
                f"that size ({why}); a fork can hide there"
            )


def _opened(folder: Path, position: int, note: str, keys: list[NoteKey]) -> Checkpoint:
    try:
        return open_checkpoint(note, keys)
    except NoteError as e:
        raise VerificationError(f"{folder.name}: checkpoint {position}: {e}") from None


def _check_chain(folder: Path, checkpoints: list[Checkpoint]) -> None:
    """Each checkpoint must extend the one before it, by the consistency proofs in consistency.json."""
    proofs = json.loads((folder / "consistency.json").read_text())
    if len(proofs) != len(checkpoints) - 1:
        raise VerificationError(f"{folder.name}: {len(proofs)} consistency proofs for {len(checkpoints)} checkpoints")
    for position, (old, new, proof) in enumerate(zip(checkpoints, checkpoints[1:], proofs, strict=False), 1):
        if (proof["old"], proof["new"]) != (old.size, new.size):
            raise VerificationError(f"{folder.name}: consistency proof {position} is for other sizes")
        try:
            verify_consistency(old.size, new.size, old.root, new.root, [base64.b64decode(p) for p in proof["proof"]])
        except ProofError as e:
            raise VerificationError(f"{folder.name}: checkpoint {position} does not extend the last: {e}") from None


def _check_entries(folder: Path, last: Checkpoint) -> tuple[int, list[dict]]:
    count, commitments, previous = 0, [], -1
    with open(folder / "entries.jsonl") as lines:
        for number, line in enumerate(lines, 1):
            where = f"{folder.name}/entries.jsonl line {number}"
            try:
                item = json.loads(line)
                leaf = base64.b64decode(item["leaf"], validate=True)
                proof = [base64.b64decode(p, validate=True) for p in item["proof"]]
                public = json.loads(leaf)
                if item["tree_size"] != last.size:
                    raise VerificationError("its proof is not under the last checkpoint")
                if canonical(public) != leaf:
                    raise VerificationError("the leaf is not canonical JSON")
                verify_inclusion(item["leaf_index"], last.size, leaf_hash(leaf), proof, last.root)
                if "leaf_hash" in item and base64.b64decode(item["leaf_hash"], validate=True) != leaf_hash(leaf):
                    raise VerificationError("its leaf_hash is not the hash of its leaf")
                check_openings(public, item.get("openings", {}))
                if item["leaf_index"] <= previous:  # each entry once: a count of entries means what it says
                    raise VerificationError("entries must be listed once each, in the order of the log")
            except MALFORMED as e:
                raise VerificationError(f"{where}: {_reason(e)}") from None
            count, previous = count + 1, item["leaf_index"]
            if public.get("kind") == "commitment":
                opened = sorted(item.get("openings", {}))
                commitments.append({"index": item["leaf_index"], **_without(public, "commit"), "opened": opened})
    return count, commitments


def _without(public: dict, key: str) -> dict:
    return {k: v for k, v in public.items() if k != key}


def verify_inclusion_proof(proof: dict, keys: Sequence[NoteKey]) -> Checkpoint:
    """An entry's inclusion proof (as `log prove` and reports write it) under its signed checkpoint."""
    checkpoint = open_checkpoint(proof["checkpoint"], keys)
    leaf = base64.b64decode(proof["leaf"])
    if leaf_hash(leaf) != base64.b64decode(proof["leaf_hash"]) or proof["tree_size"] != checkpoint.size:
        raise ProofError(f"entry {proof['leaf_index']}: leaf hash or tree size does not match its checkpoint")
    path = [base64.b64decode(p) for p in proof["proof"]]
    verify_inclusion(proof["leaf_index"], checkpoint.size, leaf_hash(leaf), path, checkpoint.root)
    return checkpoint


def _verify_proofs(path: Path, log_keys: list[str]) -> int:
    """`--proofs FILE`: a proof (as `canarygate log prove` prints it) or a JSON list of them, with the log keys
    given on the command line alone."""
    if not log_keys:
        raise VerificationError("--proofs needs the log's public key: --log-key VKEY")
    proofs = json.loads(path.read_text())
    if isinstance(proofs, dict):
        proofs = [proofs]
    if not proofs:  # a report that attributes nothing has none: nothing here is checked, so nothing is OK
        raise VerificationError(f"{path}: no inclusion proofs to verify")
    keys = [NoteKey.parse(k) for k in log_keys]
    for proof in proofs:
        checkpoint = verify_inclusion_proof(proof, keys)
        entry = json.loads(base64.b64decode(proof["leaf"]))
        canaries = ", ".join(c.get("id", "?") for c in entry.get("canaries") or ()) or "none"
        print(f"entry {proof['leaf_index']} of {checkpoint.origin}: {entry.get('kind')} at {entry.get('time')}, "
              f"identity {entry.get('identity')}, canaries {canaries}")  # fmt: skip
    print(f"{len(proofs)} inclusion proofs verified against signed checkpoints: OK")
    return 0


def load_trust(bundle: Path, log_keys: list[str], witnesses: list[str], quorum: int | None) -> Trust:
    from_bundle = []
    if not log_keys:
        log_keys = [line for f in sorted(bundle.glob("log-*/vkeys")) for line in f.read_text().split()]
        from_bundle.append("log keys")
    if not witnesses:  # the bundle's list, or its lack of one: either way the bundle chose which cosign
        listed = bundle / "witnesses"
        witnesses = listed.read_text().split() if listed.exists() else []
        from_bundle.append("witness keys")
    parsed = [NoteKey.parse(w) for w in witnesses]
    return Trust([NoteKey.parse(k) for k in log_keys], parsed, len(parsed) if quorum is None else quorum, from_bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a canarygate evidence bundle.")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--log-key", action="append", default=[], help="a log's verifier key to trust")
    parser.add_argument("--witness", action="append", default=[], help="a witness's verifier key to trust")
    parser.add_argument("--quorum", type=int, help="cosignatures required (default: every trusted witness)")
    parser.add_argument("--gossip", action="append", default=[], help="a file holding a signed checkpoint")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--proofs", help="instead: check a report's proofs.json with the --log-key keys alone")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    try:
        if args.proofs:
            return _verify_proofs(Path(args.proofs), args.log_key)
        trust = load_trust(bundle, args.log_key, args.witness, args.quorum)
        gossip = [Path(p).read_text() for p in args.gossip]
        folders = sorted(bundle.glob("log-*"))
        if not folders:
            raise VerificationError(f"{bundle}: no log-* folder; not a canarygate bundle")
        results = [verify_log(folder, trust, gossip) for folder in folders]
        origins = [result["origin"] for result in results]
        if len(set(origins)) < len(origins):  # a log copied into a second folder would be counted twice
            raise VerificationError(f"{bundle}: one log in two folders ({', '.join(sorted(set(origins)))})")
        for note in gossip:
            if _origin_of(note) not in origins:
                raise VerificationError(f"a gossiped checkpoint of {_origin_of(note)!r}, a log not in this bundle")
    except (*MALFORMED, OSError) as e:
        print(f"REJECTED: {_reason(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "trusted_from_bundle": trust.from_bundle, "logs": results}, indent=1))
        return 0
    for result in results:
        witnesses = ", ".join(result["cosigned_by"]) or "no witness"
        print(
            f"{result['origin']}: {result['entries']} entries under a tree of {result['tree_size']}, "
            f"{result['checkpoints']} checkpoints, cosigned by {witnesses}: OK"
        )
        for c in result["commitments"]:
            opened = f"; opened: {', '.join(c['opened'])}" if c["opened"] else ""
            print(f"  commitment {c['index']} at {c.get('time')}: {c.get('subject')} {c.get('epoch', '')}{opened}")
    for what in trust.from_bundle:
        print(f"note: the {what} came from the bundle itself; pass them on the command line to pin them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
