"""What the detection commands need from the keys and the log: whose canaries to test, what was committed."""

from __future__ import annotations

from .. import canary, watermark
from ..canary.phrases import Canary


def canary_owners(key: bytes, names: list[str], epochs: list[int], count: int) -> dict[tuple[str, int], list[Canary]]:
    """Every identity's canaries in every key epoch: the candidates an attribution is tested among."""
    return {(name, epoch): canary.canaries_of(key, name, epoch, count) for name in names for epoch in epochs}


def prior_commitments(found: list[dict], epochs, sets_version: str, greens=()) -> dict[str, dict | None]:
    """For each thing a watermark detection used (the lexical keys, and the sampling-bias green lists if
    tested), the earliest commitment to it in `found` (or None)."""
    wanted = {f"watermark-key@{key.epoch}": ("watermark-key", "fingerprint", key.fingerprint) for key in epochs}
    wanted |= {f"sampling-bias-key@{g.epoch}": ("sampling-bias-key", "fingerprint", g.fingerprint) for g in greens}
    wanted["word-sets"] = ("word-sets", "digest", sets_version)
    wanted["detector"] = ("detector", "digest", watermark.detector_digest())
    return {
        name: next((_brief(c) for c in found if c.get("subject") == subject and c.get(field) == value), None)
        for name, (subject, field, value) in wanted.items()
    }


def _brief(commitment: dict) -> dict:
    return {k: commitment[k] for k in ("time", "log", "index", "checkpointed")}
