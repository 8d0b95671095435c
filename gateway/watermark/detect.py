"""Detection: does a body of text carry a key's preferences more than chance allows?

Each key (one per epoch) is tested with the fixed keyed preference test (`scoring`); across keys the
p-values are corrected with Holm's method, so that testing every epoch cannot manufacture a finding.
A set that the item's prompt uses is not scored in its text (scoring.vote_counts): text copied from a prompt
that holds marked text, in any order, casts no vote.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..stats import holm
from .scheme import SCHEME, LexicalKey
from .scoring import fixed_scheme_p, vote_counts
from .wordsets import WordSets


@dataclass(frozen=True)
class Finding:
    scheme: str
    epoch: int
    key: str  # the key's fingerprint
    p_value: float  # Holm-adjusted across the keys tested
    raw_p_value: float
    n: int  # votes scored: distinct sets with a clear majority
    hits: int
    sites: int

    def as_json(self) -> dict:
        return {
            "p_value": self.p_value,
            "n": self.n,
            "hits": self.hits,
            "sites": self.sites,
            "raw_p_value": self.raw_p_value,
            "epoch": self.epoch,
            "key": self.key,
        }


def adjusted(findings: list[Finding], untested: int = 0) -> list[Finding]:
    """The findings of several schemes (or texts), Holm-adjusted together from their raw p-values, in a family
    that also held `untested` hypotheses not tested."""
    values = holm([f.raw_p_value for f in findings], untested)
    return [dataclasses.replace(f, p_value=p) for f, p in zip(findings, values, strict=True)]


def detect(items: list[tuple[str, str]], keys: list[LexicalKey], sets: WordSets, untested: int = 0) -> list[Finding]:
    """Each key's test, Holm-adjusted over `keys` and `untested` more keys of the family (epochs committed to
    but not at hand)."""
    counts = vote_counts(items, sets)
    raw = [fixed_scheme_p(counts, key) for key in keys]
    adjusted = holm([r[0] for r in raw], untested)
    return [
        Finding(SCHEME, key.epoch, key.fingerprint, adj, p, n, hits, sites)
        for key, adj, (p, n, hits, sites) in zip(keys, adjusted, raw, strict=True)
    ]
