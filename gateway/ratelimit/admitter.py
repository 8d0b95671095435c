"""The admit stage: per-identity and per-tenant limits on requests, tokens and concurrency, scaled by tier.

One admission is one call to the budget engine (Redis shared by replicas, or this process's memory), which
reads the identity's tier, checks every limit and debits all or nothing. Tokens are reserved (prompt
estimate plus the output limit, which the gateway sets when the request has none) and corrected by real
usage when the exchange ends. Unauthenticated requests are limited per client address instead.

What the client learns is the truth about its limits (the exchange's `quotas`, rendered as headers by its
API); tarpits and tiers themselves are never announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

from .. import metrics
from ..config import LimitSettings, Rate
from ..exchange import ErrorKind, Exchange, GatewayError, Identity, Outcome, Quota
from .addresses import AddressLimiter
from .budget import Ask, Check, MemoryBudget, Plan, Status, TierTable, TierTerms, Verdict, span_of
from .guard import StorageDown, StorageGuard

log = logging.getLogger("canarygate.limits")


@dataclass(slots=True)
class _Held:
    ask: Ask
    verdict: Verdict
    engine: object  # the engine that admitted it settles it
    counted_locally: bool = False  # admitted on the shared storage, its leases also held by the local fallback

    @property
    def leases(self) -> list[tuple[str, str]]:
        return _leases(self.ask)


def _leases(ask: Ask) -> list[tuple[str, str]]:
    """(concurrency set, lease id) of each concurrency limit an admission takes a slot in."""
    return [(check.key, ask.lease) for check in ask.plan.lease_sets]


class LimitAdmitter:
    def __init__(
        self,
        settings: LimitSettings,
        shared,
        local: MemoryBudget | None,
        addresses: AddressLimiter,
        guard: StorageGuard | None = None,
        prefix: str = "cg",
    ) -> None:
        """`shared`: a RedisBudget, or None when limits live in memory; `local`: the memory engine (the
        embedded one, or the fail-open fallback; None is fail-closed)."""
        self._settings = settings
        self._shared = shared
        self._local = local
        self._guard = guard
        self._addresses = addresses
        self._prefix = prefix
        self._terms = TierTable((n, TierTerms(t.scale, t.enforce, t.max_tokens)) for n, t in settings.tiers.items())
        self._plans: dict[Identity, Plan] = {}
        self._tier_set: dict[str, float] = {}  # identity -> when its registry tier was last set, as last seen
        self._decisions: dict[tuple[Status, str], object] = {}  # metric children, looked up once
        self._held: dict[str, _Held] = {}
        self._unknown: set[tuple[str, str]] = set()  # (identity, tier) whose tier is not configured, logged once
        self._ttl_ms = int(settings.lease_seconds * 1000)
        self._heartbeat: asyncio.Task | None = None
        self._dropping: set[asyncio.Task] = set()  # _drop_leases_later's tasks

    async def start(self) -> None:
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        for task in [self._heartbeat, *self._dropping]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._shared is not None:
            await self._shared.close()
        await self._addresses.close()

    async def ready(self) -> str | None:
        """None when limits are decided normally; else the state (fail-open still serves: "degraded"). Asked,
        it tries the shared storage itself (a PING within the deadline, as the breaker allows): a load balancer
        that stopped sending traffic on a failure must see the storage come back without any, and a storage
        that is down before any request must not read as ready."""
        if self._shared is not None and self._guard is not None:
            with contextlib.suppress(StorageDown):
                await self._guard.call(self._shared.ping)
        if self._guard is None or self._guard.failure is None:
            return None
        if self._local is not None:
            return f"degraded: {self._guard.failure}; local limits apply"
        return f"{self._guard.failure}; refusing requests (fail-closed)"

    # --- the stage ---

    async def admit(self, exchange: Exchange) -> None:
        identity = exchange.identity
        if identity is None:
            await self._addresses.check(exchange.client_group)
            return
        plan = self._plans.get(identity) or self._plan(identity)  # built once per identity and tier
        if self._tier_set.get(identity.name, identity.tier_set) != identity.tier_set:
            await self._operator_set_tier(identity)
        self._tier_set[identity.name] = identity.tier_set
        ask = Ask(
            plan,
            identity.tier if identity.tier in self._terms else self._unknown_tier(identity),
            self._terms,
            exchange.id,
            self._ttl_ms,
            exchange.prompt_tokens,
            exchange.requested_output,
            self._settings.default_max_tokens,
            exchange.choices,
        )
        verdict, engine, where = await self._decide(ask)
        if where == "shared" and self._local is not None:
            self._remember_tier(plan.tier_key, identity.tier if identity.pinned else verdict.tier, identity.tier)
        if identity.pinned and verdict.tier != identity.tier:  # an operator pinned it since: their tier wins
            with contextlib.suppress(StorageDown):  # cleared at a later request then
                await self._on(engine, lambda: engine.set_tier(tier_key(identity, self._prefix), None))
        self._count(verdict.status, where)
        tier = self._settings.tiers[verdict.tier]
        if verdict.tier != identity.tier:
            exchange.identity = replace(identity, tier=verdict.tier)
        if tier.headers and verdict.status is not Status.BLOCKED:
            exchange.quotas = self._quotas(ask, verdict, engine.divisor)
        if verdict.status is not Status.ADMITTED:
            raise _refusal(ask, verdict, exchange.quotas)
        exchange.output_cap = verdict.output_cap  # every output field the request sets, not only the smallest
        self._held[exchange.id] = _Held(ask, verdict, engine)
        if tier.tarpit_ms:
            try:
                await asyncio.sleep(tier.tarpit_ms / 1000)
            except BaseException:
                await self.release(exchange)
                raise

    async def release(self, exchange: Exchange) -> None:
        held = self._held.pop(exchange.id, None)
        if held is None:
            return
        if held.counted_locally:
            self._local.drop(held.leases)
        if exchange.upstream_status is None or exchange.upstream_status >= 300:
            correction = -held.verdict.reserved  # nothing was generated: refund all of it
        elif exchange.tokens_used is None:
            correction = 0  # answered, usage unknown (a client that left mid-stream): the reservation stands
        elif exchange.outcome is Outcome.COMPLETED:
            correction = exchange.tokens_used - held.verdict.reserved
        else:  # cut short: the usage seen is a part (Anthropic's message_start counts one output token), never a refund
            correction = max(exchange.tokens_used - held.verdict.reserved, 0)
        with contextlib.suppress(StorageDown):  # its leases lapse on their own
            await self._on(held.engine, lambda: held.engine.settle(held.ask, held.verdict, correction))

    # --- tiers ---

    def _unknown_tier(self, identity: Identity) -> str:
        """The tier an identity registered in a tier the configuration no longer defines (renamed, removed, a
        typo) is served in: `blocked`, said once, in the log. Serving it as normal lifted its restrictions."""
        if (identity.name, identity.tier) not in self._unknown:
            self._unknown.add((identity.name, identity.tier))
            log.error(
                "identity %s is in tier %r, which [limits.tiers] does not define: refused until its tier is set "
                "(`canarygate tier set`) or the tier is configured again",
                identity.name,
                identity.tier,
            )
        return "blocked"

    async def _operator_set_tier(self, identity: Identity) -> None:
        """An operator set the identity's tier (or its name was registered anew) since this worker last saw it:
        their tier is in force, so a tier the risk engine moved it to before is dropped. In memory that move
        lives in this worker, where the CLI cannot reach; on Redis `tier set` writes the operator's tier where
        every replica reads it (the memory fallback's copy is dropped here too)."""
        if self._local is not None:
            await self._local.set_tier(tier_key(identity, self._prefix), None)

    async def set_tier(self, identity: Identity, tier: str | None) -> None:
        """Override an identity's tier (None: back to its registry tier) where every replica reads it; on the
        shared storage within the deadline and as the breaker allows, like every call there (StorageDown)."""
        engine, key = self._tiers_engine, tier_key(identity, self._prefix)
        await self._on(engine, lambda: engine.set_tier(key, tier))
        if engine is self._shared and self._local is not None:  # as stored: `identity.tier` may be one in force
            await self._local.set_tier(key, tier)

    def _remember_tier(self, key: str, in_force: str, registered: str) -> None:
        """The shared storage's tier override, kept by the fail-open fallback too: while the storage is down, an
        identity the risk engine moved stays where it was moved, instead of going back to its registry tier.
        As each admission on the storage reads it, so that another replica's moves are kept as well."""
        if in_force != registered:
            self._local.tiers[key] = in_force
        else:
            self._local.tiers.pop(key, None)

    async def tier_override(self, identity: Identity) -> str | None:
        engine = self._tiers_engine
        return await self._on(engine, lambda: engine.get_tier(tier_key(identity, self._prefix)))

    @property
    def _tiers_engine(self):
        """Where tier overrides live: the shared storage, which every replica reads, or this process's."""
        return self._shared if self._shared is not None else self._local

    # --- internals ---

    async def _decide(self, ask: Ask) -> tuple[Verdict, object, str]:
        if self._shared is None:
            return await self._local.admit(ask), self._local, "memory"
        try:
            return await self._guard.call(lambda: self._shared.admit(ask)), self._shared, "shared"
        except StorageDown:
            self._drop_leases_later(ask)
            if self._local is None:
                metrics.LIMIT_DECISIONS.labels("unavailable", "none").inc()
                raise GatewayError(
                    ErrorKind.UNAVAILABLE,
                    "the gateway cannot check rate limits right now; retry shortly",
                    {"retry-after": "1"},
                ) from None
            self._count_running_locally()
            return await self._local.admit(ask), self._local, "local"

    def _count_running_locally(self) -> None:
        """The exchanges this process runs on the shared storage's leases, counted by the local fallback too:
        deciding without them, it admitted a key's full concurrency again beside them (4 running of 2)."""
        for held in self._held.values():
            if held.engine is self._shared and not held.counted_locally:
                self._local.hold(held.leases, self._ttl_ms)
                held.counted_locally = True

    def _drop_leases_later(self, ask: Ask) -> None:
        """An admission the deadline gave up on may still run on Redis (its script was sent): its leases would
        hold concurrency slots there for lease_seconds, and the caller, refused or admitted on local limits,
        would find its own ghost in the way. They are removed once the storage answers again (removing a lease
        never added changes nothing). A token reservation it may have taken stays: at most one request's."""
        leases = _leases(ask)
        if leases:
            task = asyncio.ensure_future(self._drop_when_answering(leases))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    async def _drop_when_answering(self, leases: list[tuple[str, str]]) -> None:
        until = time.monotonic() + self._settings.lease_seconds  # by then they have lapsed on their own
        while time.monotonic() < until:
            try:
                await self._guard.call(lambda: self._shared.drop_leases(leases))
                return
            except StorageDown:
                await asyncio.sleep(1.0)

    def _count(self, status: Status, where: str) -> None:
        child = self._decisions.get((status, where))
        if child is None:
            child = self._decisions[status, where] = metrics.LIMIT_DECISIONS.labels(status.name.lower(), where)
        child.inc()

    async def _on(self, engine, make):
        """Run a call on an engine: through the storage guard when it is the shared one."""
        return await (self._guard.call(make) if engine is self._shared else make())

    def _plan(self, identity: Identity) -> Plan:
        base = _key_base(identity, self._prefix)
        scopes = [("identity", f"{base}:i:{identity.name}", self._settings.identity)]
        if identity.tenant and not self._settings.tenant.empty:
            scopes.append(("tenant", f"{base}:t", self._settings.tenant))
        budgets, lease_sets = [], []
        for scope, prefix, limits in scopes:
            budgets += [_budget(prefix, "requests", r, scope) for r in limits.requests]
            budgets += [_budget(prefix, "tokens", r, scope) for r in limits.tokens]
            if limits.concurrency:
                lease_sets.append(Check(f"{prefix}:c", "concurrent", limits.concurrency, 0, scope))
        plan = self._plans[identity] = Plan(tier_key(identity, self._prefix), tuple(budgets), tuple(lease_sets))
        return plan

    def _quotas(self, ask: Ask, verdict: Verdict, divisor: int) -> tuple[Quota, ...]:
        """The limits as enforced: scaled by tier and share; a requests budget scaled below one per period
        is told as one request per interval, which is what it admits."""
        scale = self._terms[verdict.tier].scale / divisor
        quotas = []
        for i, c in enumerate(ask.plan.checks):
            limit, window = math.floor(c.limit * scale), c.period_ms
            if c.unit != "tokens" and limit < 1:
                limit = 1
                window = span_of(c, c.period_ms / (c.limit * scale)) if c.period_ms else 0
            reset = verdict.reset_ms[i] / 1000
            quotas.append(Quota(c.unit, limit, verdict.remaining[i], reset, math.ceil(window / 1000)))
        return tuple(quotas)

    async def _beat(self) -> None:
        """Keep the leases of exchanges still running alive; a crashed process's leases lapse. A beat that
        fails is logged and the next one comes: a heartbeat that died would let every lease of a long
        exchange lapse while it runs, and with them the concurrency limit."""
        while True:
            await asyncio.sleep(self._settings.lease_seconds / 3)
            try:
                await self._extend_leases()
            except Exception:
                log.exception("could not extend the leases of running exchanges; trying again at the next beat")

    async def _extend_leases(self) -> None:
        running = dict(self._held)
        by_engine: dict[int, tuple[object, list]] = {}
        for held in running.values():
            engines = (held.engine, self._local) if held.counted_locally else (held.engine,)
            for engine in engines:
                by_engine.setdefault(id(engine), (engine, []))[1].extend(held.leases)
        for engine, leases in by_engine.values():
            with contextlib.suppress(StorageDown):  # logged by the guard; leases there lapse if it stays down
                await self._on(engine, lambda e=engine, ls=leases: e.extend(ls, self._ttl_ms))
        # Redis's extend puts back lost leases: one whose exchange was released while it was on its way (its
        # release removed the lease first) is removed again, or it would hold a slot until it lapsed
        ended = [lease for exchange_id, held in running.items() if exchange_id not in self._held
                 and held.engine is self._shared for lease in held.leases]  # fmt: skip
        if ended:
            with contextlib.suppress(StorageDown):
                await self._on(self._shared, lambda: self._shared.drop_leases(ended))


def tier_key(identity: Identity, prefix: str = "cg") -> str:
    """Where an identity's tier override lives."""
    return f"{_key_base(identity, prefix)}:tier:{identity.name}"


def _key_base(identity: Identity, prefix: str) -> str:
    # One hash tag per tenant (or per identity without one): a Cluster keeps an admission's keys together.
    owner = f"t:{identity.tenant}" if identity.tenant else f"i:{identity.name}"
    return f"{prefix}:{{{_tag(owner)}}}"


def _budget(prefix: str, unit: str, rate: Rate, scope: str) -> Check:
    return Check(f"{prefix}:{unit[0]}{rate.period_ms}", unit, rate.amount, rate.period_ms, scope)


def _tag(owner: str) -> str:
    """A hash tag that is safe whatever the name holds (braces would end the tag early), and one to one: braces
    were once written as parentheses, which gave tenants "acme{eu}" and "acme(eu)" one budget."""
    if "{" not in owner and "}" not in owner and "%" not in owner:
        return owner
    return owner.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _refusal(ask: Ask, verdict: Verdict, quotas: tuple[Quota, ...]) -> GatewayError:
    if verdict.status is Status.BLOCKED:
        return GatewayError(ErrorKind.PERMISSION, "this API key may not use the API; contact the API's operator")
    check = ask.plan.checks[verdict.failed - 1]
    whose = "this API key" if check.scope == "identity" else "this key's organisation"
    limit = quotas[verdict.failed - 1].limit if quotas else None
    stated = f" (limit {limit})" if limit is not None else ""
    if verdict.status is Status.TOO_LARGE:
        return GatewayError(
            ErrorKind.TOO_LARGE,
            f"request too large: it may use up to {verdict.reserved} tokens (prompt and maximum output), more than"
            f" {whose} may use per {_period(check.period_ms)}{stated}; shorten the prompt or lower the output limit",
        )
    retry_ms = max(verdict.retry_ms, 1)
    headers = {"retry-after": str(math.ceil(retry_ms / 1000)), "retry-after-ms": str(retry_ms)}
    if check.unit == "concurrent":
        message = f"too many concurrent requests for {whose}{stated}; retry when one has finished"
    else:
        message = (
            f"rate limit reached for {whose}: {check.unit} per {_period(check.period_ms)}{stated}; "
            f"try again in {retry_ms / 1000:.3g}s"
        )
    return GatewayError(ErrorKind.RATE_LIMITED, message, headers)


def _period(ms: int) -> str:
    for name, size in (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms % size == 0:
            count = ms // size
            return name if count == 1 else f"{count} {name}s"
    return f"{ms} ms"
