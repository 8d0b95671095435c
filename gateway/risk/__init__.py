"""The extraction-risk engine: features of each finished exchange (features.py), running signals per
identity and across identities (signals.py), a score and a tier with hysteresis (score.py), and the engine
that turns them into tier decisions off the request path (engine.py)."""

from __future__ import annotations

from ..config import Settings
from ..redis_client import connect
from .engine import Decision, RiskEngine
from .redis_signals import RedisSignals
from .signals import MemorySignals


def open_risk(settings: Settings) -> RiskEngine | None:
    """The engine, its signals kept where the limits are: in this process, or in the Redis replicas share."""
    if settings.risk.mode == "off":
        return None
    if settings.limits.storage == "memory":
        return RiskEngine(MemorySignals(), settings.risk.mode)
    timeout = max(settings.limits.timeout_ms / 1000, 1.0)  # off the request path: a slow batch delays nobody
    return RiskEngine(RedisSignals(connect(settings.limits.storage, timeout)), settings.risk.mode)


__all__ = ["Decision", "RiskEngine", "open_risk"]
