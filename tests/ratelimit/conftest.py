"""A gateway with tight limits, in-process, in front of the shared fake upstream."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway import config
from gateway.app import create_app
from gateway.identity import Registry
from tests.conftest import STATE_DIRS, ServerThread

LIMITS = {
    "unauthenticated": "5/minute",
    "default_max_tokens": 500,
    # 3 per 2 seconds: a test's four quick requests must fall inside one 667 ms interval for the fourth to be
    # refused (inside 333 ms, with 3 per second, was missed now and then on a loaded machine)
    "identity": {"requests": "3/2 seconds; 1000/hour", "tokens": "20000/day", "concurrency": 2},
    "tiers": {
        "suspect": {"tarpit_ms": 300, "max_tokens": 64},
        "quiet": {"headers": False},
    },
}


def limited_settings(
    state_dir: Path, upstream_url: str, limits: dict | None = None, watermark: dict | None = None
) -> config.Settings:
    STATE_DIRS.append(state_dir)
    return config.parse(
        {
            "upstream": {"url": upstream_url, "read_timeout": 5.0},
            "state": {"dir": str(state_dir)},
            "evidence": {"origin": "canarygate.test/" + state_dir.name, "durability": "fsync"},
            "limits": limits or LIMITS,
            "watermark": watermark or {},
            "risk": {"mode": "off"},  # these tests set tiers themselves
        },
        "test settings",
    )


@dataclass
class LimitedGateway:
    url: str
    state_dir: Path
    registry: Registry
    names = itertools.count()

    def identity(self, tier: str = "normal", tenant: str | None = None) -> tuple[str, str]:
        """A fresh identity (name, key), so that each test starts with full budgets."""
        name = f"user{next(self.names)}"
        return name, self.registry.add(name, tier=tier, tenant=tenant)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@contextlib.contextmanager
def running_gateway(state_dir: Path, upstream_url: str, limits: dict | None = None, watermark: dict | None = None):
    app = create_app(limited_settings(state_dir, upstream_url, limits, watermark))
    with ServerThread(app) as server:
        yield LimitedGateway(server.url, state_dir, Registry(state_dir))


@pytest.fixture(scope="module")
def limited(fake_upstream, tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("limited"), fake_upstream.url) as gateway:
        yield gateway
