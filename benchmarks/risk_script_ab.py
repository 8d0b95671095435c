"""signals.lua at two commits on the same traffic: the same answers, and how much Redis time per observation?

The risk engine's script runs on the one Redis every replica shares, so its time is the part of scoring that
does not scale out. Each round runs the simulation's first observations (benchmarks.risk_traffic, as
risk_sim times them) through the baseline's script and this checkout's, in batches of 32 as the engine sends
them, in an order that alternates, and reads the server's own time in scripts (INFO commandstats). One run
differs from the next by about 10% on these machines, so the result is the median of the rounds' ratios. The
answers of the two scripts must be byte for byte the same (a change of speed, not of arithmetic), or it stops.

    python -m benchmarks.risk_script_ab --baseline HEAD --redis redis://127.0.0.1:6390/0 [--rounds 20]
        [--data ../shared/data/alpaca_eval] [--out FILE.json]

Give it a Redis of its own: other clients' scripts would count, and its keys (prefix {cg-script-ab}) are
deleted after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from gateway.redis_client import connect
from gateway.risk import redis_signals
from gateway.risk.features import Observation, observe

from .harness import cpu_model
from .risk_sim import EPOCH, _exchanges, _script_server_us, load
from .risk_traffic import CAMPAIGN_DAYS, in_time_order, simulated

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "gateway/risk/signals.lua"
PREFIX = "{cg-script-ab}"
BATCH = 32
console = Console(stderr=True)


def observations(data: Path, count: int, seed: int = 1) -> list[Observation]:
    """The first `count` observations of risk_sim's traffic (1000 people and every campaign, over 30 days)."""
    instructions, _ = load(data)
    requests = in_time_order(simulated(seed, instructions, 1000, 30, CAMPAIGN_DAYS))[:count]
    return [observe(e, EPOCH + r.time) for e, r in zip(_exchanges(requests), requests, strict=True)]


async def run_script(url: str, script: str, found: list[Observation]) -> tuple[float, str]:
    """(server microseconds per observation, a digest of every answer) of one pass over `found`."""
    client = connect(url, 10.0)
    store = redis_signals.RedisSignals(client, PREFIX)  # to encode the batches as the engine sends them
    try:
        sha = await client.script_load(script)
        before, answers = await _script_server_us(url), hashlib.sha256()
        for i in range(0, len(found), BATCH):
            for answer in await client.evalsha(sha, 1, PREFIX, *store.arguments(found[i : i + BATCH])):
                answers.update(answer)
        spent = (await _script_server_us(url) - before) / len(found)
    finally:
        keys = [key async for key in client.scan_iter(match=PREFIX + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await client.aclose()
    return spent, answers.hexdigest()


def compare(url: str, scripts: dict[str, str], found: list[Observation], rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in scripts}
    with Progress(console=console) as progress:
        task = progress.add_task("rounds", total=rounds)
        for r in range(rounds):
            digests = {}
            for name in list(scripts)[:: 1 if r % 2 == 0 else -1]:
                spent, digests[name] = asyncio.run(run_script(url, scripts[name], found))
                times[name].append(spent)
            if len(set(digests.values())) != 1:
                raise SystemExit("the two scripts answer differently: not a change of speed alone")
            progress.advance(task)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a commit whose signals.lua is the baseline")
    parser.add_argument("--redis", required=True, help="redis://... of a server this benchmark has to itself")
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "alpaca_eval_sample.jsonl"))
    parser.add_argument("--observations", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="write the result here as JSON")
    args = parser.parse_args()
    git = ["git", "-C", str(ROOT), "show", f"{args.baseline}:{SCRIPT}"]
    shown = subprocess.run(git, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"no {SCRIPT} at {args.baseline}: {shown.stderr.strip()}")
    scripts = {"baseline": shown.stdout, "this": (ROOT / SCRIPT).read_text()}
    found = observations(Path(args.data), args.observations)
    times = compare(args.redis, scripts, found, args.rounds)
    ratios = [new / old for old, new in zip(times["baseline"], times["this"], strict=True)]
    result = {
        "command": "python -m benchmarks.risk_script_ab " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "baseline": _commit(args.baseline),
        "this": _commit("HEAD") + (" with uncommitted changes to the script" if _script_changed() else ""),
        "cpu": cpu_model(),
        "observations": len(found),
        "server_us_per_observation": {name: round(statistics.median(t), 1) for name, t in times.items()},
        "ratio_median": round(statistics.median(ratios), 3),
        "rounds_lower": sum(r < 1 for r in ratios),
        "rounds": args.rounds,
        "runs": {name: [round(t, 1) for t in runs] for name, runs in times.items()},
    }
    console.print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _commit(name: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", name], capture_output=True, text=True).stdout.strip()


def _script_changed() -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", SCRIPT]).returncode != 0


if __name__ == "__main__":
    main()
