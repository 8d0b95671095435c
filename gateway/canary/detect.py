"""Attribution: whose canaries does a suspect's text carry, and how sure can one be?

The text is scanned for every phrase of the canary space (on words: case, punctuation and spacing aside).
Under the null hypothesis that the text owes nothing to identity i's answers, each distinct phrase found
is one of SPACE equally likely phrases, unrelated to i's `count` canaries; so the number of i's canaries
among M distinct phrases found is Hypergeometric (M drawn from SPACE, `count` of them i's), and the
p-value is its exact upper tail. Identities are tested together: p-values are Holm-adjusted over every
identity and epoch tested, so that testing many accounts cannot manufacture an attribution.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stats import holm, hypergeometric_sf
from ..watermark.sites import loosened
from .phrases import SPACE, Canary, phrases_in


@dataclass(frozen=True)
class Attribution:
    identity: str
    epoch: int
    canaries: tuple[str, ...]  # ids of its canaries found
    p_value: float  # Holm-adjusted over every identity and epoch tested
    raw_p_value: float

    def as_json(self) -> dict:
        return {"identity": self.identity, "epoch": self.epoch, "canaries": list(self.canaries),
                "p_value": self.p_value, "raw_p_value": self.raw_p_value}  # fmt: skip


def attribute(
    texts: list[str], owners: dict[tuple[str, int], list[Canary]], prompts: list[str] | None = None
) -> tuple[list[Attribution], int]:
    """Every identity and epoch in `owners` (its canaries) tested against the texts; returns those whose
    canaries appear (best first) and M, the number of distinct canary-space phrases found. A phrase that
    is also in the text's prompt (`prompts`, in the same order; read loosely, as the watermark's detector reads
    one: soft hyphens, other spaces) is not counted: a suspect may repeat it."""
    prompts = prompts or [""] * len(texts)
    found = set().union(*(phrases_in(t) - phrases_in(loosened(p)) for t, p in zip(texts, prompts, strict=True)))
    rows = []
    for (identity, epoch), canaries in owners.items():
        hits = tuple(c.id for c in canaries if c.index in found)
        rows.append((identity, epoch, hits, hypergeometric_sf(len(hits), SPACE, len(canaries), len(found))))
    adjusted = holm([r[3] for r in rows])
    results = [Attribution(i, e, h, adj, p) for (i, e, h, p), adj in zip(rows, adjusted, strict=True) if h]
    return sorted(results, key=lambda a: a.p_value), len(found)
