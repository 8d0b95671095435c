"""The admission arithmetic, storage-neutral: what one admission asks for, what it is told, and the
in-memory engine that answers it.

Every limit on requests or tokens is a GCRA budget: one number per key (the theoretical arrival time), so a
check, a debit and a signed correction (refund or debt) are constant time whatever the budget's size. A
budget of N units per period admits N at once and then refills continuously, one unit every period / N.
Concurrency is a set of leases, each with an expiry that the holder's heartbeat pushes forward, so the
leases of a process that died lapse on their own.

`MemoryBudget` is the embedded engine and the local fallback. `admission.lua` and `settle.lua` are the same
logic for Redis, run atomically there; tests run both on the same inputs and compare every answer.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from enum import Enum

# Times are epoch milliseconds and TATs are stored to 0.001 ms: a float there is off by up to 0.00024 ms, the
# rounding by 0.0005. Differences that small are no wait, so that 3 per 2 s admits its third request at the
# same instant and says how many are left as whole numbers (admission.lua forgives the same).
SLACK_MS = 0.001


class Status(Enum):
    ADMITTED = 0
    LIMITED = 1
    BLOCKED = 2
    TOO_LARGE = 3  # a single request larger than a whole budget: no wait will admit it


@dataclass(frozen=True, slots=True)
class Check:
    """One limit an admission must pass: a budget of `limit` units per `period_ms`, or, with period 0,
    at most `limit` concurrent leases. Limits are at scale 1; the tier's scale applies inside."""

    key: str
    unit: str  # "requests", "tokens" or "concurrent"
    limit: int
    period_ms: int = 0
    scope: str = "identity"  # or "tenant": whose limit it is, for the client's error message


@dataclass(frozen=True)
class Plan:
    """What every admission of one identity checks: built once per identity, with what each storage needs
    derived once too (admission is on every request's path)."""

    tier_key: str
    budgets: tuple[Check, ...]
    lease_sets: tuple[Check, ...]

    @functools.cached_property
    def checks(self) -> tuple[Check, ...]:
        """Budgets, then lease sets: the order of a verdict's per-check results."""
        return self.budgets + self.lease_sets

    @functools.cached_property
    def keys(self) -> tuple[str, ...]:
        """The Redis script's keys: the tier override, then one per check."""
        return (self.tier_key, *(c.key for c in self.checks))

    @functools.cached_property
    def table(self) -> str:
        """The checks as the Redis script reads them."""
        return "".join(f"{c.limit} {c.period_ms} {c.unit[0]};" for c in self.checks)

    @functools.cached_property
    def token_budgets(self) -> tuple[Check, ...]:
        return tuple(c for c in self.budgets if c.unit == "tokens")


@dataclass(frozen=True, slots=True)
class TierTerms:
    scale: float  # 0 blocks
    enforce: bool  # False: evaluated and debited up to the limit, never rejected
    output_cap: int  # 0: no cap on the output tokens a request may ask for


@dataclass(frozen=True, slots=True)
class Ask:
    plan: Plan
    default_tier: str
    tiers: TierTable
    lease: str
    lease_ttl_ms: int
    prompt_tokens: int
    requested_output: int | None
    default_output: int
    choices: int = 1  # answers written, each up to the output limit: the reservation is prompt + choices x output


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    tier: str
    reserved: int  # tokens debited from every token budget
    output_cap: int  # the output tokens the reservation assumed
    retry_ms: int
    failed: int  # 1-based index into Ask.checks of the limit that refused, 0 if none
    remaining: tuple[int, ...]  # per check, units left after this admission
    reset_ms: tuple[int, ...]  # per check, until the budget is full again (0 for lease sets)

    @classmethod
    def from_reply(cls, reply: list) -> Verdict:
        status, tier, reserved, cap, retry, failed, *pairs = reply
        tier = tier.decode() if isinstance(tier, bytes) else tier
        return cls(
            Status(int(status)),
            tier,
            int(reserved),
            int(cap),
            int(retry),
            int(failed),
            tuple(int(v) for v in pairs[0::2]),
            tuple(int(v) for v in pairs[1::2]),
        )


def tier_of(ask: Ask, override: str | None) -> tuple[str, TierTerms]:
    """The tier in force: the override where it names a known tier, else the registry's."""
    if override in ask.tiers:
        return override, ask.tiers[override]
    return ask.default_tier, ask.tiers[ask.default_tier]


class TierTable(dict):
    """Tier name -> terms, fixed once built from the config; its text for the Redis script is made once."""

    @functools.cached_property
    def text(self) -> str:
        return "".join(f"{name} {t.scale!r} {int(t.enforce)} {t.output_cap};" for name, t in self.items())


def span_of(check: Check, interval: float) -> float:
    """How far ahead a budget may be spent, in ms: its period, or for requests at least one interval, so that
    a budget scaled below one request per period still admits one request per interval."""
    return max(check.period_ms, interval) if check.unit == "requests" else check.period_ms


def units_left(room_ms: float, interval: float) -> int:
    """Whole units that fit in `room_ms`, forgiving SLACK_MS (2000 - 666.67 ms must be 2 units of 666.67 ms)."""
    return max(math.floor((room_ms + SLACK_MS) / interval), 0)


def token_intervals(ask: Ask, verdict: Verdict, divisor: int = 1) -> list[tuple[str, float, int]]:
    """(key, ms per token, reach) of each token budget, at the scale the admission ran under. Reach: how far
    ahead a debt may push the budget, in ms, -1 for no bound. A tier that enforces its limits repays all it
    used beyond its reservation; one that does not (unlimited, which reserves nothing) is debited at most one
    period ahead, as at its admission: more would lock a shared tenant budget's other identities out for
    longer than the budget's own period, with one long answer."""
    terms = ask.tiers[verdict.tier]
    scale = terms.scale / divisor
    return [(c.key, c.period_ms / (c.limit * scale), -1 if terms.enforce else c.period_ms)
            for c in ask.plan.token_budgets]  # fmt: skip


def _ms_now() -> float:
    return float(math.floor(time.time() * 1000))


class MemoryBudget:
    """The engine for one process: the same decisions as the Redis script, in a dict."""

    def __init__(self, divisor: int = 1, clock=_ms_now) -> None:
        self.divisor = divisor  # this process's share: 1/divisor of every limit
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self.tiers: dict[str, str] = {}  # tier overrides by tier key
        self._prune_at = 10_000

    async def admit(self, ask: Ask) -> Verdict:
        return self.decide(ask)

    async def settle(self, ask: Ask, verdict: Verdict, correction: int) -> None:
        self.correct(ask, verdict, correction)

    async def set_tier(self, tier_key: str, tier: str | None) -> None:
        if tier is None:
            self.tiers.pop(tier_key, None)
        else:
            self.tiers[tier_key] = tier

    async def get_tier(self, tier_key: str) -> str | None:
        return self.tiers.get(tier_key)

    def decide(self, ask: Ask, now: float | None = None) -> Verdict:
        now = self._clock() if now is None else now
        if len(self._tats) > self._prune_at:
            self._prune(now)
        tier, terms = tier_of(ask, self.tiers.get(ask.plan.tier_key))
        if self.divisor > 1:
            terms = TierTerms(terms.scale / self.divisor, terms.enforce, terms.output_cap)
        if terms.scale == 0:
            return Verdict(Status.BLOCKED, tier, 0, 0, 0, 0, (), ())
        output = ask.default_output if ask.requested_output is None else ask.requested_output
        if terms.output_cap > 0 and output > terms.output_cap:
            output = terms.output_cap
        # A tier that does not enforce (unlimited) reserves nothing: it never had to fit a reservation, so
        # refunding one would give back tokens that were never taken from a shared (tenant) budget; its
        # usage is debited once it is known.
        tokens = ask.prompt_tokens + ask.choices * output if terms.enforce else 0
        status, retry, failed = Status.ADMITTED, 0.0, 0
        planned = []
        for i, check in enumerate(ask.plan.budgets, 1):
            cost = tokens if check.unit == "tokens" else 1
            interval = check.period_ms / (check.limit * terms.scale)
            span = span_of(check, interval)
            tat = max(self._tats.get(check.key, 0.0), now)
            new_tat = tat + cost * interval
            wait = new_tat - span - now
            if cost * interval > span:
                if terms.enforce:
                    status, failed = Status.TOO_LARGE, i
                new_tat = tat
            elif wait > SLACK_MS:
                if terms.enforce and status is not Status.TOO_LARGE and wait > retry:
                    status, retry, failed = Status.LIMITED, wait, i
                new_tat = min(new_tat, now + span)
            planned.append((span, new_tat, interval, tat, check.key))
        g = len(planned)
        lease_out = []
        for j, check in enumerate(ask.plan.lease_sets, 1):
            limit = max(math.floor(check.limit * terms.scale), 1)
            leases = self._live_leases(check.key, now)
            if len(leases) >= limit and terms.enforce and status is Status.ADMITTED:
                status, retry, failed = Status.LIMITED, 1000, g + j
            lease_out.append((max(limit - len(leases) - 1, 0), 0))
        remaining, reset = [], []
        for span, new_tat, interval, tat, key in planned:
            if status is not Status.ADMITTED:
                new_tat = tat
            remaining.append(units_left(now + span - new_tat, interval))
            reset.append(math.ceil(new_tat - now))
            if status is Status.ADMITTED and new_tat > now:
                self._tats[key] = round(new_tat, 3)
        if status is Status.ADMITTED:
            for check in ask.plan.lease_sets:
                self._leases[check.key][ask.lease] = now + ask.lease_ttl_ms
        for r, t in lease_out:
            remaining.append(r)
            reset.append(t)
        return Verdict(status, tier, tokens, output, math.ceil(retry), failed, tuple(remaining), tuple(reset))

    def correct(self, ask: Ask, verdict: Verdict, correction: int, now: float | None = None) -> None:
        """The exchange has ended: correct its token budgets by `correction` tokens (positive: debt,
        negative: refund) and drop its leases."""
        now = self._clock() if now is None else now
        for key, interval, reach in token_intervals(ask, verdict, self.divisor):
            tat = max(max(self._tats.get(key, 0.0), now) + correction * interval, now)
            if reach >= 0:
                tat = min(tat, now + reach)
            if tat > now:
                self._tats[key] = round(tat, 3)
            else:
                self._tats.pop(key, None)
        for check in ask.plan.lease_sets:
            self._leases.get(check.key, {}).pop(ask.lease, None)

    def hold(self, leases: list[tuple[str, str]], ttl_ms: int) -> None:
        """Take leases (key, lease id) that another engine granted: this engine counts them from now on."""
        expiry = self._clock() + ttl_ms
        for key, lease in leases:
            self._leases.setdefault(key, {})[lease] = expiry

    def drop(self, leases: list[tuple[str, str]]) -> None:
        for key, lease in leases:
            self._leases.get(key, {}).pop(lease, None)

    async def extend(self, leases: list[tuple[str, str]], ttl_ms: int) -> None:
        """Heartbeat: push the expiry of live leases (key, lease id) forward."""
        expiry = self._clock() + ttl_ms
        for key, lease in leases:
            held = self._leases.get(key)
            if held is not None and lease in held:
                held[lease] = expiry

    def _live_leases(self, key: str, now: float) -> dict[str, float]:
        held = self._leases.setdefault(key, {})
        for lease in [lease for lease, expiry in held.items() if expiry <= now]:
            del held[lease]
        return held

    def _prune(self, now: float) -> None:
        """Forget budgets that are full again (what Redis does with each key's expiry)."""
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._leases = {key: held for key, held in self._leases.items() if any(e > now for e in held.values())}
        self._prune_at = max(10_000, 2 * len(self._tats))
