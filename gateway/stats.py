"""Exact tails and multiple testing, shared by every detector (watermark, sampling bias, canaries, forensics).

A tail too small for a float is reported as the smallest positive normal float, an upper bound of the
true value: an exact p-value is never 0, and a corrected one never becomes 0 either.
"""

from __future__ import annotations

import math
import sys

TINY = sys.float_info.min


def holm(p_values: list[float], untested: int = 0) -> list[float]:
    """Holm's step-down adjustment, in the input order, in a family that also held `untested` hypotheses
    not tested (counted as p = 1: a key committed to but not disclosed still had its chance to be chosen)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running, family = [0.0] * len(p_values), 0.0, len(p_values) + untested
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (family - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space from k up."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                        + (n - i) * math.log1p(-p))  # fmt: skip
        total += term
        if term < total * 1e-17:
            break
    return min(1.0, max(total, TINY))


def hypergeometric_sf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X >= k) for X ~ Hypergeometric: `draws` from `population` holding `successes`; summed exactly in logs."""
    low, high = max(0, draws - (population - successes)), min(draws, successes)
    if k <= low:
        return 1.0
    if k > high:
        return 0.0

    def log_choose(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    total = log_choose(population, draws)
    terms = (log_choose(successes, i) + log_choose(population - successes, draws - i) for i in range(k, high + 1))
    return min(1.0, max(sum(math.exp(t - total) for t in terms), TINY))
