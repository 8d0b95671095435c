"""Admission: adaptive limits per identity, tenant and client address, in memory or shared through Redis.

`open_admitter` builds the admit stage the settings call for. `budget` holds the arithmetic (and the
memory engine), `redis_budget` the same on Redis, `guard` the deadline and circuit breaker around Redis,
`addresses` the limits on unauthenticated requests, `admitter` the stage that puts them together.
"""

from __future__ import annotations

from ..config import Settings
from ..exchange import Identity
from ..redis_client import connect
from .addresses import AddressLimiter
from .admitter import LimitAdmitter, tier_key
from .budget import MemoryBudget
from .guard import StorageGuard
from .redis_budget import RedisBudget


def open_admitter(settings: Settings) -> LimitAdmitter:
    """With memory storage each worker process keeps its own share (1/workers) of every limit; with Redis,
    every worker and replica shares one, and on a storage error either refuses (closed) or falls back to a
    local share of 1/(replicas x workers) (open)."""
    limits = settings.limits
    workers = settings.server.workers
    timeout = limits.timeout_ms / 1000
    if limits.storage == "memory":
        return LimitAdmitter(limits, None, MemoryBudget(divisor=workers), AddressLimiter(limits.unauthenticated))
    shared = RedisBudget(connect(limits.storage, timeout))
    guard = StorageGuard(timeout, on_failure=shared.drop_idle_connections)
    local = MemoryBudget(divisor=limits.replicas * workers) if limits.on_storage_error == "open" else None
    addresses = AddressLimiter(limits.unauthenticated, limits.storage, guard, timeout)  # one breaker per storage
    return LimitAdmitter(limits, shared, local, addresses, guard)


async def set_shared_tier(settings: Settings, identity: Identity, tier: str | None) -> None:
    """Write a tier override straight to the shared storage (the CLI's path; workers read it per request)."""
    budget = RedisBudget(connect(settings.limits.storage, max(settings.limits.timeout_ms / 1000, 2.0)))
    try:
        await budget.set_tier(tier_key(identity), tier)
    finally:
        await budget.close()


async def shared_tier(settings: Settings, identity: Identity) -> str | None:
    budget = RedisBudget(connect(settings.limits.storage, max(settings.limits.timeout_ms / 1000, 2.0)))
    try:
        return await budget.get_tier(tier_key(identity))
    finally:
        await budget.close()


__all__ = [
    "LimitAdmitter",
    "MemoryBudget",
    "RedisBudget",
    "open_admitter",
    "set_shared_tier",
    "shared_tier",
    "tier_key",
]
