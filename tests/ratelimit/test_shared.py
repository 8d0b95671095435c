"""Limits shared through Redis by two gateway processes: standalone, Cluster and Sentinel, and what
happens when Redis dies, freezes or fails over under load. Real redis-server processes, real gateways."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from gateway import config
from gateway.exchange import Exchange, GatewayError, Identity
from gateway.identity import Registry
from gateway.ratelimit import open_admitter
from gateway.ratelimit.admitter import tier_key
from tests import redis_servers
from tests.ratelimit.conftest import running_gateway
from tests.test_cli import Running, cli

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
TIMEOUT_MS = 100


def write_config(
    folder: Path, storage: str, upstream: str, policy: str = "open", timeout_ms: int = TIMEOUT_MS, **identity
) -> Path:
    limits = {"requests": "1000/second", "tokens": "", "concurrency": 1000, **identity}
    text = f"""
[upstream]
url = "{upstream}"
read_timeout = 5.0
[state]
dir = "state"
[evidence]
checkpoint_interval = 1.0
[risk]
mode = "off"  # these tests send one prompt back to back: the risk engine would tier them down
[limits]
storage = "{storage}"
timeout_ms = {timeout_ms}
on_storage_error = "{policy}"
replicas = 2
[limits.identity]
""" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in limits.items())
    path = folder / "canarygate.toml"
    path.write_text(text)
    return path


class Pair:
    """Two gateway processes (replicas) on one config: each its own state folder, as on two hosts."""

    def __init__(self, folder: Path, config: Path) -> None:
        self.folders = [folder / "a", folder / "b"]
        for f in self.folders:
            f.mkdir()
            shutil.copy(config, f / "canarygate.toml")
        self.replicas: list[Running] = []

    def add(self, name: str, tier: str = "normal") -> str:
        """Register one identity on both replicas (the same key, as a shared registry would have it)."""
        key = Registry(self.folders[0] / "state").add(name, tier=tier)
        (self.folders[1] / "state").mkdir(exist_ok=True)
        shutil.copy(self.folders[0] / "state" / "identities.json", self.folders[1] / "state" / "identities.json")
        return key

    def __enter__(self) -> Pair:
        for f in self.folders:
            self.replicas.append(Running(f, "serve").__enter__())
        return self

    def __exit__(self, *exc) -> None:
        for replica in self.replicas:
            replica.__exit__(*exc)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]


async def _hammer(urls: list[str], key: str, total: int, concurrency: int, body=CHAT) -> list[int]:
    statuses = []
    queue = iter(range(total))
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {key}"}) as http:

        async def worker(w: int) -> None:
            for i in queue:
                response = await http.post(urls[(w + i) % len(urls)] + "/v1/chat/completions", json=body)
                statuses.append(response.status_code)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return statuses


def hammer(urls, key, total, concurrency=32, body=CHAT) -> list[int]:
    return asyncio.run(_hammer(urls, key, total, concurrency, body))


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request):
    if request.param == "standalone":
        with redis_servers.standalone() as server:
            yield server.url
    else:
        with redis_servers.cluster() as url:
            yield url


def test_two_replicas_admit_one_global_limit(redis_url, fake_upstream, tmp_path):
    fake_upstream.reset()
    # fail-closed with a generous deadline: a storage hiccup under this load shows as a 503, never as a
    # silent fall back to local limits
    config = write_config(tmp_path, redis_url, fake_upstream.url, "closed", 2000, requests="200/hour")
    pair = Pair(tmp_path, config)
    key = pair.add("crowd")
    with pair:
        statuses = hammer(pair.urls, key, total=600, concurrency=40)
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429}
    assert 200 <= admitted <= 204, admitted  # one limit across both replicas, within 2%


def test_streams_overshoot_a_token_budget_by_at_most_one_reservation(fake_upstream, tmp_path):
    fake_upstream.reset()
    fake_upstream.behaviour.event_delay = 0.02  # slow streams: all fifty are in flight together
    body = {**CHAT, "stream": True, "max_tokens": 20, "stream_options": {"include_usage": True}}
    with redis_servers.standalone() as server:
        # fail-closed with a generous deadline: a slow call must not fall back to local limits here
        pair = Pair(tmp_path, write_config(tmp_path, server.url, fake_upstream.url, "closed", 2000, tokens="600/day"))
        key = pair.add("streamer")
        with pair:
            used = asyncio.run(_streams(pair.urls, key, body, 50))
    reservation = 20 + len(json.dumps(body)) // 3 + 1  # the body as sent, or a little longer
    admitted = [u for u in used if u is not None]
    assert 0 < len(admitted) < 50
    assert sum(admitted) <= 600 + reservation, (sum(admitted), len(admitted))


async def _streams(urls, key, body, n) -> list[int | None]:
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {key}"}) as http:

        async def one(i: int) -> int | None:
            response = await http.post(urls[i % 2] + "/v1/chat/completions", json=body)
            if response.status_code != 200:
                assert response.status_code == 429
                return None
            usage = [json.loads(line[5:]) for line in response.text.splitlines() if '"usage"' in line]
            return usage[-1]["usage"]["total_tokens"]

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_tier_change_reaches_every_replica_on_the_next_request(fake_upstream, tmp_path):
    fake_upstream.reset()
    with redis_servers.standalone() as server:
        pair = Pair(tmp_path, write_config(tmp_path, server.url, fake_upstream.url, "closed", 2000))
        key = pair.add("mover")
        with pair, httpx.Client(headers={"authorization": f"Bearer {key}"}) as http:
            assert all(http.post(u + "/v1/chat/completions", json=CHAT).status_code == 200 for u in pair.urls)
            # the CLI runs on replica a's host: b's registry still says "normal", the shared override does not
            assert cli(pair.folders[0], "tier", "set", "mover", "blocked").returncode == 0
            assert [http.post(u + "/v1/chat/completions", json=CHAT).status_code for u in pair.urls] == [403, 403]
            assert cli(pair.folders[0], "tier", "set", "mover", "normal").returncode == 0
            assert [http.post(u + "/v1/chat/completions", json=CHAT).status_code for u in pair.urls] == [200, 200]


class Load:
    """Requests in a loop from a thread, each one's status and latency noted with its start time."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.urls, self.key = urls, key
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10, headers={"authorization": f"Bearer {self.key}"}) as http:
            i = 0
            while not self._stop.is_set():
                started = time.monotonic()
                status = http.post(self.urls[i % 2] + "/v1/chat/completions", json=CHAT).status_code
                self.samples.append((started, time.monotonic() - started, status))
                i += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if start <= s[0] < end]


@pytest.mark.parametrize("fault", ["kill", "pause"])
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_failure_under_load_never_holds_a_request_past_the_timeout(fault, policy, fake_upstream, tmp_path):
    fake_upstream.reset()
    with redis_servers.standalone() as server:
        config = write_config(tmp_path, server.url, fake_upstream.url, policy, requests="20/hour")
        pair = Pair(tmp_path, config)
        key = pair.add("busy", tier="unlimited")  # evaluated, never refused: every status is the storage's doing
        fresh = pair.add("fresh")
        warm = pair.add("warm", tier="unlimited")
        with pair, Load(pair.urls, key) as load:
            time.sleep(0.5)
            failed_at = time.monotonic()
            server.kill() if fault == "kill" else server.pause()
            time.sleep(1.5)
            during = load.between(failed_at, time.monotonic())
            readiness = [httpx.get(u + "/readyz") for u in pair.urls]
            if fault == "kill":
                server.start()  # a new, empty Redis on the same port
            else:
                server.resume()
            recovered_at = time.monotonic()
            _wait_ready(pair)
            ready_after = time.monotonic() - recovered_at
            # a fresh Redis has no scripts: the first admissions load them (a slower call, which under load
            # could outlast the deadline and fall back locally); done here, before the limit is measured
            hammer(pair.urls, warm, total=8, concurrency=2)
            statuses = hammer(pair.urls, fresh, total=40, concurrency=4)
    assert len(during) > 20, "too few requests ran while Redis was down"
    slowest = max(latency for _, latency, _ in during)
    # the deadline plus an ordinary request's time on a loaded machine: far below the 1.5 s fault
    assert slowest < TIMEOUT_MS / 1000 + 0.75, slowest
    expected = {200} if policy == "open" else {503}
    assert {status for _, _, status in during[2:]} == expected  # the first may have been on its way already
    # fail-open still serves (ready, degraded); fail-closed is taken out of rotation
    assert [r.status_code for r in readiness] == ([200, 200] if policy == "open" else [503, 503])
    assert all("limit storage unavailable" in r.json()["checks"]["limits"] for r in readiness)
    assert ready_after < 5
    assert statuses.count(200) == 20  # one shared limit again: 20 per hour across both replicas


def test_readiness_asks_the_limit_storage_itself(fake_upstream, tmp_path):
    """Before any request, and after a failure with no traffic since (a replica taken out of rotation gets
    none), /readyz tells the storage's state: it used to report only what the last admission had found."""
    redis_servers.require_redis()
    fake_upstream.reset()
    with redis_servers.standalone() as server:
        pair = Pair(tmp_path, write_config(tmp_path, server.url, fake_upstream.url, "closed"))
        with pair:
            server.kill()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # no request at all
                readiness = [httpx.get(u + "/readyz") for u in pair.urls]
                if all(r.status_code == 503 for r in readiness):
                    break
                time.sleep(0.2)
            assert all("limit storage unavailable" in r.json()["checks"]["limits"] for r in readiness)
            server.start()
            _wait_ready(pair)  # and still none


def _wait_ready(pair: Pair) -> None:
    """With no traffic at all: a load balancer that took a replica out of rotation sends it none, so its
    readiness must find the storage back by itself."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(httpx.get(u + "/readyz").json()["checks"]["limits"] == "ok" for u in pair.urls):
            return
        time.sleep(0.2)
    raise AssertionError("limits did not recover")


def test_sentinel_failover_under_load(fake_upstream, tmp_path):
    fake_upstream.reset()
    with redis_servers.sentinel() as setup:
        config = write_config(tmp_path, setup.url, fake_upstream.url, "open", requests="20/hour")
        pair = Pair(tmp_path, config)
        key = pair.add("busy", tier="unlimited")
        fresh = pair.add("fresh")
        with pair, Load(pair.urls, key) as load:
            time.sleep(0.5)
            old_master = setup.master.port
            failed_at = time.monotonic()
            setup.master.kill()
            deadline = time.monotonic() + 15
            while setup.current_master_port() == old_master and time.monotonic() < deadline:
                time.sleep(0.1)
            assert setup.current_master_port() == setup.replica.port
            while not setup.settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            _wait_ready(pair)
            during = load.between(failed_at, time.monotonic())
            statuses = hammer(pair.urls, fresh, total=40, concurrency=4)
    assert max(latency for _, latency, _ in during) < TIMEOUT_MS / 1000 + 0.75
    assert {status for _, _, status in during} == {200}  # fail-open: local limits while the master is gone
    assert statuses.count(200) == 20  # the promoted replica holds the one shared limit


def test_a_storage_failure_drops_the_idle_connections_that_point_where_it_was():
    """After a master is gone, each idle connection to it would fail once more, each time opening the breaker
    (and, fail-open, admitting on local limits): the first failure closes them all, so the next calls connect
    anew (with Sentinel, to the new master)."""
    from gateway.ratelimit.guard import StorageDown, StorageGuard
    from gateway.ratelimit.redis_budget import RedisBudget
    from gateway.redis_client import connect

    with redis_servers.standalone() as server:

        async def run():
            budget = RedisBudget(connect(server.url, 2.0))
            guard = StorageGuard(2.0, on_failure=budget.drop_idle_connections)
            await asyncio.gather(*(budget.client.ping() for _ in range(4)))  # four connections, idle after
            pool = budget.client.connection_pool
            assert sum(c.is_connected for c in pool._available_connections) >= 2

            async def failing():
                raise ConnectionError("the master is gone")

            with pytest.raises(StorageDown):
                await guard.call(failing)
            idle = [c.is_connected for c in pool._available_connections]
            await budget.client.aclose()
            return idle

        assert not any(asyncio.run(run()))


def test_a_name_revoked_and_registered_anew_keeps_no_tier_the_engine_gave_its_last_holder(tmp_path):
    from gateway import ratelimit

    with redis_servers.standalone() as server:
        write_config(tmp_path, server.url, "http://127.0.0.1:9")
        settings = config.load(tmp_path / "canarygate.toml")
        mover = Identity("mover", "normal")
        assert cli(tmp_path, "identities", "add", "mover").returncode == 0
        asyncio.run(ratelimit.set_shared_tier(settings, mover, "suspect"))  # as the risk engine moves it
        assert cli(tmp_path, "identities", "revoke", "mover").returncode == 0
        assert asyncio.run(ratelimit.shared_tier(settings, mover)) is None
        asyncio.run(ratelimit.set_shared_tier(settings, mover, "suspect"))  # left by an earlier version
        assert cli(tmp_path, "identities", "add", "mover", "--tier", "blocked").returncode == 0
        assert asyncio.run(ratelimit.shared_tier(settings, mover)) is None


def test_a_key_is_revoked_with_the_shared_storage_down_and_a_failed_add_changes_no_tier(tmp_path):
    from gateway import ratelimit

    with redis_servers.standalone() as server:
        write_config(tmp_path, server.url, "http://127.0.0.1:9")
        settings = config.load(tmp_path / "canarygate.toml")
        assert cli(tmp_path, "identities", "add", "bob").returncode == 0
        asyncio.run(ratelimit.set_shared_tier(settings, Identity("bob", "normal"), "suspect"))
        assert cli(tmp_path, "identities", "add", "bob").returncode == 2  # bob exists
        assert asyncio.run(ratelimit.shared_tier(settings, Identity("bob", "normal"))) == "suspect"
    write_config(tmp_path, "redis://127.0.0.1:1/0", "http://127.0.0.1:9")  # nothing listens there
    revoked = cli(tmp_path, "identities", "revoke", "bob")
    assert revoked.returncode == 0 and "its tier on the shared storage was left" in revoked.stderr
    assert "revoked" in cli(tmp_path, "identities", "list").stdout


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_a_cluster_with_no_node_to_reach_is_a_storage_failure_under_either_policy(policy):
    """redis-py raises RedisClusterException, which is no RedisError, when no Cluster node answers: it was
    not taken for a storage failure, so every request was a 500 and /readyz itself failed."""

    url = f"redis+cluster://127.0.0.1:{redis_servers.free_port()}"
    settings = config.parse({"limits": {"storage": url, "on_storage_error": policy}}, "test")

    async def run():
        admitter = open_admitter(settings)
        exchange = Exchange(id="req_1", method="POST", path="/v1/chat/completions", api="openai", route=None,
                            client_ip="192.0.2.1")  # fmt: skip
        exchange.identity = Identity("alice", "normal")
        try:
            await admitter.admit(exchange)
            outcome = "admitted"
        except GatewayError as e:
            outcome = e.kind.name
        state = await admitter.ready()
        await admitter.close()
        return outcome, state

    outcome, state = asyncio.run(run())
    assert "RedisClusterException" in state
    assert (outcome, state.startswith("degraded")) == (
        ("admitted", True) if policy == "open" else ("UNAVAILABLE", False)
    )


def test_the_lease_heartbeat_outlives_a_beat_that_fails():
    """A heartbeat that died at one failed beat left every later long exchange's lease to lapse while it ran."""
    from dataclasses import replace

    settings = config.parse({"limits": {"identity": {"concurrency": 2}}}, "test")
    settings = replace(settings, limits=replace(settings.limits, lease_seconds=0.03))

    async def run():
        admitter = open_admitter(settings)
        exchange = Exchange(id="req_1", method="POST", path="/v1/chat/completions", api="openai", route=None,
                            client_ip="192.0.2.1")  # fmt: skip
        exchange.identity = Identity("alice", "normal")
        await admitter.admit(exchange)  # running: its lease is extended at every beat
        beats, extend = [], admitter._local.extend

        async def failing_once(leases, ttl_ms):
            beats.append(time.monotonic())
            if len(beats) == 1:
                raise RuntimeError("a failure no guard knows")
            return await extend(leases, ttl_ms)

        admitter._local.extend = failing_once
        await admitter.start()
        await asyncio.sleep(0.2)
        alive = not admitter._heartbeat.done()
        await admitter.close()
        return alive, len(beats)

    alive, beats = asyncio.run(run())
    assert alive and beats >= 3


def test_a_cluster_url_logs_in_as_its_user():
    """Only the password was passed on for Cluster (and Sentinel): a Redis ACL user could not log in."""
    import redis

    from gateway.redis_client import connect

    with redis_servers.cluster() as url:
        addresses = url.removeprefix("redis+cluster://").split(",")
        for address in addresses:
            node = redis.Redis(port=int(address.rpartition(":")[2]))
            node.execute_command("ACL", "SETUSER", "gateway", "on", ">s3cret", "~*", "&*", "+@all")
            node.close()

        async def whoami():
            client = connect("redis+cluster://gateway:s3cret@" + ",".join(addresses), 2.0)
            try:
                return await client.execute_command("ACL", "WHOAMI")
            finally:
                await client.aclose()

        assert asyncio.run(whoami()) in (b"gateway", "gateway")


def test_a_tier_set_on_a_frozen_storage_ends_at_the_deadline_and_changes_nothing(tmp_path):
    """set_tier had no deadline: a frozen Redis held the admin endpoint and the risk engine's decisions for
    ever. The admin endpoint wrote the registry first, so a failed call left it and the storage disagreeing."""
    from gateway.admin import TierAdmin
    from gateway.ratelimit.guard import StorageDown

    registry = Registry(tmp_path)
    registry.add("erin")
    with redis_servers.standalone() as server:
        settings = config.parse({"limits": {"storage": server.url, "timeout_ms": TIMEOUT_MS}}, "test")

        async def run():
            admitter = open_admitter(settings)
            await admitter.set_tier(Identity("erin", "normal"), "watch")  # a connection, made while it answers
            server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(StorageDown):
                    await admitter.set_tier(Identity("erin", "normal"), "suspect")
                took = time.monotonic() - started
                admin = TierAdmin(registry, admitter, settings.limits.tiers, "token")
                body = [{"type": "http.request", "body": b'{"tier": "blocked"}', "more_body": False}]
                scope = {"method": "PUT", "path": "/admin/tiers/erin", "client": ("127.0.0.1", 1),
                         "headers": [(b"authorization", b"Bearer token")]}  # fmt: skip
                async with asyncio.timeout(5):
                    answer = await admin.handle(scope, lambda: asyncio.sleep(0, body.pop()))
            finally:
                server.resume()
            await admitter.close()
            return took, answer

        took, (status, doc, _) = asyncio.run(run())
    assert took < 1.0 and status == 503 and "unchanged" in doc["error"]["message"]
    assert registry.get("erin").tier == "normal"


def test_an_admission_the_deadline_gave_up_on_leaves_no_lease_behind_on_redis():
    """Its script was sent, so a Redis that answers late still runs it and adds the lease; the caller, told
    to retry in a second, found its own ghost holding the one concurrency slot for the lease's whole life."""

    def exchange(i: int) -> Exchange:
        made = Exchange(id=f"req_{i}", method="POST", path="/v1/chat/completions", api="openai", route=None,
                        client_ip="192.0.2.1")  # fmt: skip
        made.identity = Identity("dave", "normal")
        return made

    with redis_servers.standalone() as server:
        limits = {"storage": server.url, "on_storage_error": "closed", "timeout_ms": TIMEOUT_MS,
                  "identity": {"concurrency": 1}}  # fmt: skip
        settings = config.parse({"limits": limits}, "test")

        async def run():
            admitter = open_admitter(settings)
            await admitter.admit(exchange(0))  # a connection, made while it answers
            await admitter.release(exchange(0))
            server.pause()
            try:
                with pytest.raises(GatewayError):  # fail-closed: 503, retry in a second
                    await admitter.admit(exchange(1))
            finally:
                server.resume()  # the script it was sent runs now
            await asyncio.sleep(2.5)  # the breaker's cooldown, and a retry
            try:
                await admitter.admit(exchange(2))
                return "admitted"
            except GatewayError as e:
                return str(e)
            finally:
                await admitter.close()

        assert asyncio.run(run()) == "admitted"


def test_a_tier_the_risk_engine_set_holds_on_local_limits_while_the_storage_is_down(fake_upstream, tmp_path):
    """Fail-open decides on this process's limits while Redis is down: an identity the risk engine moved (its
    tier override lives on Redis) must stay where it was moved, not go back to its registry tier."""
    fake_upstream.reset()
    with redis_servers.standalone() as server:
        limits = {"storage": server.url, "on_storage_error": "open", "timeout_ms": 200}
        with running_gateway(tmp_path / "state", fake_upstream.url, limits) as gateway:
            name, key = gateway.identity()
            identity = Identity(name, "normal", None, False, 0.0, 0.0)
            redis.Redis.from_url(server.url).set(tier_key(identity), "blocked")  # as the engine's set_tier does
            with gateway.client(key) as http:
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 403
                server.pause()
                try:
                    assert http.post("/v1/chat/completions", json=CHAT).status_code == 403
                finally:
                    server.resume()


def test_local_limits_count_what_this_process_runs_on_the_storage(fake_upstream, tmp_path):
    """While Redis is down, fail-open decides on local limits: the requests this process still runs under
    Redis's leases take their slots there too (it admitted a key's concurrency of 2 twice over)."""
    fake_upstream.reset()
    limits = {"on_storage_error": "open", "timeout_ms": 200,
              "identity": {"requests": "1000/minute", "tokens": "1000000/minute", "concurrency": 2}}  # fmt: skip
    with (
        redis_servers.standalone() as server,
        running_gateway(tmp_path / "state", fake_upstream.url, {**limits, "storage": server.url}) as gateway,
    ):
        _, key = gateway.identity()
        fake_upstream.behaviour.hang = 3
        with gateway.client(key) as http, concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = [pool.submit(http.post, "/v1/chat/completions", json=CHAT) for _ in range(2)]
            _wait_for(lambda: len(fake_upstream.requests) == 2)
            server.pause()
            try:
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 429
            finally:
                server.resume()
            assert [r.result().status_code for r in running] == [200, 200]
            fake_upstream.behaviour.hang = 0
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # their slots came back


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_the_heartbeat_gives_running_exchanges_their_leases_back_after_redis_lost_them():
    """A Redis restarted empty (or a replica promoted before it had them) has lost the leases of exchanges still
    running: the heartbeat puts them back, so the concurrency limit counts them again (it renewed only leases
    still there: 4 ran against a limit of 2). One released while a beat was on its way is not put back."""

    def exchange(n: int) -> Exchange:
        made = Exchange(id=f"req_{n}", method="POST", path="/v1/chat/completions", api="openai", route=None,
                        client_ip="192.0.2.1")  # fmt: skip
        made.identity = Identity("alice", "normal")
        return made

    async def run(server) -> list[str]:
        settings = config.parse({"limits": {"storage": server.url, "identity": {"concurrency": 2}}}, "test")
        admitter = open_admitter(settings)
        running, released = exchange(1), exchange(2)
        await admitter.admit(running)
        await admitter.admit(released)
        server.kill()
        server.start()  # empty
        extend = admitter._shared.extend

        async def released_meanwhile(leases, ttl_ms):
            await admitter.release(released)
            return await extend(leases, ttl_ms)

        admitter._shared.extend = released_meanwhile
        await admitter._extend_leases()
        outcomes = []
        for n in (3, 4):
            try:
                await admitter.admit(exchange(n))
                outcomes.append("admitted")
            except GatewayError as refused:
                outcomes.append(refused.kind.value)
        await admitter.close()
        return outcomes

    with redis_servers.standalone() as server:
        assert asyncio.run(run(server)) == ["admitted", "rate_limited"]


def test_a_tier_the_engine_sets_is_kept_for_fail_open_even_where_the_exchange_carried_it():
    """A decision's identity is the exchange's, whose tier is the one in force when it was admitted, not its
    registry's: a decision that moved it to that very tier dropped the fail-open copy (review)."""

    async def run(server) -> str | None:
        admitter = open_admitter(config.parse({"limits": {"storage": server.url, "on_storage_error": "open"}}, "t"))
        moved = Identity("eve", "watch")  # registered normal; watch in force when its exchange was admitted
        await admitter.set_tier(moved, "watch")
        kept = admitter._local.tiers.get(tier_key(moved))
        await admitter.close()
        return kept

    with redis_servers.standalone() as server:
        assert asyncio.run(run(server)) == "watch"
