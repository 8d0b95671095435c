"""The log's share of requests without a valid key, kept bounded.

Anyone can send requests with no key or a wrong one, so recording each in full would let anyone grow the
log (and its disk) at will. The first requests per client address (IPv6 per /64) within the configured
rate are recorded in full, like any exchange; the rest are counted, and each minute one summary entry
records how many there were, from how many addresses, with the per-address counts sealed like any other
private field.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import limits
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

SUMMARY_EVERY = 60.0  # seconds


class UnauthenticatedRecords:
    def __init__(self, rates: str) -> None:
        self._items = limits.parse_many(rates) if rates.strip() else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._counts: Counter[str] = Counter()
        self._since = time.time()

    def record_in_full(self, group: str) -> bool:
        """Whether this request from `group` is recorded in full; if not, it is counted for the summary."""
        if all(self._limiter.hit(item, "records", group) for item in self._items):
            return True
        if not self._counts:
            self._since = time.time()
        self._counts[group] += 1
        return False

    def summary_due(self) -> bool:
        return bool(self._counts) and time.time() - self._since >= SUMMARY_EVERY

    def take_summary(self) -> tuple[dict, dict[str, bytes]] | None:
        """The summary entry's public fields and sealed fields, or None when nothing was left out."""
        if not self._counts:
            return None
        counts, since = self._counts, self._since
        self._counts, self._since = Counter(), time.time()
        public = {
            "what": "unauthenticated requests not recorded in full",
            "since": since,
            "until": time.time(),
            "requests": sum(counts.values()),
            "addresses": len(counts),
        }
        return public, {"counts": json.dumps(dict(sorted(counts.items()))).encode()}
