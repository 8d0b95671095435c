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

from .sites import Scanner, prompt_trigrams
from .wordsets import WordSets

if TYPE_CHECKING:
    from .scheme import LexicalKey


def vote_counts(items: list[tuple[str, str]], sets: WordSets) -> dict[int, Counter]:
    """Per set, how often each member was used at a site, over all (text, prompt) items."""
    counts: dict[int, Counter] = {}
    for text, prompt in items:
        scanner = Scanner(sets, prompt_trigrams(prompt, sets) if prompt else frozenset())
        scanner.feed(text)
        scanner.flush()
        for site in scanner.sites:
            counts.setdefault(site.set_index, Counter())[site.member] += 1
    return counts


def fixed_scheme_p(counts: dict[int, Counter], key: LexicalKey) -> tuple[float, int, int, int]:
    """(p-value, votes, hits, sites) of the fixed keyed preference test."""
    probabilities, hits, sites = [], 0, 0
    for set_index, members in counts.items():
        sites += sum(members.values())
        ranked = members.most_common(2)
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            continue  # a tie casts no vote
        probabilities.append(1 / len(key.sets.sets[set_index].members))
        hits += ranked[0][0] == key.preferred[set_index]
    return poisson_binomial_sf(hits, probabilities), len(probabilities), hits, sites


def poisson_binomial_sf(k: int, probabilities: list[float]) -> float:
    """P(X >= k) for X a sum of independent Bernoulli(p_i): the exact distribution, by convolution."""
    if k <= 0:
        return 1.0
    dist = np.zeros(len(probabilities) + 1)
    dist[0] = 1.0
    for n, p in enumerate(probabilities, 1):
        dist[1 : n + 1] = dist[1 : n + 1] * (1 - p) + dist[:n] * p
        dist[0] *= 1 - p
    return float(min(1.0, dist[k:].sum()))
