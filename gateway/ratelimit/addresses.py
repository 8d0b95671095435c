"""Limits on requests that carry no valid key, per client address (IPv6 per /64), on the `limits` library.

Such requests are refused before any upstream work, but each still costs a key lookup and a log record,
and a flood of them is how keys are guessed. A moving window per address on the same storage as the
identity limits (Redis, through `limits`' redis-py implementation, or memory) bounds them; while the
storage is down, a window in this process's memory does.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urlsplit

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from ..config import Rate
from ..exchange import ErrorKind, GatewayError
from .guard import StorageDown, StorageGuard

_NAMESPACE = "unauthenticated"
_ASYNC_SCHEMES = {
    "redis": "async+redis",
    "rediss": "async+rediss",
    "redis+cluster": "async+redis+cluster",
    "redis+sentinel": "async+redis+sentinel",
}


class AddressLimiter:
    def __init__(
        self,
        rates: tuple[Rate, ...],
        storage_url: str = "memory",
        guard: StorageGuard | None = None,
        timeout: float = 0.05,
    ) -> None:
        self._items = limits.parse_many("; ".join(r.text for r in rates)) if rates else []
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._storage = None
        self._shared = None
        self._guard = guard
        scheme = urlsplit(storage_url).scheme
        if scheme in _ASYNC_SCHEMES and guard is not None:
            uri = _ASYNC_SCHEMES[scheme] + storage_url[len(scheme) :]
            self._storage = storage_from_string(
                uri,
                implementation="redispy",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                wrap_exceptions=True,
            )
            self._shared = MovingWindowRateLimiter(self._storage)

    async def check(self, group: str) -> None:
        """Count one unauthenticated request from `group`; raises RATE_LIMITED once its windows are full. A
        refused request is counted in none of them: every window is tested before any is charged (charging
        each in turn filled the hourly window with the requests the minute's refused)."""
        for charge in (False, True):
            for item in self._items:
                limiter, allowed = await self._ask(item, group, charge)
                if not allowed:
                    wait = max(await self._reset_at(limiter, item, group) - time.time(), 0.001)
                    raise GatewayError(
                        ErrorKind.RATE_LIMITED,
                        f"too many requests without a valid API key from this address (limit {item.amount} per "
                        f"{item.GRANULARITY.name}); try again in {wait:.3g}s",
                        {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))},
                    )

    async def _ask(self, item, group: str, charge: bool) -> tuple[MovingWindowRateLimiter, bool]:
        """Whether the window has room (and, with `charge`, take it), on the shared storage while it answers."""
        if self._shared is not None:
            shared = self._shared.hit if charge else self._shared.test
            try:
                return self._shared, await self._guard.call(lambda: shared(item, _NAMESPACE, group))
            except StorageDown:
                pass
        return self._local, await (self._local.hit if charge else self._local.test)(item, _NAMESPACE, group)

    async def _reset_at(self, limiter: MovingWindowRateLimiter, item, group: str) -> float:
        if limiter is self._local:
            return (await limiter.get_window_stats(item, _NAMESPACE, group)).reset_time
        try:
            return (await self._guard.call(lambda: limiter.get_window_stats(item, _NAMESPACE, group))).reset_time
        except StorageDown:
            return time.time() + 1

    async def close(self) -> None:
        if self._storage is not None:
            await self._storage.bridge.storage.aclose()
