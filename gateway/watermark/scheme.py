"""The lexical scheme: which member of each set a key prefers, and how an epoch's key is made and vetted.

Keying, and why: each key fixes one preferred member per set ("fixed keyed preference"). A student model
trained on marked text learns a fixed preference far more readily than one that changes with context
(benchmarks/results/watermark-keying.md records the experiment), and distillation is what the mark is
for. The price is that the null hypothesis holds over the draw of the key, not over texts: for one fixed
key, natural text could happen to agree with it. Two things keep that honest: the test counts one vote per
distinct set (so a text's repeated habits count once), and a new key is vetted before use: an epoch's key
is the first candidate, derived from the watermark master key, whose test on the shipped reference text
(unmarked answers of twelve models) gives p >= VETTING_ALPHA. Rejecting only keys that look marked at
p < 0.001 removes the catastrophic ones while moving the key distribution by at most 0.1%.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
from functools import cache
from importlib import resources

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .scoring import fixed_scheme_p, vote_counts
from .wordsets import WordSets

SCHEME = "lexical-v1"
VETTING_ALPHA = 0.001


class LexicalKey:
    """One epoch's key: the preferred member of every set, computed once."""

    def __init__(self, key: bytes, sets: WordSets, epoch: int = 0) -> None:
        self.epoch = epoch
        self.sets = sets
        self.secret = key  # disclosed only through the evidence log's commitment to it
        self.fingerprint = hashlib.sha256(b"canarygate lexical key fingerprint\x00" + key).hexdigest()[:16]
        self.preferred = tuple(_preference(key, s.index, len(s.members)) for s in sets.sets)


def _preference(key: bytes, set_index: int, size: int) -> int:
    digest = hmac.new(key, f"set:{set_index}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % size


def epoch_key(master: bytes, epoch: int, sets: WordSets) -> LexicalKey:
    """The epoch's key: the first vetted candidate (deterministic, so a detector derives the same one).
    The vetting is the detector's own test, on the reference text."""
    counts = vote_counts([(text, "") for text in reference_texts()], sets)
    candidate = 0
    while True:
        key = HKDF(
            hashes.SHA256(), 32, salt=None, info=f"canarygate {SCHEME} epoch {epoch} candidate {candidate}".encode()
        ).derive(master)
        lexical = LexicalKey(key, sets, epoch)
        if fixed_scheme_p(counts, lexical)[0] >= VETTING_ALPHA:
            return lexical
        candidate += 1


# in the gateway package: the watermark's own modules and the exact tails and correction they use
DETECTOR_MODULES = tuple(f"watermark/{name}" for name in ("sites.py", "whole.py", "scoring.py", "scheme.py",
                                                          "detect.py", "wordsets.py")) + ("stats.py",)  # fmt: skip


@cache
def detector_digest() -> str:
    """SHA-256 over the source of everything a detection's verdict depends on (site rules, scoring, keys)."""
    digest, package = hashlib.sha256(), resources.files(__package__.rpartition(".")[0])
    for name in DETECTOR_MODULES:
        digest.update(name.encode() + b"\x00" + package.joinpath(name).read_bytes())
    return digest.hexdigest()


@cache
def reference_texts() -> tuple[str, ...]:
    """Unmarked answers of twelve models (8 each, AlpacaEval outputs, Apache-2.0: LICENSE-reference)."""
    raw = resources.files(__package__).joinpath("reference.jsonl.gz").read_bytes()
    return tuple(json.loads(line)["text"] for line in gzip.decompress(raw).decode().splitlines())
