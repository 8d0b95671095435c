"""Reading a suspect's log-probabilities of given texts: the completions API with `echo` and no new tokens.

vLLM, llama.cpp and most OpenAI-compatible servers return, for each prompt, its tokens with their offsets
and log-probabilities. Exposure and reading mode both sum them from a point in each text on: the tokens
before it are the same shared context for every text of a request, so only what follows compares.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable

from .probe import AttemptFailed, Session


async def scored(session: Session, texts: list[str], start_of: Callable[[str], int]) -> list[float]:
    """Each text's summed log-probability from `start_of(text)` on (the token straddling that point counts:
    a tokenizer may join it to what precedes)."""
    body = {"model": session.target.model, "prompt": texts, "max_tokens": 0, "echo": True, "logprobs": 0}
    read = functools.partial(_scores, start_of=start_of, expected=len(texts))
    scores, _ = await session.call("/completions", body, read)
    return scores


def _scores(data: bytes, *, start_of: Callable[[str], int], expected: int) -> list[float]:
    try:
        choices = sorted(json.loads(data)["choices"], key=lambda c: c.get("index", 0))
        rows = [(str(c["text"]), c["logprobs"]["text_offset"], c["logprobs"]["token_logprobs"]) for c in choices]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise AttemptFailed(f"malformed answer (no echoed log-probabilities): {data[:120]!r}", True) from None
    if len(rows) != expected:
        raise AttemptFailed(f"asked to score {expected} texts, got {len(rows)} back", True)
    try:
        return [_score(text, list(offsets), list(logprobs), start_of(text)) for text, offsets, logprobs in rows]
    except (TypeError, ValueError):
        raise AttemptFailed("malformed log-probabilities (need text_offset and token_logprobs)", True) from None


def _score(text: str, offsets: list, logprobs: list, start: int) -> float:
    ends = [*offsets[1:], len(text)]
    return _finite_sum(lp for end, lp in zip(ends, logprobs, strict=True) if end > start and lp is not None)


def _finite_sum(logprobs) -> float:
    """The sum of log-probabilities, each a finite number at most 0: a NaN or an infinity would rank a text
    first or last for no reason, and a positive one is no probability."""
    total = 0.0
    for value in logprobs:
        if not isinstance(value, int | float) or not math.isfinite(value) or value > 1e-6:
            raise ValueError(f"not a log-probability: {value!r}")
        total += value
    return total
