"""The fixed keyed preference test, exactly.

For each set that appears in the texts, the member used most casts one vote (a tie casts none); a vote
hits when it is the key's preferred member. If the texts were written without the key, its preference in
each set is uniform over the set's members and independent across sets, so the number of hits is
Poisson-binomial with success probabilities 1/|set|: the p-value is its exact upper tail, by convolution.
One vote per distinct set means a writer's habit counts once, however often it recurs.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from ..stats import TINY
from .sites import Scanner, prompt_sets
from .wordsets import WordSets

if TYPE_CHECKING:
    from .scheme import LexicalKey


def vote_counts(items: list[tuple[str, str]], sets: WordSets) -> dict[int, Counter]:
    """Per set, how often each member was used at a site, over all (text, prompt) items.

    A set the item's prompt uses is not scored in its text: the text may have taken its member from the
    prompt (a passage repeated, reordered, or one word of it), and a prompt that holds marked text would
    then make a copy look marked. The marks skip less (only a site whose two preceding words and itself are
    in the prompt, so that listing members cannot switch them off); a site the detector skips is only lost."""
    counts: dict[int, Counter] = {}
    for text, prompt in items:
        skipped = prompt_sets(prompt, sets) if prompt else frozenset()
        scanner = Scanner(sets)
        scanner.feed(text)
        scanner.flush()
        for site in scanner.sites:
            if site.set_index not in skipped:
                counts.setdefault(site.set_index, Counter())[site.member] += 1
    return counts


def votes(counts: dict[int, Counter]) -> list[tuple[int, int]]:
    """(set index, member used most) for every set with a clear majority; a tie casts no vote."""
    out = []
    for set_index, members in counts.items():
        ranked = members.most_common(2)
        if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
            out.append((set_index, ranked[0][0]))
    return out


def fixed_scheme_p(counts: dict[int, Counter], key: LexicalKey) -> tuple[float, int, int, int]:
    """(p-value, votes, hits, sites) of the fixed keyed preference test."""
    cast = votes(counts)
    sets = key.sets.sets
    hits = sum(member == key.preferred[set_index] for set_index, member in cast)
    probabilities = [1 / len(sets[set_index].members) for set_index, _ in cast]
    sites = sum(sum(members.values()) for members in counts.values())
    return poisson_binomial_sf(hits, probabilities), len(cast), hits, sites


def poisson_binomial_pmf(probabilities: list[float]) -> np.ndarray:
    """P(X = k), k = 0..n, for X a sum of independent Bernoulli(p_i): the exact distribution, by convolution."""
    dist = np.zeros(len(probabilities) + 1)
    dist[0] = 1.0
    for n, p in enumerate(probabilities, 1):
        dist[1 : n + 1] = dist[1 : n + 1] * (1 - p) + dist[:n] * p
        dist[0] *= 1 - p
    return dist


def poisson_binomial_sf(k: int, probabilities: list[float]) -> float:
    """P(X >= k): the exact upper tail, summed term by term (no subtraction, so tiny tails stay exact)."""
    if k <= 0:
        return 1.0
    if k > len(probabilities):
        return 0.0
    return float(min(1.0, max(poisson_binomial_pmf(probabilities)[k:].sum(), TINY)))
