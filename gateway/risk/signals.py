"""Signals: the running state behind each identity's score, updated in constant time per observation.

Per identity, counts decay exponentially with a time constant TAU (an account idle for a week is scored on
what it does next, not on last month), and four running statistics are kept with the same decayed weights:
the share of requests that ask for reasoning, that probe for the system prompt, whose answers avoided
prose; the spread of prompt lengths and of the gaps between requests (both on a log scale, so that they
measure regularity whatever the scale: a person's gaps spread over orders of magnitude, a script's do not);
and decayed counts per skeleton, whose largest share is the identity's template concentration; and
decayed counts per hour of the day (UTC), whose quietest stretch of QUIET_HOURS says whether the identity
ever rests: people sleep, in whatever time zone, and a script need not. And the opening and closing words of
its last RECENT prompts, whose variety (the share of distinct words, at the end that has fewer) says whether
it keeps rewording one template: a person's prompts begin and end with their topic, new words each time.

Across identities, per day: which accounts used each skeleton (an opening, a closing, and the two together)
and with how many distinct fills (for an opening its closings, and the other way round; for both ends the
whole messages), which accounts came from each network, and which accounts sent each message word for word. A
campaign spread over many accounts shows up there: many accounts sweeping one template with many slot
values, wherever the slot is (at an end, or between a fixed opening and a fixed closing). A popular prompt
does not: many accounts, one prompt; nor do its askers when a campaign wraps it in ever new words, which
makes its tail look swept (POPULAR_BY). An account is counted as its tenant's there (Observation.owner): the
employees of one company using its internal tool's template are one organisation's use, not a campaign
spread over accounts.

`MemorySignals` keeps all of it in this process (the embedded default, and what tests compare with).
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .features import END_BYTES, Observation

TAU = 2 * 86400.0  # seconds: decayed counts forget with this time constant
DAY = 86400
MAX_SKELETONS = 64  # per identity: the smallest decayed counts are forgotten beyond twice this
IDENTITY_TTL = 30 * 86400  # an identity idle this long starts afresh (Redis expires its state then)
# Memory bounds for the cross-account sets of one day: beyond them a day's new skeletons, networks and prompts are
# not tracked, and a set stops growing once far past every threshold (Redis caps the sets alike, and expires them
# instead). The sets of a prompt's accounts stop at POPULAR_BY, all that is ever asked of them.
MAX_SKETCHES = 500_000
MAX_MEMBERS = 10_000
ROOM_SWEEP = 64  # keys of a full table looked at for each new key (_make_room)
REBASE_AT = 1e20  # the growing scale of skeleton counts is brought back to 1 before it nears overflow
# A skeleton is being swept by many when at least this many accounts used it within two days, with at least
# one distinct fill for every two accounts. A popular prompt has one fill however many ask it; a sweep brings
# new ones with every account. The other end, not the whole message, is an end's fill: accounts sending one
# question wrapped in a few templates share the question's tail with a few other ends (the templates' first
# words), where their whole messages differ in whatever the templates' later words say (apps numbering their
# newsletters: a heavy honest user reached `suspect` when whole messages were the fill). A template with its
# slot between a fixed opening and a fixed closing has one other end at both: its two ends together are a
# skeleton whose fill is the whole message (100 accounts sweeping one stayed in `watch`; review). People who
# happen to share a six-word opening each use it for a small share of their requests (`swept_share`).
SWEPT_BY = 10
# A message that this many accounts send word for word is a popular one: its requests are
# no sweep's fills, even when a campaign sweeps one of its ends (a campaign that wraps a popular question in
# ever new words makes its tail look swept; the people asking the question itself are not part of that).
POPULAR_BY = 3
QUIET_HOURS = 8  # the stretch of the day a person's requests mostly leave empty
RECENT = 16  # prompts whose opening and closing words are kept per identity


@dataclass(slots=True)
class Signals:
    requests: float  # decayed count: about the requests of the last TAU
    per_day: float  # the request rate this implies
    concentration: float  # share of requests on the identity's commonest skeleton
    swept_share: float  # share of requests on a skeleton many accounts are sweeping (see SWEPT_BY)
    swept_requests: float  # their decayed count
    template_accounts: int  # accounts on this request's most shared skeleton, today and yesterday
    template_variants: int  # distinct other ends sent with it (the slot's values), today and yesterday
    reasoning: float  # share of requests asking for reasoning
    probes: float  # decayed count of system-prompt probes
    unmarked: float  # share of answers that avoided prose (code, JSON, quotations only)
    length_spread: float  # standard deviation of log prompt length
    timing_spread: float  # standard deviation of log gap between requests
    network_accounts: int  # accounts seen from the identity's network today and yesterday
    # what quiet_share and variety are read from, when asked: the score asks only of an identity with enough
    # requests (a third of the benchmark's observations have too few), and reading them takes about 10 us
    hours: Sequence[float]  # decayed counts per hour of the day, on any one scale
    openings: bytes  # the last RECENT prompts' opening word hashes (features._word_hashes), oldest first
    closings: bytes

    @property
    def quiet_share(self) -> float:
        """Share of requests in the identity's quietest QUIET_HOURS of the day."""
        return quiet_share(self.hours)

    @property
    def variety(self) -> float:
        """Distinct words over words in the last RECENT openings, or closings (the lower); 1 before."""
        return variety(self.openings, self.closings)

    def as_json(self) -> dict:
        """Plain JSON (an infinite spread, for too few gaps, is null: evidence entries must parse anywhere)."""
        values = {name: getattr(self, name) for name in REPORTED}
        return {name: None if math.isinf(v) else round(v, 4) for name, v in values.items()}


# the signals as evidence and `risk show` report them: every field but what two are read from, and those two
REPORTED = (*(name for name in Signals.__slots__ if name not in ("hours", "openings", "closings")), "quiet_share",
            "variety")  # fmt: skip


@dataclass(slots=True)
class _Running:
    """A decayed weighted mean and variance (West's update with a decaying weight for the past)."""

    mean: float = 0.0
    var: float = 0.0

    def add(self, value: float, weight: float) -> None:
        """`weight`: the past's decayed weight before this observation."""
        total = weight + 1.0
        delta = value - self.mean
        self.mean += delta / total
        self.var = weight * (self.var + delta * delta / total) / total

    @property
    def spread(self) -> float:
        return math.sqrt(max(self.var, 0.0))


@dataclass(slots=True)
class _Identity:
    last: float = 0.0
    n: float = 0.0
    reasoning: float = 0.0
    probes: float = 0.0
    unmarked: float = 0.0
    swept: float = 0.0
    lengths: _Running = field(default_factory=_Running)
    gaps: _Running = field(default_factory=_Running)
    gaps_n: float = 0.0
    skeletons: dict[str, float] = field(default_factory=dict)  # on a growing scale: see _count_skeletons
    base: float = 0.0  # the time at which the scale is 1
    top: float = 0.0  # the largest count, on that scale
    hours: list[float] = field(default_factory=lambda: [0.0] * 24)  # counts per hour of the day, on that scale
    openings: bytes = b""  # the last RECENT prompts' opening word hashes, oldest first, as signals.lua keeps them
    closings: bytes = b""


class MemorySignals:
    def __init__(self) -> None:
        self._identities: dict[str, _Identity] = {}
        # day -> key -> the set of what was seen with it that day
        self._accounts: dict[int, dict[str, set]] = defaultdict(dict)  # skeleton -> owners (Observation.owner)
        self._fills: dict[int, dict[str, set]] = defaultdict(dict)  # skeleton -> its fills (other ends, messages)
        self._networks: dict[int, dict[str, set]] = defaultdict(dict)  # network -> accounts
        self._prompts: dict[int, dict[str, set]] = defaultdict(dict)  # message -> owners
        self._pruned = -1  # the day the tables were last pruned for

    async def update_many(self, observations: list[Observation]) -> list[Signals]:
        return [self.update(o) for o in observations]

    async def close(self) -> None:
        """Nothing to close."""

    def update(self, obs: Observation) -> Signals:
        state = self._identities.get(obs.identity)
        if state is None or obs.time - state.last > IDENTITY_TTL:
            state = self._identities[obs.identity] = _Identity(last=obs.time)
        factor = math.exp(-max(obs.time - state.last, 0.0) / TAU) if state.n else 1.0
        past = state.n * factor
        if state.n:
            state.gaps.add(math.log(max(obs.time - state.last, 0.001)), state.gaps_n * factor)
            state.gaps_n = state.gaps_n * factor + 1.0
        state.lengths.add(math.log1p(obs.words), past)
        state.n = past + 1.0
        state.reasoning = state.reasoning * factor + obs.reasoning
        state.probes = state.probes * factor + obs.probe
        state.unmarked = state.unmarked * factor + obs.unmarked
        state.last = obs.time
        top = self._count_skeletons(state, obs)
        state.openings = (state.openings + obs.opening)[-RECENT * END_BYTES :]  # the oldest goes beyond RECENT
        state.closings = (state.closings + obs.closing)[-RECENT * END_BYTES :]
        day = int(obs.time // DAY)
        self._prune(day)
        # each skeleton (its opening, its closing, and both: a slot between them) with its fill: the other end,
        # or for both ends, the whole message. A message too short to have two ends is its one skeleton.
        ends = (("p" + obs.prefix, obs.suffix), ("s" + obs.suffix, obs.prefix))
        if obs.prefix != obs.suffix:
            ends += (("b" + obs.prefix + obs.suffix, obs.message),)
        shared = [
            (self._add(self._accounts, day, skeleton, obs.owner), self._add(self._fills, day, skeleton, fill))
            for skeleton, fill in ends
        ]
        network = self._add(self._networks, day, obs.network, obs.identity)
        asked_by = self._add(self._prompts, day, obs.message, obs.owner, POPULAR_BY)
        swept = asked_by < POPULAR_BY and any(a >= SWEPT_BY and 2 * others >= a for a, others in shared)
        state.swept = state.swept * factor + swept
        accounts, fills = max(shared)
        return Signals(
            requests=state.n,
            per_day=state.n * DAY / TAU,
            concentration=top / state.n,
            swept_share=state.swept / state.n,
            swept_requests=state.swept,
            template_accounts=accounts,
            template_variants=fills,
            reasoning=state.reasoning / state.n,
            probes=state.probes,
            unmarked=state.unmarked / state.n,
            length_spread=state.lengths.spread,
            timing_spread=state.gaps.spread if state.gaps_n >= 2 else math.inf,
            network_accounts=network,
            hours=tuple(state.hours),  # a copy: the state's go on changing
            openings=state.openings,
            closings=state.closings,
        )

    @staticmethod
    def _add(table: dict, day: int, key: str, member: str, cap: int = MAX_MEMBERS) -> int:
        """Add `member` to today's set of `key` (within the caps); the set's size over today and yesterday."""
        today = table[day]
        members = today.get(key)
        if members is None and len(today) >= MAX_SKETCHES:
            _make_room(today)
        if members is None and len(today) < MAX_SKETCHES:  # beyond the cap, only keys already seen count
            members = today[key] = set()
        if members is not None and len(members) < cap:
            members.add(member)
        return _window(table, day, key)

    @staticmethod
    def _count_skeletons(state: _Identity, obs: Observation) -> float:
        """Count this request's two skeletons and its hour of the day; returns the largest decayed skeleton count.

        Counts are kept on a growing scale (an increment at time t weighs exp((t - base) / TAU)), so that
        decaying them all is one division at read time, not a pass over every count; their order is the
        decayed order, so the largest stored is the largest. Past MAX_SKELETONS * 2 they are cut back to
        the MAX_SKELETONS largest, and the scale is rebased before it could overflow."""
        counts = state.skeletons
        if not counts:
            state.base = obs.time
        grow = math.exp((obs.time - state.base) / TAU)
        if grow > REBASE_AT:
            for key in counts:
                counts[key] /= grow
            state.hours = [count / grow for count in state.hours]
            state.top /= grow
            state.base, grow = obs.time, 1.0
        state.hours[int(obs.time // 3600) % 24] += grow  # hour counts share the scale: their shares are decayed
        for skeleton in ("p" + obs.prefix, "s" + obs.suffix):
            counts[skeleton] = counts.get(skeleton, 0.0) + grow
            state.top = max(state.top, counts[skeleton])
        if len(counts) > 2 * MAX_SKELETONS:
            # the smallest go; equal counts (a request's two skeletons share one) by name, as signals.lua does
            for key in sorted(counts, key=lambda k: (counts[k], k))[: len(counts) - MAX_SKELETONS]:
                del counts[key]
        return state.top / grow

    def _prune(self, day: int) -> None:
        """Forget the days before the day before yesterday (as Redis expires a day's sets three days after it
        began them: an observation dated yesterday that comes late still finds the day before it), and
        identities idle past IDENTITY_TTL (they would start afresh; as Redis expires them), once a day."""
        if day <= self._pruned:
            return
        self._pruned = day
        for table in (self._accounts, self._fills, self._networks, self._prompts):
            for old in [d for d in table if d < day - 2]:
                del table[old]
        for idle in [name for name, state in self._identities.items() if day * DAY - state.last > IDENTITY_TTL]:
            del self._identities[idle]


def _make_room(today: dict[str, set]) -> None:
    """Make room in a full day's table: of its ROOM_SWEEP oldest keys, those only one member has used go and
    the others move to the back, so that the next look sees other keys. A flood of one-off prompts (250,000
    a day from a handful of accounts) filled the table early, and every sweep later that day went unseen: a
    key many accounts share is what the table is for. The work per new key is bounded however the table was
    filled (a scan of the whole table held the event loop 25 ms a key). Redis keeps every key; the two agree
    again below the cap."""
    for key in list(itertools.islice(today, ROOM_SWEEP)):
        members = today.pop(key)
        if len(members) > 1:
            today[key] = members


def _window(table: dict, day: int, key: str) -> int:
    """The size of `key`'s set over today and yesterday: the larger of the two days' (a lower bound of the
    union, in constant time; a campaign that keeps going fills both days)."""
    return max(len(table.get(day, {}).get(key, ())), len(table.get(day - 1, {}).get(key, ())))


def quiet_share(hours: Sequence[float]) -> float:
    """The share of the counts in the quietest QUIET_HOURS consecutive hours (the day wraps around), as a sliding
    sum (Signals.quiet_share, from the hours either store gives: MemorySignals' own, or the script's state)."""
    total = sum(hours)
    if total <= 0:
        return 0.0
    window = sum(hours[:QUIET_HOURS])
    least = window
    for start in range(1, 24):
        window += hours[(start + QUIET_HOURS - 1) % 24] - hours[start - 1]
        if window < least:
            least = window
    return max(least, 0.0) / total  # a sliding sum can end a rounding error below zero


def variety(openings: bytes, closings: bytes) -> float:
    """The share of distinct words among the recent prompts' openings, or closings, whichever is lower (0 pads
    an end of fewer words); 1.0 until RECENT prompts are kept. Signals.variety reads it here from the ends either
    store gives (the script keeps them, but counting them there took a quarter of its time: a set in C here)."""
    if len(openings) < RECENT * END_BYTES:
        return 1.0
    return min(_distinct_share(openings), _distinct_share(closings))


def _distinct_share(ends: bytes) -> float:
    padding = ends.count(b"\0\0")  # no word's hash holds a zero byte (features._word_hashes)
    total = len(ends) // 2 - padding
    if not total:
        return 1.0
    return (len(set(array("H", ends).tolist())) - (padding > 0)) / total  # a list first: twice as fast
