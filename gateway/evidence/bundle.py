"""`canarygate log export`: a self-contained folder of entries, inclusion proofs, checkpoints and keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import Settings
from .keys import Keys
from .reader import LogReader

README = """# canarygate evidence bundle

Each folder `log-<n>/` holds one gateway log (one per worker process):
- `origin` and `vkey`: the log's name and its Ed25519 verifier key (C2SP signed-note `vkey` form).
- `checkpoints.json`: every signed checkpoint (C2SP tlog-checkpoint notes), oldest first.
- `entries.jsonl`: one line per entry: `leaf_index`, `leaf` (the canonical entry, base64), `leaf_hash`,
  `tree_size` and `proof` (RFC 6962 inclusion proof, base64 hashes) under the last checkpoint, and, for
  the fields exported with `--reveal`, `openings` (value and salt, base64).

To check an entry with nothing but its public key:
1. Verify the last checkpoint's signature: the signed text is everything before the blank line; the
   signature line is `— <origin> base64(key id || Ed25519 signature)`; key id = SHA-256(origin || "\\n" ||
   0x01 || public key)[:4].
2. leaf_hash = SHA-256(0x00 || leaf); fold the proof as RFC 9162 section 2.1.3.2 says (nodes are
   SHA-256(0x01 || left || right)) and compare with the checkpoint's root for `tree_size`.
3. A revealed field is genuine if SHA-256(salt || value) equals `commit[field]` inside the leaf (JSON).
`canarygate log verify` and `gateway.evidence.reader.verify_proof` do the same.
"""


def export(readers: list[LogReader], out: Path, identity: str | None, reveal: list[str], settings: Settings) -> int:
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # revealed fields are plaintext prompts and answers
    os.umask(0o077)
    (out / "README.md").write_text(README)
    count = 0
    for reader in readers:
        folder = out / f"log-{reader.dir.name}"
        folder.mkdir(exist_ok=True)
        origin = reader.origin()
        keys: Keys | None = reader.keys
        (folder / "origin").write_text(origin + "\n")
        if keys is not None:
            (folder / "vkey").write_text(keys.verifiers(origin)[0].vkey() + "\n")
        notes = reader.checkpoints()  # every proof in the bundle is against the last of these
        (folder / "checkpoints.json").write_text(json.dumps(notes, indent=1))
        covered = int(notes[-1].split("\n")[1]) if notes else 0
        with open(folder / "entries.jsonl", "w") as f:
            for item in reader.entries(strict=False):
                if identity and item.public.get("identity") != identity:
                    continue
                if item.index >= covered:
                    break  # not under the bundle's checkpoint
                line = reader.prove(item.index, notes[-1])
                del line["checkpoint"]
                if reveal:
                    opened = reader.open_all(item)
                    line["openings"] = {k: v for k, v in opened.items() if k in reveal}
                f.write(json.dumps(line) + "\n")
                count += 1
    return count
