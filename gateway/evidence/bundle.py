"""`canarygate log export`: a self-contained folder of entries, proofs, checkpoints, cosignatures and keys,
with the standalone verifier that checks it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from ..config import Settings
from . import merkle
from .note import NoteKey
from .reader import LogReader
from .tenants import Erased
from .verifier import MALFORMED, Checkpoint, VerificationError, check_openings, cosigners, split_note

README = """# canarygate evidence bundle

Check it with nothing but Python and the `cryptography` package:

    python verify.py . [--log-key VKEY]... [--witness VKEY]... [--quorum K]

`verify.py` is canarygate's `gateway/evidence/verifier.py`, a single file you can read in full. Whoever
sent this bundle could have changed it: compare it with the published file of the version named in
`verifier.sha256` (or read it) before trusting its verdict. Pass the log's and the witnesses' verifier keys
as you obtained them from their owners; without them, `verify.py` trusts the keys in this folder and says so.

Each folder `log-<n>/` holds one gateway log (one per worker process):
- `origin` and `vkeys`: the log's name and its Ed25519 verifier keys (C2SP signed-note `vkey` form; the
  current key first, then keys retired by rotation).
- `checkpoints.json`: signed checkpoints (C2SP tlog-checkpoint notes), oldest first, each with the witness
  cosignatures it received (C2SP tlog-cosignature v1). Every proof in the bundle is against the last one.
- `consistency.json`: RFC 9162 consistency proofs between successive checkpoints.
- `entries.jsonl`: one line per entry: `leaf_index`, `leaf` (the canonical entry, base64), `leaf_hash`,
  `tree_size` and `proof` (RFC 9162 inclusion proof, base64 hashes) under the last checkpoint, and, for the
  fields exported with `--reveal` (or disclosed commitments), `openings` (value and salt, base64).
`witnesses` lists the witness keys the gateway was configured with.

Entries of kind `commitment` were written before what they commit to was used: a watermark key epoch, a
word-set file, a detector version. An opened `watermark_key` lets anyone check that the key a detection
used is the one committed to at that time: SHA-256(salt || value) equals `commit["watermark_key"]`.
"""


def export(
    readers: list[LogReader],
    out: Path,
    identity: str | None,
    reveal: list[str],
    settings: Settings,
    disclose_epochs: list[int] = (),
) -> tuple[int, list[str]]:
    """Write the bundle into a new or empty folder; returns the number of entries written and warnings."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # an earlier bundle's logs would ship too
        raise FileExistsError(f"{out} exists and is not an empty folder: export into a new one")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # revealed fields are plaintext prompts and answers
    os.umask(0o077)
    (out / "README.md").write_text(README)
    shutil.copyfile(Path(__file__).with_name("verifier.py"), out / "verify.py")
    digest = hashlib.sha256((out / "verify.py").read_bytes()).hexdigest()
    (out / "verifier.sha256").write_text(f"{digest}  verify.py (canarygate {_version()})\n")
    witnesses = [NoteKey.parse(w.vkey) for w in settings.evidence.witnesses]
    (out / "witnesses").write_text("".join(w.vkey() + "\n" for w in witnesses))
    count, warnings = 0, []
    for reader in readers:
        folder = out / f"log-{reader.dir.name}"
        folder.mkdir(exist_ok=True)
        origin = reader.origin()
        (folder / "origin").write_text(origin + "\n")
        if reader.keys is not None:
            (folder / "vkeys").write_text("".join(k.vkey() + "\n" for k in reader.keys.verifiers(origin)))
        notes = _up_to_witnessed(_with_cosignatures(reader.checkpoints(), reader.cosigned()), witnesses)
        if notes and len(cosigners(notes[-1], witnesses)) < len(witnesses):
            warnings.append(f"{origin}: no checkpoint is cosigned by every configured witness yet")
        (folder / "checkpoints.json").write_text(json.dumps(notes, indent=1))
        (folder / "consistency.json").write_text(json.dumps(_consistency(reader, notes), indent=1))
        count += _entries(reader, folder, notes, identity, reveal, disclose_epochs)
    return count, warnings


def _with_cosignatures(notes: list[str], cosigned: list[str]) -> list[str]:
    """Each checkpoint note with every witness signature line received for the same text."""
    extra: dict[str, list[str]] = {}
    for note in cosigned:
        text, _, block = note.rpartition("\n\n")
        extra.setdefault(text, []).extend(block.splitlines())
    merged = []
    for note in notes:
        text, _, block = note.rpartition("\n\n")
        lines = block.splitlines()
        lines += [line for line in dict.fromkeys(extra.get(text, [])) if line not in lines]
        merged.append(f"{text}\n\n" + "".join(line + "\n" for line in lines))
    return merged


def _up_to_witnessed(notes: list[str], witnesses: list[NoteKey]) -> list[str]:
    """Checkpoints up to the last one cosigned by every configured witness (all of them if none is)."""
    for end in range(len(notes), 0, -1):
        if len(cosigners(notes[end - 1], witnesses)) == len(witnesses):
            return notes[:end]
    return notes


def _consistency(reader: LogReader, notes: list[str]) -> list[dict]:
    sizes = [Checkpoint.parse(split_note(n)[0]).size for n in notes]
    proofs = []
    for old, new in zip(sizes, sizes[1:], strict=False):
        proof = merkle.consistency_proof(reader.stored_subtree, old, new)
        proofs.append({"old": old, "new": new, "proof": [base64.b64encode(p).decode() for p in proof]})
    return proofs


def _entries(reader, folder, notes, identity, reveal, disclose_epochs) -> int:
    covered = Checkpoint.parse(split_note(notes[-1])[0]).size if notes else 0
    count = 0
    with open(folder / "entries.jsonl", "w") as f:
        for item in reader.entries(strict=False):
            if item.index >= covered:
                break  # not under the bundle's checkpoint
            public = item.public
            disclosed = _disclosed(public, disclose_epochs)
            if identity and public.get("identity") != identity and public.get("kind") != "commitment":
                continue
            line = reader.prove(item.index, notes[-1])
            del line["checkpoint"]
            fields = disclosed or (reveal if public.get("kind") != "commitment" else [])
            if fields:
                try:
                    line["openings"] = {k: v for k, v in reader.open_all(item).items() if k in fields}
                except Erased:
                    line["erased"] = True
            f.write(json.dumps(line) + "\n")
            count += 1
    return count


def _disclosed(public: dict, epochs: list[int]) -> list[str]:
    if (
        public.get("kind") == "commitment"
        and public.get("subject") == "watermark-key"
        and public.get("epoch") in epochs
    ):
        return ["watermark_key"]
    return []


def bundle_commitments(bundle: Path) -> list[dict]:
    """The commitment entries of a bundle's logs, each with the log, index and any opened fields, whose
    openings are checked against the commitments (the rest of the bundle is verify.py's job)."""
    if not bundle.is_dir():
        raise VerificationError(f"{bundle}: no such bundle folder")
    found = []
    for folder in sorted(bundle.glob("log-*")):
        try:
            found += _commitments_of(folder)
        except VerificationError:  # an opening that does not match its commitment: says so itself
            raise
        except (OSError, *MALFORMED) as e:
            raise VerificationError(f"{folder}: not a bundle's log ({type(e).__name__}: {e})") from None
    return found


def _commitments_of(folder: Path) -> list[dict]:
    found = []
    origin = (folder / "origin").read_text().strip()
    for line in (folder / "entries.jsonl").read_text().splitlines():
        row = json.loads(line)
        public = json.loads(base64.b64decode(row["leaf"]))
        if public.get("kind") == "commitment":
            check_openings(public, row.get("openings", {}))
            opened = {k: base64.b64decode(v["value"]) for k, v in row.get("openings", {}).items()}
            # checked here: the openings only; signatures and proofs are verify.py's to check
            found.append({**public, "log": origin, "index": row["leaf_index"], "checkpointed": "unverified",
                          **opened})  # fmt: skip
    return found


def committed_epochs(found: list[dict]) -> set[int]:
    """The epochs whose watermark key `found` holds a commitment to, disclosed or not."""
    return {c["epoch"] for c in found if c.get("subject") == "watermark-key"}


def disclosed_keys(found: list[dict]) -> list[tuple[int, bytes]]:
    """(epoch, key) of every watermark key opened in `found`."""
    keys = {
        c["epoch"]: c["watermark_key"] for c in found if c.get("subject") == "watermark-key" and "watermark_key" in c
    }
    return sorted(keys.items())


def _version() -> str:
    try:
        return metadata.version("canarygate")
    except metadata.PackageNotFoundError:
        return "unknown version"
