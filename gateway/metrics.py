"""Prometheus metrics for the gateway, and their exposition (one registry, or many worker processes).

With several workers, `canarygate serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start and
`/metrics` aggregates every worker's files, so a scrape sees the whole server.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .exchange import Exchange, Outcome

REQUESTS = Counter("canarygate_requests_total", "Requests by route, status and tier", ["route", "status", "tier"])
LATENCY = Histogram(
    "canarygate_request_duration_seconds",
    "Time from request to last byte",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
FIRST_BYTE = Histogram(
    "canarygate_first_byte_seconds",
    "Time from request to the first byte of a streamed answer",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_ERRORS = Counter("canarygate_upstream_errors_total", "Upstream failures by kind", ["kind"])
STREAM_CANCELLATIONS = Counter(
    "canarygate_stream_cancellations_total", "Streams cancelled because the client went away", ["route"]
)

LIMIT_DECISIONS = Counter(
    "canarygate_limit_decisions_total",
    "Admission decisions: admitted, limited, blocked, too_large, unavailable; and where they were taken",
    ["decision", "storage"],
)
LIMIT_STORAGE_UP = Gauge(
    "canarygate_limits_storage_up",
    "1 while the shared limit storage answers, 0 while the fallback applies",
    multiprocess_mode="livemin",  # of the workers alive: one that died with storage down must not say so forever
)


def observe(exchange: Exchange) -> None:
    route = exchange.route or "other"
    _child(REQUESTS, route, str(exchange.status), exchange.tier or "none").inc()
    _child(LATENCY, route).observe(exchange.elapsed())
    if exchange.first_byte_at is not None:
        _child(FIRST_BYTE, route).observe(exchange.first_byte_at - exchange.started)
    if exchange.outcome is Outcome.CLIENT_CANCELLED and exchange.stream:
        _child(STREAM_CANCELLATIONS, route).inc()
    if exchange.outcome is Outcome.UPSTREAM_FAILED:
        _child(UPSTREAM_ERRORS, exchange.error or "unknown").inc()


_children: dict[tuple, object] = {}  # (metric, *labels) -> the metric's child for those labels


def _child(metric, *labels: str):
    """The metric's child for `labels`, found once: labels() validates and locks on every call, which cost
    more than the observation itself, for the few label values every request uses (routes, statuses, tiers)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def worker_started() -> None:
    """This worker starts: the live gauges of workers gone without stopping (killed, crashed: the supervisor
    starts another) leave the sum."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    for path in Path(folder).glob("gauge_live*_*.db") if folder else ():
        pid = int(path.stem.rsplit("_", 1)[1])
        if not _alive(pid):
            multiprocess.mark_process_dead(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number
        pass
    return True


def worker_stopped() -> None:
    """This worker is stopping: its live gauges leave the sum (a worker restarted by the supervisor is a new
    process, whose values are its own)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
