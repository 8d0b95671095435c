"""The extraction-risk engine: features of each finished exchange (features.py), running signals per
identity and across identities (signals.py), a score and a tier with hysteresis (score.py), and the engine
that turns them into tier decisions off the request path (engine.py)."""

from __future__ import annotations

from ..config import Settings
from .engine import Decision, RiskEngine
from .signals import MemorySignals


def open_risk(settings: Settings) -> RiskEngine | None:
    if settings.risk.mode == "off":
        return None
    return RiskEngine(MemorySignals(), settings.risk.mode)


__all__ = ["Decision", "RiskEngine", "open_risk"]
