"""The risk engine: watches finished exchanges and moves identities between tiers.

It is off the request path: `observe` queues a small record of the exchange (constant time) and a
background task extracts its features and scores them in batches, so that a request never waits for
scoring. A tier change is a `Decision` handed to `on_decision` (the pipeline applies it where admission
reads tiers, and records it with the signals behind it in the evidence log). In shadow mode decisions are
made and recorded, never applied. Identities whose tier an operator pinned, or whose tier is off the
engine's ladder (blocked, unlimited, custom), are scored but never moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from ..exchange import Exchange, Identity
from .features import Observation, Seen, caller, features, seen
from .redis_signals import RedisSignals
from .score import LADDER, next_tier, score, strengths
from .signals import TAU, MemorySignals, Signals

log = logging.getLogger("canarygate.risk")
IN_FLIGHT_SECONDS = 5.0  # a decision reaches every worker's admissions well within this
# An operator's tier (`tier set`, unpinned) is not lowered for one decay window: the signals from before it say
# nothing of why they moved the identity, and a score of zero on little traffic undid it at the next request.
# The engine may raise it at once.
OPERATOR_HOLD = TAU
STORE_TIMEOUT = 2.0  # seconds for one batch's signals
MAX_QUEUE = 100_000  # observations waiting to be scored
# and the characters of their prompts: each keeps up to 16 KB of its prompt and of its latest message, so the
# count alone let a backlog (the storage slow or down) hold about 12 GiB of text in the worst case
MAX_QUEUED_CHARS = 32 * 2**20
# observations per call to the storage: a Redis script runs alone, at 40-60 µs an observation, so a call of
# 128 holds every other client of the same Redis (admission's included, 50 ms timeout) for about 6 ms; the
# whole backlog in one call (20,000 observations after a stall) held them for 1.2 s
MAX_BATCH = 128
DECIDED_KEPT = 10_000  # decisions remembered before the old ones are looked for (_note_decided)
SLICE_SECONDS = 0.002  # the longest the scoring holds the event loop while it reads a batch's prompts


@dataclass(frozen=True)
class Decision:
    identity: Identity
    previous: str  # the tier being left
    tier: str  # the new tier
    score: float
    strengths: dict[str, float]
    signals: Signals
    time: float
    applied: bool  # False in shadow mode

    def as_json(self) -> dict:
        return {
            "identity": self.identity.name,
            "tenant": self.identity.tenant,
            "from": self.previous,
            "to": self.tier,
            "score": round(self.score, 4),
            "strengths": self.strengths,
            "signals": self.signals.as_json(),  # an undefined spread (too few gaps) is null, not Infinity
            "applied": self.applied,
            "observed_at": self.time,  # the engine's clock when it observed the request that moved the score
        }


class RiskEngine:
    def __init__(
        self,
        store: MemorySignals | RedisSignals,
        mode: str = "enforce",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in ("enforce", "shadow"):
            raise ValueError(f"risk mode must be 'enforce' or 'shadow', not {mode!r}")
        self._store = store
        self._shadow = mode == "shadow"
        self._clock = clock
        self._queue: list[Seen] = []
        self._queued_chars = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._decided: dict[str, tuple[str, float]] = {}  # features.caller -> (tier, clock) of the last decision
        self._decided_limit = DECIDED_KEPT
        self.on_decision: Callable[[Decision], Awaitable[None]] | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()  # of this loop: a host may start the app again in another (its test clients)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        try:
            if self._task is not None:
                with contextlib.suppress(Exception):  # what is left is scored if the storage answers in time
                    await self.flush()
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self._store.close()

    def observe(self, exchange: Exchange) -> None:
        """Queue what the exchange says (constant time: the text is read in the background)."""
        found = seen(exchange, self._clock())
        if found is not None:
            size = _chars(found)
            if len(self._queue) >= MAX_QUEUE or self._queued_chars + size > MAX_QUEUED_CHARS:
                self._drop_oldest()  # scoring has fallen behind (the storage is slow or down)
            self._queue.append(found)
            self._queued_chars += size
            self._wake.set()

    def _drop_oldest(self) -> None:
        dropped = self._queue[: max(len(self._queue) // 10, 1)]
        del self._queue[: len(dropped)]
        self._queued_chars -= sum(map(_chars, dropped))
        log.warning("risk scoring is behind; dropped the %d oldest observations", len(dropped))

    async def flush(self) -> None:
        """Score everything observed so far (tests and shutdown)."""
        while self._queue:
            await self._score(self._take())

    def _take(self) -> list[Seen]:
        batch = self._queue[:MAX_BATCH]
        del self._queue[:MAX_BATCH]
        self._queued_chars -= sum(map(_chars, batch))
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._queue) <= MAX_BATCH:
                self._wake.clear()
            try:
                await self._score(self._take())
            except Exception:  # a scoring fault must not stop the engine (nor touch a request)
                log.exception("risk scoring failed for a batch")

    async def _score(self, batch: list[Seen]) -> None:
        if not batch:
            return
        observations = await _features(batch)
        async with asyncio.timeout(STORE_TIMEOUT):  # a stuck storage must not stall scoring for good
            updated = await self._store.update_many(observations)
        for found, observation, signals in zip(batch, observations, updated, strict=True):
            decision = self.decide(observation, found.identity, signals, found.admitted)
            if decision is not None and self.on_decision is not None:
                try:
                    await self.on_decision(decision)
                except Exception:  # one decision that cannot be applied must not lose the rest of the batch
                    log.exception("could not apply the risk decision for %s", decision.identity.name)

    def decide(
        self, found: Observation, identity: Identity, signals: Signals, admitted: float | None = None
    ) -> Decision | None:
        """A Decision when the identity's tier should change, given its signals after this observation.
        `admitted`: when admission read the tier the exchange carries (the engine's clock; its end if not said).
        An operator's tier (pinned, or off the ladder: blocked, unlimited) is never moved, in shadow mode too;
        one set on the ladder is not lowered within OPERATOR_HOLD of being set."""
        if identity.pinned or identity.tier not in LADDER:
            return None
        current = self._current(found.identity, identity, found.time if admitted is None else admitted)
        parts = strengths(signals)
        value = score(parts)
        tier = self._move(found.identity, identity, current, value, found.time)
        return None if tier is None else Decision(identity, current, tier, value, parts, signals, found.time,
                                                  not self._shadow)  # fmt: skip

    def moved_from(self, decision: Decision, in_force: str) -> Decision | None:
        """`decision` made again from `in_force`, the tier the identity is in now, where that is not the tier
        it was made from: another worker moved the identity since the request behind it was admitted (each
        engine knows only its own decisions), and hysteresis runs from where the identity is. None: it stays."""
        if in_force not in LADDER:
            return None
        tier = self._move(caller(decision.identity), decision.identity, in_force, decision.score, decision.time)
        return None if tier is None else replace(decision, previous=in_force, tier=tier)

    def _move(self, who: str, identity: Identity, current: str, value: float, at: float) -> str | None:
        """The tier a score moves the identity to from `current` (remembered), or None where it stays: the
        same tier, or lower than an operator's tier set within OPERATOR_HOLD."""
        tier = next_tier(current, value)
        if tier == current or (LADDER.index(tier) < LADDER.index(current) and _operator_holds(identity, at)):
            return None
        self._note_decided(who, tier, at)
        return tier

    def _note_decided(self, who: str, tier: str, at: float) -> None:
        """Keep the decision for `_current`. Where decisions are applied, it reads those of the last
        IN_FLIGHT_SECONDS only: past DECIDED_KEPT entries the older ones go (the map kept one entry per identity
        ever moved). In shadow mode every entry is an identity's tier, which nothing else holds: all stay."""
        self._decided[who] = (tier, at)
        if not self._shadow and len(self._decided) > self._decided_limit:
            self._decided = {name: kept for name, kept in self._decided.items() if kept[1] >= at - IN_FLIGHT_SECONDS}
            self._decided_limit = max(DECIDED_KEPT, 2 * len(self._decided))

    def _current(self, caller: str, identity: Identity, admitted: float) -> str:
        """The tier to move from: the one the exchange carried, which is what admission applied, unless a
        decision came after admission read it (a long stream), or so shortly before that it may not have
        reached admission yet (in flight), or decisions are not applied (shadow)."""
        decided = self._decided.get(caller)
        if decided is not None and (self._shadow or admitted < decided[1] + IN_FLIGHT_SECONDS):
            return decided[0]
        return identity.tier


async def _features(batch: list[Seen]) -> list[Observation]:
    """The batch's features, giving the event loop a turn every SLICE_SECONDS: a prompt read to its 16 KB ends
    takes about a millisecond, and a batch of them read at once held every request of the worker for 100 ms.
    Not a turn after each: under load each turn waits for every ready request, and scoring fell behind."""
    observations, since = [], time.perf_counter()
    for found in batch:
        observations.append(features(found))
        if time.perf_counter() - since > SLICE_SECONDS:
            await asyncio.sleep(0)
            since = time.perf_counter()
    return observations


def _chars(found: Seen) -> int:
    """The characters an observation keeps (at most 4 bytes each: MAX_QUEUED_CHARS holds at most 128 MiB)."""
    return len(found.prompt) + len(found.question)


def _operator_holds(identity: Identity, now: float) -> bool:
    """Whether an operator set the identity's tier less than OPERATOR_HOLD ago: after its key was issued, or at
    registration (`identities add bot --tier suspect` was undone at bot's first request)."""
    chosen = identity.tier_set > identity.registered or identity.tier_chosen
    return chosen and now < identity.tier_set + OPERATOR_HOLD
