"""The record stage: every exchange becomes a begin entry and an end entry in the evidence log, and what
the marks depend on is committed to before the first exchange.

The begin entry is written at admission (or rejection): time, request id, identity and tenant, route,
model, admission decision and tier, with the prompt and client address as commitments. The end entry is
written when the exchange ends, before its last byte is sent: the response as delivered (a commitment),
the marks applied, token usage as the upstream reported it, upstream status, latencies and how it ended.

With durability "fsync" the pipeline forwards a request only once its begin entry is on disk, and sends
the last byte of an answer only once its end entry is; with "batch" both are queued and reach disk within
the log's batch interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..exchange import Exchange, Identity
from .entry import canonical, commit
from .keys import address_hash
from .log import EvidenceLog
from .tenants import TenantKeys
from .unauthenticated import UnauthenticatedRecords

log = logging.getLogger("canarygate.evidence")
RETENTION_EVERY = 3600.0  # seconds


class EvidenceRecorder:
    def __init__(
        self,
        open_log: Callable[[], EvidenceLog],
        durability: str = "batch",
        unauthenticated: str = "",
        address_key: bytes | None = None,
        retention_days: int = 0,
    ) -> None:
        """`open_log`: the log, opened at each start (not before: a server that builds the app and then forks its
        workers gives each its own log, and a host that starts the app again gets a log that is open).
        `unauthenticated`: how many requests without a valid key are recorded in full per client address
        ("10/minute"); the rest are summarised. Empty: all are recorded in full. `address_key`: client
        addresses are kept as keyed hashes under it; None keeps them as they are. `retention_days`: tenant
        keys of older days are deleted at start and every hour (0: kept)."""
        if durability not in ("batch", "fsync"):
            raise ValueError(f"durability must be 'batch' or 'fsync', not {durability!r}")
        self._open_log = open_log
        self.log: EvidenceLog | None = None
        self._wait = durability == "fsync"
        self._unauthenticated = UnauthenticatedRecords(unauthenticated)
        self._summarised: set[str] = set()  # ids of exchanges counted, not recorded
        self._address_key = address_key
        self._retention_days = retention_days
        self._retention: asyncio.Task | None = None

    async def start(self) -> None:
        self.log = self._open_log()
        await self.log.start()
        if self._retention_days:
            self._retention = asyncio.get_running_loop().create_task(self._retain())

    async def close(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
        await self._summarise()
        await self.log.close()

    async def _retain(self) -> None:
        tenant_keys = TenantKeys(self.log.keys_directory)
        while True:
            try:
                erased = await asyncio.to_thread(tenant_keys.expire, self._retention_days)
                if erased:
                    log.info("retention: erased %d tenant-day keys older than %d days", erased, self._retention_days)
            except OSError:
                log.exception("retention: could not expire old tenant keys; trying again in an hour")
            await asyncio.sleep(RETENTION_EVERY)

    def ready(self) -> str | None:
        return "the evidence log is not open" if self.log is None else self.log.failure

    async def commit(self, commitments: list[tuple[dict, dict[str, bytes]]]) -> None:
        """Each commitment as its own entry, waited for on disk whatever the durability setting."""
        for public, fields in commitments:
            entry = {"v": 1, "kind": "commitment", "time": _iso(time.time()), **public}
            entry["commit"], openings = commit(fields)
            await self.log.append(canonical(entry), openings, None, wait=True)

    async def decision(self, identity: Identity, doc: dict) -> None:
        """A risk decision: the tier change and the signals and strengths behind it, in the clear (they are
        what makes the decision explainable and contestable; no content is in them)."""
        public = {"v": 1, "kind": "risk", "time": _iso(time.time()), "identity": identity.name, **doc}
        await self._append(public, {}, identity.name, identity.tenant or "")

    async def begin(self, exchange: Exchange) -> None:
        identity = exchange.identity
        if identity is None and not self._unauthenticated.record_in_full(self._address(exchange.client_group)):
            self._summarised.add(exchange.id)
            return
        if self._unauthenticated.summary_due():
            await self._summarise()
        public = {
            "v": 1,
            "kind": "begin",
            "id": exchange.id,
            "time": _iso(exchange.started_at),
            "identity": identity.name if identity else None,
            "tenant": identity.tenant if identity else None,
            "tier": exchange.tier,
            "method": exchange.method,
            "path": exchange.path,
            "route": exchange.route,
            "model": exchange.model,
            "stream": exchange.stream,
            "decision": "admitted" if exchange.admitted else "rejected",
        }
        fields = {"prompt": exchange.request_body, "client": self._address(exchange.client_ip).encode()}
        await self._append(public, fields, identity.name if identity else None, _tenant(exchange))

    async def end(self, exchange: Exchange) -> None:
        if exchange.id in self._summarised:
            self._summarised.discard(exchange.id)
            return
        delivered = exchange.answer()
        public = {
            "v": 1,
            "kind": "end",
            "id": exchange.id,
            "time": _iso(time.time()),
            "identity": exchange.identity.name if exchange.identity else None,
            "status": exchange.status,
            "outcome": exchange.outcome.value if exchange.outcome else None,
            "error": exchange.error,
            "upstream_status": exchange.upstream_status,
            "usage": exchange.usage,
            "marks": exchange.marks,
            "canaries": exchange.canaries,
            "latency_ms": round(exchange.elapsed() * 1000, 3),
            "first_byte_ms": None
            if exchange.first_byte_at is None
            else round((exchange.first_byte_at - exchange.started) * 1000, 3),
            "events": exchange.events,
            "bytes": len(delivered),
        }
        identity = exchange.identity.name if exchange.identity else None
        await self._append(public, {"response": delivered}, identity, _tenant(exchange))

    async def _summarise(self) -> None:
        summary = self._unauthenticated.take_summary()
        if summary is not None:
            public, fields = summary
            public = {"v": 1, "kind": "summary", **public}
            public["since"], public["until"] = _iso(public["since"]), _iso(public["until"])
            await self._append(public, fields, None, "")

    async def _append(self, public: dict, fields: dict[str, bytes], identity: str | None, tenant: str) -> None:
        public["commit"], openings = commit(fields)
        future = self.log.append(canonical(public), openings, identity, self._wait, tenant)
        if future is not None:
            await future

    def _address(self, address: str) -> str:
        return address if self._address_key is None else address_hash(self._address_key, address)


def _tenant(exchange: Exchange) -> str:
    """Whose data the exchange is: its tenant's key seals it ("" for requests of no tenant)."""
    return (exchange.identity.tenant or "") if exchange.identity else ""


_second: list = [None, ""]  # the last whole second formatted, and its text: one strftime a second, not an entry


def _iso(seconds: float) -> str:
    whole = int(seconds)
    if _second[0] != whole:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int((seconds - whole) * 1e6):06d}Z"
