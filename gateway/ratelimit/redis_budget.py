"""The admission engine on Redis: standalone, Cluster or Sentinel, chosen by the storage URL.

Every admission is one script call (check, debit, lease) and every settlement one more, so replicas that
share the Redis share one limit. All keys of one admission carry the same hash tag (the tenant, or the
identity when it has none), so on a Cluster they live in one slot and the script never meets CROSSSLOT.
The script reads the time from Redis, so replicas with skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from .budget import Ask, Verdict, token_intervals

_ADMISSION = resources.files(__package__).joinpath("admission.lua").read_text()
_SETTLE = resources.files(__package__).joinpath("settle.lua").read_text()


class RedisBudget:
    """Admissions, settlements, heartbeats and tier overrides, on a Redis shared by every replica."""

    divisor = 1  # one budget for all replicas

    def __init__(self, client) -> None:
        self.client = client
        self._shas: dict[str, str] = {}
        # redis-py's Cluster client breaks when many first commands race to discover the cluster: discover once
        self._discovered = not isinstance(client, RedisCluster)
        self._discovering = asyncio.Lock()

    async def drop_idle_connections(self) -> None:
        """Close the connections kept idle, so that the next calls connect anew (a Sentinel-managed pool asks
        for the master then). A Cluster client keeps its own per node, and finds moved slots itself."""
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            await pool.disconnect(inuse_connections=False)

    async def admit(self, ask: Ask, now_ms: float = -1) -> Verdict:
        """Decide one admission at the Redis server's time (tests pass `now_ms` to fix the clock)."""
        requested = -1 if ask.requested_output is None else ask.requested_output
        args = (
            now_ms,
            ask.default_tier,
            ask.tiers.text,
            ask.plan.table,
            ask.lease,
            ask.lease_ttl_ms,
            ask.prompt_tokens,
            requested,
            ask.default_output,
            ask.choices,
        )
        return Verdict.from_reply(await self._run(_ADMISSION, ask.plan.keys, args))

    async def settle(self, ask: Ask, verdict: Verdict, correction: int, now_ms: float = -1) -> None:
        budgets = token_intervals(ask, verdict)
        intervals = " ".join(repr(interval) for _, interval, _ in budgets)
        reaches = " ".join(str(reach) for _, _, reach in budgets)
        keys = [key for key, _, _ in budgets] + [c.key for c in ask.plan.lease_sets]
        await self._run(_SETTLE, keys, (now_ms, ask.lease, correction, intervals, reaches))

    async def extend(self, leases: list[tuple[str, str]], ttl_ms: int) -> None:
        """Push the expiry of running exchanges' leases forward, and put back any that Redis lost (restarted
        empty, or a replica promoted before it had them): renewing only those still there, it let the
        concurrency limit forget what ran. The caller drops again the leases of exchanges released meanwhile."""
        if not leases:
            return
        time_s, micros = await self.client.time()
        expiry = time_s * 1000 + micros // 1000 + ttl_ms
        async with self.client.pipeline(transaction=False) as pipe:
            for key, lease in leases:
                pipe.zadd(key, {lease: expiry})
            for key in {key for key, _ in leases}:  # the set too: each admission renews it, but none may come
                pipe.pexpire(key, ttl_ms)
            await pipe.execute()

    async def set_tier(self, tier_key: str, tier: str | None) -> None:
        if tier is None:
            await self.client.delete(tier_key)
        else:
            await self.client.set(tier_key, tier)

    async def drop_leases(self, leases: list[tuple[str, str]]) -> None:
        """Remove leases (key, lease id), whether or not they are there."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key, lease in leases:
                pipe.zrem(key, lease)
            await pipe.execute()

    async def get_tier(self, tier_key: str) -> str | None:
        value = await self.client.get(tier_key)
        return value.decode() if value is not None else None

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()

    async def _discover(self) -> None:
        async with self._discovering:
            if not self._discovered:
                await self.client.initialize()
                self._discovered = True

    async def _run(self, script: str, keys, args):
        if not self._discovered:
            await self._discover()
        sha = self._shas.get(script)
        if sha is not None:
            try:
                return await self.client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # a restarted or failed-over Redis has forgotten it
        reply = await self.client.execute_command("EVAL", script, len(keys), *keys, *args)
        self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        return reply
