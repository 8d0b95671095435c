"""The exact tails every detector shares: never 0 where the true value is positive, and exact at k = 1."""

from __future__ import annotations

import pytest
from scipy import stats

from gateway.canary.detect import attribute
from gateway.canary.phrases import SPACE, canaries_of, phrase
from gateway.stats import TINY, binomial_sf, hypergeometric_sf
from gateway.watermark.scoring import poisson_binomial_sf


def test_a_tail_too_small_for_a_float_is_the_smallest_float_not_zero():
    """A large marked corpus holding all 300 green words: the true tail is about 1e-337."""
    assert hypergeometric_sf(300, 40_000, 300, 3_000) == TINY
    assert binomial_sf(400, 400, 1e-3) == TINY
    assert poisson_binomial_sf(1100, [0.5] * 1100) == TINY
    assert hypergeometric_sf(301, 40_000, 300, 3_000) == binomial_sf(401, 400, 0.5) == 0.0  # impossible: 0


def test_canary_attribution_is_the_exact_hypergeometric_tail():
    """M distinct phrases drawn from the space hold k of an identity's canaries; at k = 1 the binomial tail
    the attribution used was below the exact one."""
    key = b"c" * 32
    owners = {("alice", 0): canaries_of(key, "alice", 0, 8)}
    others = [i for i in range(SPACE) if i not in {c.index for c in owners[("alice", 0)]}][:999]
    text = "\n".join(phrase(i) for i in [owners[("alice", 0)][0].index, *others])
    (found,), drawn = attribute([text], owners)
    assert drawn == 1000
    assert found.raw_p_value == pytest.approx(stats.hypergeom.sf(0, SPACE, 8, 1000), rel=1e-9)
    assert found.raw_p_value > stats.binom.sf(0, 1000, 8 / SPACE)
