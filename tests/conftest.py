"""Shared fixtures: real uvicorn servers on loopback for the fake upstream and the gateway (both modes)."""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import pytest
import uvicorn

from gateway import config
from gateway.app import create_app
from gateway.evidence.keys import Keys, address_hash
from gateway.evidence.reader import LogReader
from gateway.identity import Registry
from gateway.middleware import CanarygateMiddleware
from tests.fake_upstream import FakeUpstream
from tests.transforms import SwitchableTransform

UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"

# In CI, property tests draw the same examples every run (a failure is then the code's, and reproducible) and
# no example is held to a deadline (CI machines are shared and slow); elsewhere they explore as usual.
hypothesis.settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if os.environ.get("CANARYGATE_CI"):
    hypothesis.settings.load_profile("ci")


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port, in a thread with its own event loop."""

    def __init__(self, app, **options) -> None:
        self.config = uvicorn.Config(
            app,
            **options,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            threading.Event().wait(0.01)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Gateway:
    mode: str
    url: str
    key: str
    upstream: FakeUpstream
    transform: SwitchableTransform
    state_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", "content-type": "application/json", **extra}

    def records(self) -> list[dict]:
        return exchanges(self.state_dir)

    def address(self, ip: str) -> str:
        """A client address as the log keeps it: a keyed hash (the default `client_addresses`)."""
        return address_hash(Keys.load(self.state_dir / "keys").address_key, ip)


@pytest.fixture(scope="session")
def fake_upstream():
    fake = FakeUpstream()
    with ServerThread(fake) as server:
        fake.url = server.url
        yield fake


def _settings(state_dir: Path, upstream_url: str, **server) -> config.Settings:
    raw = {
        "server": {"max_body_bytes": 64 * 1024, **server},
        "upstream": {
            "url": upstream_url,
            "api_key_env": "CANARYGATE_TEST_UPSTREAM_KEY",
            "connect_timeout": 1.0,
            "read_timeout": 1.5,
        },
        "state": {"dir": str(state_dir)},
        # fsync: an exchange's entries are on disk before its answer ends, so tests can read them at once
        "evidence": {
            "origin": "canarygate.test/" + state_dir.name,
            "durability": "fsync",
            "checkpoint_every": 50,
            "checkpoint_interval": 1.0,
        },
        # the shared test gateways send hundreds of identical requests from one key, back to back: exactly
        # what the risk engine tiers down (tests/risk/ exercise it)
        "risk": {"mode": "off"},
    }
    STATE_DIRS.append(state_dir)
    return config.parse(raw, "test settings")


STATE_DIRS: list[Path] = []  # every gateway's state, checked once the suite is done (see evidence_audit)


def exchanges(state_dir: Path) -> list[dict]:
    """The exchanges in a gateway's evidence log: each end entry, with the client address of its begin entry."""
    keys = Keys.load(state_dir / "keys")
    found, clients = [], {}
    for folder in sorted((state_dir / "evidence").glob("[0-9]*")):
        reader = LogReader(folder, keys)
        for item in reader.entries(strict=False):
            public = item.public
            if public["kind"] == "begin":
                clients[public["id"]] = base64.b64decode(reader.open_all(item)["client"]["value"]).decode()
            elif public["kind"] == "end":
                found.append({**public, "client": clients.get(public["id"])})
    return found


class CountRequests:
    """ASGI wrapper counting the requests that reach the pipeline (everything but health and metrics)."""

    def __init__(self, app, counts: dict, key: Path) -> None:
        self.app, self.counts, self.key = app, counts, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in ("/healthz", "/readyz", "/metrics"):
            self.counts[self.key] = self.counts.get(self.key, 0) + 1
        await self.app(scope, receive, send)


REQUEST_COUNTS: dict[Path, int] = {}


@pytest.fixture(scope="session", autouse=True)
def evidence_audit():
    """At the end of the suite: every exchange any gateway served is in its log, and every log verifies."""
    yield
    for state_dir in STATE_DIRS:
        if not (state_dir / "evidence").exists():
            continue
        keys = Keys.load(state_dir / "keys")
        ends = begins = summarised = 0
        for folder in sorted((state_dir / "evidence").glob("[0-9]*")):
            reader = LogReader(folder, keys)
            report = reader.verify()
            assert report.covered == report.entries, f"{folder}: entries left outside the last checkpoint"
            publics = [item.public for item in reader.entries()]
            kinds = [p["kind"] for p in publics]
            ends, begins = ends + kinds.count("end"), begins + kinds.count("begin")
            summarised += sum(p["requests"] for p in publics if p["kind"] == "summary")
        assert begins == ends, state_dir
        if state_dir in REQUEST_COUNTS:  # every request is on record, in full or in a summary
            assert ends + summarised == REQUEST_COUNTS[state_dir], (
                f"{state_dir}: {REQUEST_COUNTS[state_dir]} requests, {ends} logged, {summarised} summarised"
            )


@pytest.fixture(scope="session", params=["sidecar", "middleware"])
def gateway(request, fake_upstream, tmp_path_factory):
    """The gateway in both modes, sharing one fake upstream (sidecar: over HTTP; middleware: in-process)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CANARYGATE_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    state_dir = tmp_path_factory.mktemp(f"state-{request.param}")
    transform = SwitchableTransform()
    if request.param == "sidecar":
        settings = _settings(state_dir, fake_upstream.url, trusted_proxies=["127.0.0.0/8"])
        app = create_app(settings, transform=transform)
    else:
        settings = _settings(state_dir, "http://unused.invalid", trusted_proxies=["127.0.0.0/8"])
        app = CanarygateMiddleware(fake_upstream, settings=settings, transform=transform)
    key = Registry(state_dir).add("alice", tier="unlimited")
    with ServerThread(CountRequests(app, REQUEST_COUNTS, state_dir)) as server:
        yield Gateway(request.param, server.url, key, fake_upstream, transform, state_dir)
    mp.undo()


@pytest.fixture
def gw(gateway):
    """The gateway with the fake upstream reset and the test transform off."""
    gateway.upstream.reset()
    gateway.transform.enabled = False
    gateway.transform.watermark = None
    yield gateway
