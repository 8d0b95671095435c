"""The gateway with chosen stages switched off, for the per-stage budget (uvicorn factory).

CANARYGATE_BENCH_OFF lists the stages to replace by ones that do nothing: identify (every request is the
benchmark identity), record (no evidence log). Admit and transform are measured the same way once they do
work; switching them off replaces them with their pass-through versions.
"""

from __future__ import annotations

import json
import os

from gateway import config
from gateway.admit import AllowAll
from gateway.app import SETTINGS_ENV, GatewayApp, build_pipeline, tune_garbage_collection
from gateway.exchange import Identity
from gateway.transform import PassThrough


class FixedIdentity:
    def identify(self, exchange, credential):
        return Identity("bench", "unlimited")

    def current(self, name):
        return Identity("bench", "unlimited")


class NoRecord:
    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    def ready(self) -> str | None:
        return None

    async def commit(self, commitments) -> None:
        """Keeps nothing."""

    async def decision(self, identity, doc) -> None:
        """Keeps nothing."""

    async def begin(self, exchange) -> None:
        """Keeps nothing."""

    async def end(self, exchange) -> None:
        """Keeps nothing."""


OFF = {
    "identify": ("identifier", FixedIdentity),
    "record": ("recorder", NoRecord),
    "admit": ("admitter", AllowAll),
    "transform": ("transform", PassThrough),
}


def app() -> GatewayApp:
    spec = json.loads(os.environ[SETTINGS_ENV])
    settings = config.load(spec.get("config")).with_overrides(**spec.get("overrides", {}))
    off = [s for s in os.environ.get("CANARYGATE_BENCH_OFF", "").split(",") if s]
    app = GatewayApp(build_pipeline(settings, **{OFF[s][0]: OFF[s][1]() for s in off}))
    tune_garbage_collection()  # as `canarygate serve` does
    return app
