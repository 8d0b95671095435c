"""Admission cost per request: the admit stage alone (admit, then release with real usage), with memory
storage and with Redis on loopback, one request at a time and 32 at once.

    python -m benchmarks.admission_bench [--requests 20000] [--redis URL] [--out benchmarks/results]

Without --redis it starts its own redis-server on a free loopback port. The identity is in the normal
tier with limits set too high to refuse, so every limit is checked, debited, settled and reported in the
headers' quotas, as on a real request.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import platform
import statistics
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import hiredis
import uvloop

from gateway import config
from gateway.exchange import Exchange, Identity
from gateway.ratelimit import open_admitter
from gateway.redis_client import connect
from tests.redis_servers import RedisProcess

LIMITS = {
    "identity": {"requests": "100000000/minute; 1000000000/day", "tokens": "1000000000/minute", "concurrency": 10000}
}


def _exchange(i: int) -> Exchange:
    exchange = Exchange(f"req_{i}", "POST", "/v1/chat/completions", "openai", "/v1/chat/completions", "127.0.0.1")
    exchange.identity = Identity("bench", "normal")
    exchange.prompt_tokens, exchange.requested_output = 40, None
    return exchange


async def _one(admitter, i: int, admit_times: list[float], release_times: list[float]) -> None:
    exchange = _exchange(i)
    started = time.perf_counter()
    await admitter.admit(exchange)
    admitted = time.perf_counter()
    exchange.upstream_status, exchange.tokens_used = 200, 350
    await admitter.release(exchange)
    admit_times.append(admitted - started)
    release_times.append(time.perf_counter() - admitted)


async def _measure(storage: str, requests: int, concurrency: int) -> dict:
    settings = config.parse({"limits": {**LIMITS, "storage": storage, "timeout_ms": 1000}}, "admission bench")
    admitter = open_admitter(settings)
    await admitter.start()
    admit_times: list[float] = []
    release_times: list[float] = []
    for i in range(200):  # warm up: connections, script cache
        await _one(admitter, i, [], [])
    counter = iter(range(requests))
    cpu, wall = time.process_time(), time.perf_counter()

    async def worker() -> None:
        for i in counter:
            await _one(admitter, i, admit_times, release_times)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await admitter.close()
    return {
        "admit_median_us": round(statistics.median(admit_times) * 1e6, 1),
        "admit_p99_us": round(sorted(admit_times)[int(len(admit_times) * 0.99)] * 1e6, 1),
        "release_median_us": round(statistics.median(release_times) * 1e6, 1),
        "cpu_per_request_us": round(cpu / requests * 1e6, 1),
        "requests_per_s": round(requests / wall),
    }


async def _floor(url: str, requests: int) -> dict:
    """What any call to this Redis costs: a PING's median round trip from this client, from a bare asyncio
    socket (no client library: the least any Python client could pay), and from redis-benchmark (a C
    client: about the loopback itself); the admission's own script call replayed over the bare socket; and
    the server's own time per script call (INFO commandstats)."""
    client = connect(url, 1.0)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        await client.execute_command("PING")
        times.append(time.perf_counter() - started)
    stats = await client.info("commandstats")
    await client.aclose()
    evalsha = stats.get("cmdstat_evalsha", {})
    return {
        "ping_median_us": round(statistics.median(times) * 1e6, 1),
        "bare_socket_ping_median_us": await _bare_ping(url, requests),
        "c_client_ping_median_us": _c_ping(url, requests),
        "bare_socket_admission_median_us": await _bare_admission(url, await _admission_command(url), requests),
        "script_server_us_per_call": evalsha.get("usec_per_call"),
    }


async def _bare_ping(url: str, requests: int) -> float:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await reader.readline()
        times.append(time.perf_counter() - started)
    writer.close()
    await writer.wait_closed()
    return round(statistics.median(times) * 1e6, 1)


class _Recording:
    """A Redis client that forwards everything and keeps the last command sent."""

    def __init__(self, client) -> None:
        self._client, self.last = client, None

    async def execute_command(self, *args, **options):
        self.last = args
        return await self._client.execute_command(*args, **options)

    def __getattr__(self, name):
        return getattr(self._client, name)


async def _admission_command(url: str) -> tuple:
    """The script call of a real admission, as the admit stage sends it once the script is cached (EVALSHA;
    the first admission sends the whole script with EVAL)."""
    settings = config.parse({"limits": {**LIMITS, "storage": url, "timeout_ms": 1000}}, "admission bench")
    admitter = open_admitter(settings)
    shared = admitter._shared  # the benchmark reads the engine's client to replay its exact command
    shared.client = recording = _Recording(shared.client)
    for i in range(2):
        exchange = _exchange(i)
        await admitter.admit(exchange)
        command = recording.last
        exchange.upstream_status, exchange.tokens_used = 200, 350
        await admitter.release(exchange)
    await admitter.close()
    return command


async def _bare_admission(url: str, command: tuple, requests: int) -> float:
    """The admission's own script call, replayed over a bare asyncio socket (replies parsed by hiredis):
    what the admission costs with no client library at all."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
    words = [w if isinstance(w, bytes) else str(w).encode() for w in command]
    packed = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    parser, times = hiredis.Reader(), []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            writer.write(packed)
            reply = False
            while reply is False:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection during the replay")
                parser.feed(data)
                reply = parser.gets()
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"the replayed admission failed: {reply}")
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
        await writer.wait_closed()
    return round(statistics.median(times) * 1e6, 1)


def _c_ping(url: str, requests: int) -> float | None:
    """redis-benchmark's median PING at one connection, or None where the tool is missing."""
    parts = urlsplit(url)
    argv = ["redis-benchmark", "-h", parts.hostname, "-p", str(parts.port or 6379), "-c", "1", "-n", str(requests),
            "-t", "ping", "--csv"]  # fmt: skip
    try:
        found = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = list(csv.DictReader(found))
    if not rows or "p50_latency_ms" not in rows[-1]:  # older redis-benchmark prints no percentiles
        return None
    return round(float(rows[-1]["p50_latency_ms"]) * 1000, 1)


def run(args) -> dict:
    results = {}
    server = None
    redis_url = args.redis
    if redis_url is None:
        server = RedisProcess(tempfile.mkdtemp(prefix="admission-bench-")).start()
        redis_url = server.url
    try:
        for storage in ("memory", redis_url):
            name = "memory" if storage == "memory" else "redis"
            for concurrency in (1, 32):
                results[f"{name}_c{concurrency}"] = uvloop.run(_measure(storage, args.requests, concurrency))
        results["redis_floor"] = uvloop.run(_floor(redis_url, min(args.requests, 5000)))
    finally:
        if server is not None:
            server.stop()
    return results


def _versions() -> dict:
    found = {}
    for name in ("redis", "hiredis", "limits"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    found["redis-server"] = next((w[2:] for w in server if w.startswith("v=")), "?")
    return found


def write(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m benchmarks.admission_bench " + " ".join(args.argv),
        "machine": platform.node(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": _versions(),
        "requests": args.requests,
    }
    lines = [
        "# Admission cost per request",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), Python {meta['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "The admit stage alone: admit (check and debit every limit) then release (settle tokens, drop the lease),",
        "for one identity with limits too high to refuse. Redis is a redis-server on loopback.",
        "",
        "| storage | concurrency | admit median (µs) | admit p99 (µs) | release median (µs) | CPU per request (µs) "
        "| requests/s |",
        "|---|---|---|---|---|---|---|",
    ]
    floor = results.pop("redis_floor")
    for name, r in results.items():
        storage, concurrency = name.split("_c")
        lines.append(
            f"| {storage} | {concurrency} | {r['admit_median_us']} | {r['admit_p99_us']} | "
            f"{r['release_median_us']} | {r['cpu_per_request_us']} | {r['requests_per_s']} |"
        )
    lines += [
        "",
        f"Floor, same Redis: a PING round trip takes {floor['ping_median_us']} µs at the median through redis-py "
        f"as the gateway uses it, {floor['bare_socket_ping_median_us']} µs through a bare asyncio socket (no client "
        f"library) and {floor['c_client_ping_median_us']} µs from redis-benchmark (C). The admission's own script "
        f"call, replayed over the bare socket, takes {floor['bare_socket_admission_median_us']} µs: no admission "
        "from Python on this machine can cost less. The server spends "
        f"{floor['script_server_us_per_call']} µs per script call (admission and settlement, from INFO "
        "commandstats); the rest of an admission is the client (redis-py) and the stage itself.",
    ]
    results["redis_floor"] = floor
    (out / "admission.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "admission.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis", help="a Redis URL to use instead of starting redis-server")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    write(run(args), args, args.out)


if __name__ == "__main__":
    main()
