"""From signals to a score and a tier: pure functions, each threshold with its reason.

Each behaviour contributes a strength in [0, 1]; strengths combine as independent evidence (noisy-or:
1 - prod(1 - s)). The strengths are capped so that one behaviour an honest account may also show (heavy
use, one template, code only, a script's regular timing, many reasoning requests) reaches `watch` and no
further, and `suspect` takes two of them, or one that honest traffic does not produce: many accounts
sweeping one template with many different fills, or repeated probing for the system prompt.

Tiers move with hysteresis (enter above one threshold, leave below a lower one) so that a score near a
boundary does not flap, and only along the engine's ladder (normal, watch, suspect): `blocked`,
`unlimited` and any tier an operator pinned are never changed by the engine.
"""

from __future__ import annotations

from .signals import Signals

LADDER = ("normal", "watch", "suspect")
ENTER = {"watch": 0.5, "suspect": 0.8}
LEAVE = {"watch": 0.3, "suspect": 0.6}  # below these, an identity steps down one tier
MIN_REQUESTS = 20  # shares and spreads of fewer (decayed) requests say little
ROUND_THE_CLOCK_MIN = 40  # requests (decayed) before the hours of the day they fall in say anything


def _ramp(value: float, low: float, high: float) -> float:
    return min(max((value - low) / (high - low), 0.0), 1.0)


def strengths(s: Signals) -> dict[str, float]:
    """Each behaviour's strength; only those above zero are returned (they explain the score)."""
    # how far the shares and spreads are to be believed: a ramp, not a step, so that an account whose
    # decayed count hovers at the threshold (ten requests a day decay to about twenty) does not see its score
    # jump by 0.6 across both hysteresis bands at every crossing
    enough = _ramp(s.requests, MIN_REQUESTS / 2, MIN_REQUESTS)
    found = {
        # a person reads at most a few hundred long answers a day
        "volume": 0.6 * _ramp(s.per_day, 300, 1000),
        # one skeleton for most requests: a template being swept; or, reworded, its recent openings or closings
        # drawn from a few words (a person's begin and end with their topic: of 16 random AlpacaEval
        # instructions, 61% or more of the opening words are distinct, and 72% of the closing words, in 99
        # draws of 100; of a template reworded from interchangeable parts, about a third). One behaviour: the
        # stronger reading counts. Like the skeletons, the ends are read from the caller's latest message, so
        # an app's fixed system prompt, or a long conversation, does not read as a template.
        "template": 0.6 * enough * max(_ramp(s.concentration, 0.5, 0.8), _ramp(0.5 - s.variety, 0.0, 0.15)),
        # most of its requests on templates that many accounts are sweeping: a campaign spread over accounts.
        # One such request can be chance (a question of one's own whose end a campaign happens to sweep);
        # four cannot. People's popular questions never count (signals.POPULAR_BY): over 5 simulated months
        # of 1,000 people, none had more than one such request (benchmarks/risk_seeds.py).
        "shared_template": 0.95 * _ramp(s.swept_share, 0.3, 0.6) * _ramp(s.swept_requests, 1, 4),
        "reasoning": 0.6 * enough * _ramp(s.reasoning, 0.5, 0.8),
        "system_prompt_probes": 0.9 * _ramp(s.probes, 1, 4),
        "avoids_marks": 0.5 * enough * _ramp(s.unmarked, 0.7, 0.9),
        # a person's gaps spread over orders of magnitude (a Poisson process gives 1.28 on this scale)
        "machine_timing": 0.6 * enough * _ramp(0.6 - s.timing_spread, 0.0, 0.3),
        # people's prompts vary in length; a template's do not
        "uniform_prompts": 0.5 * enough * _ramp(0.35 - s.length_spread, 0.0, 0.15),
        # people sleep, in whatever time zone: an account whose requests fill every hour of the day for days
        # (a third of them in its quietest eight hours, as a script's would) never rests. Apps that serve
        # users round the clock do this too, so alone it reaches watch and no further.
        "round_the_clock": 0.6 * _ramp(s.quiet_share, 0.12, 0.25) if s.requests >= ROUND_THE_CLOCK_MIN else 0.0,
        # many accounts behind one network, this one templated
        "shared_network": 0.4 * _ramp(s.network_accounts, 10, 40) if s.concentration >= 0.4 else 0.0,
    }
    return {name: round(value, 4) for name, value in found.items() if value > 0}


def score(found: dict[str, float]) -> float:
    remaining = 1.0
    for value in found.values():
        remaining *= 1.0 - value
    return 1.0 - remaining


def next_tier(current: str, value: float) -> str:
    """The tier after this score, from `current` (a tier on the ladder), with hysteresis."""
    if value >= ENTER["suspect"]:
        return "suspect"
    if current == "suspect":
        return "suspect" if value >= LEAVE["suspect"] else "watch"
    if value >= ENTER["watch"]:
        return "watch"
    if current == "watch" and value >= LEAVE["watch"]:
        return "watch"
    return "normal"
