"""Real redis-server processes for tests: standalone, a 3-master Cluster, and a Sentinel-watched pair.

Each runs on free loopback ports with nothing kept on disk, and is stopped (SIGKILL after SIGTERM) when its
context ends. Without the redis-server binary the tests that need one skip, except in CI
(CANARYGATE_CI=1), where they fail: a green CI must mean they ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def require_redis() -> None:
    if REDIS_SERVER and REDIS_CLI:
        return
    if os.environ.get("CANARYGATE_CI"):
        pytest.fail("redis-server and redis-cli are required in CI (apt-get install redis-server)")
    pytest.skip("redis-server is not installed; these tests start their own Redis processes")


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below` (a Cluster node also listens on its port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


class RedisProcess:
    """One redis-server; `kill`, `pause`, `resume` and `restart` inject faults."""

    def __init__(self, workdir: str, *extra: str, config_file: str | None = None) -> None:
        self.port = free_port(below=55536 if "--cluster-enabled" in extra else 65536)
        self.workdir = workdir
        self.extra = extra
        self.config_file = config_file
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        args = [
            REDIS_SERVER,
            *([self.config_file] if self.config_file else []),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def standalone():
    require_redis()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(workdir).start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def cluster(masters: int = 3):
    """A Cluster of `masters` masters without replicas; yields the redis+cluster:// URL."""
    require_redis()
    with tempfile.TemporaryDirectory() as workdir:
        nodes = []
        try:
            for i in range(masters):
                node_dir = os.path.join(workdir, str(i))
                os.mkdir(node_dir)
                nodes.append(
                    RedisProcess(
                        node_dir,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ).start()
                )
            addresses = [f"127.0.0.1:{n.port}" for n in nodes]
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            _wait(lambda: all(redis.Redis(port=n.port).cluster("info")["cluster_state"] == "ok" for n in nodes))
            yield "redis+cluster://" + ",".join(addresses)
        finally:
            for node in nodes:
                node.stop()


class SentinelSetup:
    def __init__(self, master: RedisProcess, replica: RedisProcess, sentinel: RedisProcess) -> None:
        self.master, self.replica, self.sentinel = master, replica, sentinel
        self.url = f"redis+sentinel://127.0.0.1:{sentinel.port}/cg"

    def current_master_port(self) -> int:
        host, port = redis.Redis(port=self.sentinel.port).execute_command("SENTINEL", "get-master-addr-by-name", "cg")
        return int(port)

    def settled(self) -> bool:
        """Whether the Sentinel's view of the master is whole again after a fail-over (it answers as a master,
        with no down flag): until then a client discovering the master can get none (MasterNotFoundError)."""
        state = redis.Redis(port=self.sentinel.port).sentinel_master("cg")
        return state["flags"] == "master" and state["role-reported"] == "master"


@contextlib.contextmanager
def sentinel():
    """A master, its replica, and one Sentinel (quorum 1) that fails over within about a second."""
    require_redis()
    with tempfile.TemporaryDirectory() as workdir:
        processes = []
        try:
            master = RedisProcess(workdir).start()
            processes.append(master)
            replica = RedisProcess(workdir, "--replicaof", "127.0.0.1", str(master.port)).start()
            processes.append(replica)
            _wait(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up")
            conf = os.path.join(workdir, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(
                    f"sentinel monitor cg 127.0.0.1 {master.port} 1\n"
                    "sentinel down-after-milliseconds cg 500\n"
                    "sentinel failover-timeout cg 2000\n"
                )
            watcher = RedisProcess(workdir, "--sentinel", config_file=conf).start()
            processes.append(watcher)
            yield SentinelSetup(master, replica, watcher)
        finally:
            for process in processes:
                process.stop()


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        time.sleep(0.05)
    raise TimeoutError("Redis setup did not become ready")
