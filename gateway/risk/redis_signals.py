"""The risk signals on Redis, shared by every replica: one script call per batch of observations.

The arithmetic is MemorySignals' (signals.py): signals.lua updates each identity's state and the same exact
cross-account sets, capped at the same size (Redis does not cap how many sets a day makes: each expires after
three days), and returns the state, from which the quiet share and the variety are read (Signals) as
MemorySignals' are. Every key carries one hash tag, so a Cluster keeps them in one slot. Identity state
expires after at least `IDENTITY_TTL` idle seconds (its expiry is renewed once a day, a day past it; replicas
still on an earlier script renew it to `IDENTITY_TTL` alone, a day less at worst), when it has decayed to
nothing. A change of the state's layout renames its key, so every identity's signals start afresh on upgrade
(tiers already applied stay where admission keeps them); until every replica runs the new script, old and new
ones each see part of an identity's traffic.
"""

from __future__ import annotations

import hashlib
import math
import struct
from importlib import resources

from redis.exceptions import NoScriptError

from .features import END_BYTES, END_WORDS, Observation
from .signals import (
    DAY,
    IDENTITY_TTL,
    MAX_MEMBERS,
    MAX_SKELETONS,
    POPULAR_BY,
    REBASE_AT,
    RECENT,
    SWEPT_BY,
    TAU,
    Signals,
)

_SCRIPT = resources.files(__package__).joinpath("signals.lua").read_text()
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
ROW = struct.Struct("<12d")  # one observation's signals that the script computes, as it packs them
STATE = struct.Struct("<39d")  # an identity's state as the script stores it (after ROW in its answer)
HOURS = slice(14, 38)  # the state's counts per hour of the day
KEPT = 38  # the state's number of recent prompts whose ends follow it
_LENGTH = struct.Struct("<I")  # of each string of the record, in bytes (the script's I4 before c0)
_TAIL = struct.Struct("<dIBBB")  # time, words, the three flags (the ends' word hashes follow, as bytes)


class RedisSignals:
    def __init__(self, client, prefix: str = "{cg-risk}") -> None:
        self._client = client
        self._prefix = prefix
        self._head = [
            repr(TAU),
            str(MAX_SKELETONS),
            str(SWEPT_BY),
            str(IDENTITY_TTL),
            repr(REBASE_AT),
            str(MAX_MEMBERS),
            str(POPULAR_BY),
            str(RECENT),
            str(END_WORDS),
        ]

    async def close(self) -> None:
        await self._client.aclose()

    def arguments(self, observations: list[Observation]) -> list:
        """The script's ARGV for a batch of observations (benchmarks/risk_script_ab.py sends it to two scripts)."""
        return [*self._head, b"".join(map(_record, observations))]

    async def update_many(self, observations: list[Observation]) -> list[Signals]:
        args = self.arguments(observations)
        try:  # the prefix is the one declared key: a Cluster client routes the call to its slot
            raw = await self._client.evalsha(_SHA, 1, self._prefix, *args)
        except NoScriptError:
            raw = await self._client.eval(_SCRIPT, 1, self._prefix, *args)
        return list(map(_signals, raw))


def _record(o: Observation) -> bytes:
    """One observation as signals.lua's RECORD reads it."""
    parts = []
    for text in (o.identity, o.prefix, o.suffix, o.network, o.owner, o.message):
        raw = text.encode()
        parts += (_LENGTH.pack(len(raw)), raw)
    parts += (_TAIL.pack(o.time, o.words, o.reasoning, o.probe, o.unmarked), o.opening, o.closing)
    return b"".join(parts)


def _signals(answer: bytes) -> Signals:
    """One observation's signals from the script's answer: its twelve, and from the state the hour counts and
    the recent ends that the quiet share and the variety are read from when asked."""
    v = ROW.unpack_from(answer)
    state = STATE.unpack_from(answer, ROW.size)
    ends = answer[ROW.size + STATE.size :]
    split = int(state[KEPT]) * END_BYTES  # the openings', before the closings
    return Signals(
        requests=v[0],
        per_day=v[0] * DAY / TAU,
        concentration=v[1],
        swept_share=v[2],
        swept_requests=v[3],
        template_accounts=int(v[4]),
        template_variants=int(v[5]),
        reasoning=v[6],
        probes=v[7],
        unmarked=v[8],
        length_spread=v[9],
        timing_spread=math.inf if v[10] < 0 else v[10],
        network_accounts=int(v[11]),
        hours=state[HOURS],
        openings=ends[:split],
        closings=ends[split:],
    )
