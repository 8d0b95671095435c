"""The risk engine against simulated benign users and extraction campaigns, through a real running gateway.

A gateway process (identities, limits, watermark, evidence log and risk engine, in front of the static
benchmark upstream) serves N simulated days of traffic (benchmarks/risk_traffic.py) in time order, as fast
as it can: time is compressed by giving each request its simulated time in a header that only this
benchmark's app factory reads, into the clock of the risk engine (nothing else in the gateway sees it).
Static limits and tarpits are set out of the way (they act in real time, which the compression distorts):
what is measured is when each account reached each tier, from the risk decisions in the evidence log.

Results: benign users ever in watch and suspect; for each campaign, the share of its accounts that
reached suspect, how long that took, and how many answers the campaign obtained before it, against the
answers it obtains under static limits alone (all of them: the campaigns stay under the limits). The
cost of scoring is measured apart, on the same traffic, in this process.

    python -m benchmarks.risk_sim --data ../shared/data/alpaca_eval [--days 30] [--users 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gzip
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from rich.console import Console
from rich.progress import Progress

from gateway import config
from gateway.app import GatewayApp, build_pipeline
from gateway.exchange import Exchange, Identity
from gateway.risk import RiskEngine
from gateway.risk.features import observe
from gateway.risk.signals import MemorySignals

from .harness import cpu_model
from .risk_traffic import CAMPAIGN_DAYS, Request, in_time_order, simulated
from .systems import _spawn, _uvicorn, _wait_ready, free_port, start_upstream

ROOT = Path(__file__).resolve().parent.parent
SIM_TIME = contextvars.ContextVar("sim_time", default=0.0)
EPOCH = 1_800_000_000.0  # simulated day 0 (a fixed date, so that runs compare)
console = Console(stderr=True)


def app() -> object:
    """uvicorn factory for the simulation's gateway: the real app, its risk engine on the simulated clock."""
    settings = config.load(os.environ["CANARYGATE_SIM_CONFIG"])
    engine = RiskEngine(MemorySignals(), "enforce", clock=SIM_TIME.get)
    gateway = GatewayApp(build_pipeline(settings, risk=engine))

    async def with_clock(scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-sim-time":
                    SIM_TIME.set(EPOCH + float(value))
        await gateway(scope, receive, send)

    return with_clock


def load(data: Path) -> tuple[list[str], list[str]]:
    """(instructions, answers of 1.2-1.8 KB) from the AlpacaEval outputs."""
    instructions, answers = set(), []
    for path in sorted(data.glob("*.jsonl.gz")) if data.is_dir() else [data]:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            for line in f:
                row = json.loads(line)
                instructions.add(row["instruction"])
                if 1200 <= len(row["output"].encode()) <= 1800:
                    answers.append(row["output"])
    return sorted(instructions), answers[:: max(1, len(answers) // 64)][:64]


def start_gateway(workdir: Path, upstream_url: str, accounts: list[str]) -> tuple[object, str, dict[str, str]]:
    from gateway.identity import Registry

    state = workdir / "state"
    registry = Registry(state)
    keys = {name: registry.add(name) for name in accounts}
    cfg = workdir / "canarygate.toml"
    cfg.write_text(
        f'[state]\ndir = "{state}"\n[upstream]\nurl = "{upstream_url}"\n'
        '[server]\ntrusted_proxies = ["127.0.0.1/32"]\n'
        '[evidence]\norigin = "canarygate.bench/risk"\n'
        '[limits.identity]\nrequests = "1000000/minute"\ntokens = ""\nconcurrency = 1000\n'
        "[limits.tiers.watch]\nscale = 1.0\ntarpit_ms = 0\n[limits.tiers.suspect]\nscale = 1.0\ntarpit_ms = 0\n"
    )
    port = free_port()
    argv = _uvicorn("benchmarks.risk_sim:app", port, "--factory", "--no-proxy-headers")
    process, log = _spawn("gateway", argv, workdir, {"CANARYGATE_SIM_CONFIG": str(cfg)})
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log, "/healthz")
    return process, url, keys


async def drive(url: str, keys: dict[str, str], requests: list[Request], concurrency: int, progress) -> dict:
    """Send every request in time order, `concurrency` at a time; returns status counts per account."""
    served: dict[str, list[float]] = defaultdict(list)  # account -> simulated times of answers
    task = progress.add_task("simulated traffic", total=len(requests))
    queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 4)
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while (request := await queue.get()) is not None:
            body = {"model": "bench", "messages": [{"role": "user", "content": request.prompt}]}
            headers = {
                "authorization": f"Bearer {keys[request.account]}",
                "x-sim-time": repr(request.time),
                "x-forwarded-for": request.address,
            }
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    served[request.account].append(request.time)
                else:
                    failures += 1
            progress.advance(task)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        for request in requests:
            await queue.put(request)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    return {"served": served, "failures": failures}


def decisions(state: Path) -> dict[str, list[dict]]:
    """Every risk decision per identity, from the gateway's evidence log, in order."""
    from gateway.evidence.keys import Keys
    from gateway.evidence.reader import LogReader

    found: dict[str, list[dict]] = defaultdict(list)
    for folder in sorted((state / "evidence").glob("[0-9]*")):
        for item in LogReader(folder, Keys.load(state / "keys")).entries(strict=False):
            if item.public["kind"] == "risk":
                found[item.public["identity"]].append(item.public["decision"])
    return found


def first_time(moves: list[dict], tier: str) -> float | None:
    return next((d["observed_at"] - EPOCH for d in moves if d["to"] == tier), None)


def summarise(groups: dict[str, list[Request]], served: dict, moves: dict) -> dict:
    result = {}
    for group, requests in groups.items():
        accounts = sorted({r.account for r in requests})
        suspect_at = {a: first_time(moves.get(a, []), "suspect") for a in accounts}
        watch_at = {a: first_time(moves.get(a, []), "watch") for a in accounts}
        answers = sum(len(served.get(a, [])) for a in accounts)
        row = {
            "accounts": len(accounts),
            "requests": len(requests),
            "answers": answers,
            "ever_watch": sum(t is not None for t in watch_at.values()),
            "ever_suspect": sum(t is not None for t in suspect_at.values()),
        }
        if group != "benign":
            before = sum(sum(1 for t in served.get(a, []) if s is None or t < s) for a, s in suspect_at.items())
            starts = {a: min(r.time for r in requests if r.account == a) for a in accounts}
            hours = [(s - starts[a]) / 3600 for a, s in suspect_at.items() if s is not None]
            row |= {
                "answers_before_suspect": before,
                "static_limits_answers": len(requests),
                "reduction": round(len(requests) / max(before, 1), 1),
                "median_hours_to_suspect": round(statistics.median(hours), 1) if hours else None,
            }
        result[group] = row
    return result


def _exchanges(requests: list[Request]) -> list[Exchange]:
    out = []
    for request in requests:
        exchange = Exchange("r", "POST", "/v1/chat/completions", "openai", "/v1/chat/completions", request.address)
        exchange.identity, exchange.admitted = Identity(request.account, "normal"), True
        exchange.prompt_text = exchange.question = request.prompt  # one user message
        out.append(exchange)
    return out


def scoring_cost(requests: list[Request], redis_url: str | None, sample: int = 20000, batch: int = 32) -> dict:
    """Microseconds per observation (features, signals and score), in this process, on the same traffic:
    one at a time in memory; with Redis, in batches of `batch` as the engine sends them (per observation)."""
    requests = requests[:sample]
    store = MemorySignals()
    engine = RiskEngine(store, "shadow", clock=time.time)
    timings = []
    for exchange, request in zip(_exchanges(requests), requests, strict=True):
        start = time.perf_counter()
        found = observe(exchange, EPOCH + request.time)
        engine.decide(found, exchange.identity, store.update(found))
        timings.append((time.perf_counter() - start) * 1e6)
    result = {"memory": _quantiles(timings)}
    if redis_url:
        result["redis"] = asyncio.run(_redis_cost(requests, redis_url, batch))
    return result


async def _redis_cost(requests: list[Request], url: str, batch: int) -> dict:
    from gateway.redis_client import connect
    from gateway.risk.redis_signals import RedisSignals

    store = RedisSignals(connect(url, 5.0), "{cg-risk-bench}")
    engine = RiskEngine(MemorySignals(), "shadow", clock=time.time)
    exchanges, timings, cpu = _exchanges(requests), [], []
    try:
        server_before = await _script_server_us(url)
        for i in range(0, len(exchanges), batch):
            chunk = list(zip(exchanges[i : i + batch], requests[i : i + batch], strict=True))
            start, start_cpu = time.perf_counter(), time.process_time()
            found = [observe(exchange, EPOCH + request.time) for exchange, request in chunk]
            for f, (exchange, _), signals in zip(found, chunk, await store.update_many(found), strict=True):
                engine.decide(f, exchange.identity, signals)
            timings.append((time.perf_counter() - start) * 1e6 / len(found))
            cpu.append((time.process_time() - start_cpu) * 1e6 / len(found))
        server_us = (await _script_server_us(url) - server_before) / len(exchanges)
    finally:
        client = connect(url, 5.0)  # leave the benchmark's keys nowhere behind
        async for key in client.scan_iter(match="{cg-risk-bench}*", count=1000):
            await client.delete(key)
        await client.aclose()
        await store.close()
    return _quantiles(timings) | {
        "batch": batch,
        "server_us_per_observation": round(server_us, 1),
        "gateway_cpu_median_us": _quantiles(cpu)["median_us"],  # this process's CPU alone, not waiting
    }


async def _script_server_us(url: str) -> float:
    """The Redis server's total time in script calls so far (INFO commandstats), in microseconds: one
    standalone server, which the benchmark should have to itself (other clients' scripts would count)."""
    from gateway.redis_client import connect

    client = connect(url, 5.0)
    stats = await client.info("commandstats")
    await client.aclose()
    return sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in ("evalsha", "eval"))


def _quantiles(timings: list[float]) -> dict:
    timings = sorted(timings)
    return {"observations": len(timings), "median_us": round(timings[len(timings) // 2], 1),
            "p99_us": round(timings[int(len(timings) * 0.99)], 1)}  # fmt: skip


def plot(result: dict, groups: dict, moves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for group, requests in groups.items():
        if group == "benign":
            continue
        starts = defaultdict(lambda: float("inf"))
        for r in requests:
            starts[r.account] = min(starts[r.account], r.time)
        hours = sorted(
            (s - starts[a]) / 3600 for a in starts if (s := first_time(moves.get(a, []), "suspect")) is not None
        )
        if hours:  # from (0, 0), so that a campaign of one account shows as a step too
            shares = [i / len(starts) for i in range(len(hours) + 1)]
            ax.step([0.0, *hours], shares, where="post", label=group)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("hours from an account's first request")
    ax.set_ylabel("share of the campaign's accounts in suspect")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Time to suspect, per campaign")
    fig.tight_layout()
    fig.savefig(out / "risk-time-to-suspect.png", dpi=110)
    plt.close(fig)


def write(out: Path, args, result: dict, cost: dict, elapsed: float, failures: int) -> None:
    doc = {"command": _command(args), "cpu": cpu_model(), "days": args.days, "users": args.users, "seed": args.seed,
           "groups": result, "scoring_cost": cost, "wall_seconds": round(elapsed), "non_200": failures}  # fmt: skip
    (out / "risk.json").write_text(json.dumps(doc, indent=1))
    b = result["benign"]
    lines = [
        "# Risk engine: simulated benign users and campaigns",
        "",
        f"Command: `{_command(args)}` ({round(elapsed)} s of wall time, {failures} answers other than 200), "
        f"on {doc['cpu']} (costs differ by CPU).",
        "",
        f"Benign: {b['accounts']} users, {b['requests']} requests; ever in watch: {b['ever_watch']} "
        f"({100 * b['ever_watch'] / b['accounts']:.1f}%); ever in suspect: {b['ever_suspect']} "
        f"({100 * b['ever_suspect'] / b['accounts']:.2f}%); blocked: 0 (the engine never blocks).",
        "",
        "| campaign | accounts | requests | reached watch | reached suspect | median hours to suspect "
        "| answers before suspect | answers under static limits alone | reduction, were suspect cut off |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group, r in result.items():
        if group == "benign":
            continue
        share = 100 * r["ever_suspect"] / r["accounts"]
        lines.append(
            f"| {group} | {r['accounts']} | {r['requests']} | {r['ever_watch']} | {r['ever_suspect']} ({share:.0f}%) "
            f"| {r['median_hours_to_suspect']} | {r['answers_before_suspect']} | {r['static_limits_answers']} "
            f"| {r['reduction']}x |"
        )
    memory = cost["memory"]
    lines += [
        "",
        "The simulation measures detection, not limits: its watch and suspect tiers keep every limit (scale 1.0),",
        "so every request is answered. The last column is the bound on what a campaign gets if its accounts are",
        "cut off once suspect (a tier of scale 0, or `tier set NAME blocked`). The default suspect tier does not",
        "cut off: it scales limits to 0.1 with a 2 s tarpit and 1,024 output tokens, which slows a campaign by",
        "however much of its per-account rate falls above that.",
        "",
        f"Scoring cost (features, signals, score; in this process, memory signals): median {memory['median_us']} "
        f"us, p99 {memory['p99_us']} us per request over {memory['observations']} observations.",
    ]
    if "redis" in cost:
        shared = cost["redis"]
        lines.append(
            f"With the signals on Redis, in batches of {shared['batch']} as the engine sends them: median "
            f"{shared['median_us']} us, p99 {shared['p99_us']} us per request (one local Redis), of which the "
            f"Redis server's script time is {shared['server_us_per_observation']} us per request (INFO commandstats); "
            f"this process's CPU time is {shared['gateway_cpu_median_us']} us per request at the median (the rest of "
            "the wall time is waiting for Redis, which a gateway spends serving other requests)."
        )
    lines += ["", "![time to suspect](risk-time-to-suspect.png)"]
    (out / "risk.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


def _command(args) -> str:
    command = f"python -m benchmarks.risk_sim --data {args.data} --days {args.days} --users {args.users}"
    command += f" --seed {args.seed}"
    if args.campaign_days != CAMPAIGN_DAYS:
        command += f" --campaign-days {args.campaign_days}"
    command += f" --campaigns {args.campaigns}" if args.campaigns else ""
    return command + (f" --redis {_without_password(args.redis)}" if args.redis else "")


def _without_password(url: str) -> str:
    """The URL as the results may show it: a password is replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "alpaca_eval_sample.jsonl"))
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--campaign-days", type=int, default=CAMPAIGN_DAYS, help="how long each campaign runs")
    parser.add_argument("--campaigns", help="only these campaigns, comma-separated (default: all)")
    parser.add_argument("--redis", help="also time the signals on this Redis (redis://...), in batches")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    instructions, answers = load(Path(args.data))
    groups = simulated(args.seed, instructions, args.users, args.days, args.campaign_days)
    if args.campaigns:
        groups = {name: g for name, g in groups.items() if name == "benign" or name in args.campaigns.split(",")}
    requests = in_time_order(groups)
    workdir = Path(tempfile.mkdtemp(prefix="canarygate-risk-"))
    (workdir / "answers.json").write_text(json.dumps(answers))
    upstream = start_upstream(workdir, workdir / "answers.json", 0.0)
    process, url, keys = start_gateway(workdir, upstream.url, sorted({r.account for r in requests}))
    started = time.perf_counter()
    try:
        with Progress(console=console) as progress:
            driven = asyncio.run(drive(url, keys, requests, args.concurrency, progress))
    finally:
        process.terminate()
        process.wait(30)
        upstream.stop()
    elapsed = time.perf_counter() - started
    moves = decisions(workdir / "state")
    result = summarise(groups, driven["served"], moves)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, groups, moves, out)
    write(out, args, result, scoring_cost(requests, args.redis), elapsed, driven["failures"])


if __name__ == "__main__":
    main()
