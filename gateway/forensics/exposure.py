"""A canary's exposure in a suspect model: how far above its own kind the model rates it, read from log-probabilities.

After the context a canary was served in (the answer before it), the suspect scores the canary and
`candidates` other phrases drawn at random from the same phrase space: the log-probability of each
phrase's tokens, read with the completions API's `echo` (which also lets vLLM, llama.cpp and most
OpenAI-compatible servers return a prompt's log-probabilities). The canary's rank r among the N + 1
phrases gives Carlini et al.'s exposure, log2(N + 1) - log2(r), and an exact p-value, r / (N + 1): a model
that never saw the identity's answers has no reason to rate its canary above phrases drawn the same way
(the canary was itself drawn uniformly by a key the suspect does not hold), so the canary's rank is
uniform. Ties count against the canary. No verbatim reproduction is needed, only log-probabilities.
"""

from __future__ import annotations

import math
import random

from ..canary.phrases import SPACE, phrase, phrases_in
from .echo import scored
from .probe import Session

# The end of the served answer before a canary: what bears on the next line, while the echo of every token
# of every candidate stays small (about 0.5 MB per 100 candidates).
CONTEXT_CHARS = 600
SEPARATOR = "\n\n"  # how the gateway sets a canary after the answer
ALPHA = 0.001  # a canary counts as exposed when its rank puts it in the top 0.1% of its candidates
MIN_CANDIDATES = round(1 / ALPHA) - 1  # rank 1 of N + 1 = 1,000 phrases is the least that reaches the top 0.1%


def candidates(canary_index: int, count: int, seed: str) -> list[int]:
    """`count` distinct phrase indices other than the canary's, drawn with a seed (so a re-run draws the same)."""
    pool = random.Random(seed).sample(range(SPACE), min(SPACE - 1, count + 1))
    return [i for i in pool if i != canary_index][:count]


async def exposure(session: Session, item: dict, count: int, batch: int = 100) -> dict:
    """The row for one served canary: its score, rank among `count` candidates, exposure and p-value."""
    (index,) = phrases_in(item["phrase"])
    context = _tail(item["context"])
    phrases = [index, *candidates(index, count, item["canary"])]
    random.Random(item["canary"]).shuffle(phrases)  # the canary's place in the batches tells the suspect nothing
    scores: list[float] = []
    for start in range(0, len(phrases), batch):
        texts = [context + SEPARATOR + phrase(i) for i in phrases[start : start + batch]]
        scores += await scored(session, texts, lambda text: text.rfind(SEPARATOR))
    position = phrases.index(index)
    own, others = scores[position], scores[:position] + scores[position + 1 :]
    rank, p_value, exposure_bits = ranked(own, others)
    return {
        "id": item["canary"],
        "canary": item["canary"],
        "identity": item["identity"],
        "epoch": item["epoch"],
        "log": item["log"],
        "entry": item["entry"],
        "candidates": len(others),
        "score": own,
        "median_candidate_score": sorted(others)[len(others) // 2],
        "rank": rank,
        "p_value": p_value,
        "exposure": exposure_bits,
    }


def ranked(own: float, others: list[float]) -> tuple[int, float, float]:
    """(rank, exact p-value, exposure in bits) of a score among its candidates' (ties count against it)."""
    rank = 1 + sum(not s < own for s in others)
    return rank, rank / (len(others) + 1), math.log2(len(others) + 1) - math.log2(rank)


def _tail(context: str) -> str:
    if len(context) <= CONTEXT_CHARS:
        return context
    cut = context[-CONTEXT_CHARS:]
    return cut[cut.find(" ") + 1 :]
