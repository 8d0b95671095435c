"""A deadline and a circuit breaker around the shared limit storage.

Every call gets `timeout` seconds, whether Redis is gone (refused at once), frozen (no answer: the
deadline) or failing over. After a failure the breaker opens: for `cooldown` seconds no call is tried and
the admitter applies its storage-error policy at once; then one call probes, and its success closes it.
A failure also runs `on_failure` (the shared budget drops its idle connections: after a fail-over they
point at the master that is gone, and each would fail once more, opening the breaker again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from limits.errors import StorageError
from redis.exceptions import RedisClusterException, RedisError

from .. import metrics

log = logging.getLogger("canarygate.limits")

# TimeoutError is an OSError; a Cluster with no node to reach raises RedisClusterException, no RedisError
STORAGE_ERRORS = (RedisError, RedisClusterException, OSError, StorageError)


class StorageDown(Exception):
    """The shared storage cannot be used right now (the message says why, without secrets)."""


class StorageGuard:
    def __init__(self, timeout: float, cooldown: float = 1.0, on_failure=None) -> None:
        self._timeout = timeout
        self._cooldown = cooldown
        self._on_failure = on_failure  # a coroutine function, or None
        self.failure: str | None = None  # why the storage is down, while it is
        self._probe_at = 0.0
        metrics.LIMIT_STORAGE_UP.set(1)

    async def call(self, make):
        """Run `make()` (a coroutine function) within the deadline; raises StorageDown."""
        if self.failure is not None:
            now = time.monotonic()
            if now < self._probe_at:
                raise StorageDown(self.failure)
            self._probe_at = now + self._cooldown  # this call probes; the others keep the policy meanwhile
        try:  # asyncio.timeout, not wait_for: wait_for wraps every call in a new task
            async with asyncio.timeout(self._timeout):
                result = await make()
        except STORAGE_ERRORS as e:
            self._trip(e)
            if self._on_failure is not None:  # within the deadline too (TimeoutError is a storage error)
                with contextlib.suppress(*STORAGE_ERRORS):
                    async with asyncio.timeout(self._timeout):
                        await self._on_failure()
            raise StorageDown(self.failure) from None
        if self.failure is not None:
            log.warning("limit storage is back after: %s", self.failure)
            self.failure = None
            metrics.LIMIT_STORAGE_UP.set(1)
        return result

    def _trip(self, error: Exception) -> None:
        reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}"
        if self.failure is None:
            log.warning("limit storage unavailable (%s); applying the storage-error policy", reason)
            metrics.LIMIT_STORAGE_UP.set(0)
        self.failure = f"limit storage unavailable ({reason})"
        self._probe_at = time.monotonic() + self._cooldown
