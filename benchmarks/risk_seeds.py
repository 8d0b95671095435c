"""The risk engine over several draws of the simulated traffic, replayed in this process: is one run luck?

`risk_sim` drives one draw of the traffic (one seed) through a real gateway, which takes ten minutes. Here each
seed's traffic goes straight through the engine's own parts (features, MemorySignals, the engine in shadow
mode), about a minute a seed: other popular questions, other campaign start days, other account pacing. What
the gateway adds is left out: no request asks for reasoning in a field or gets an answer without prose (the
simulated ones do neither), no tarpit or limit acts, and every request counts as answered, so the answers
before suspect are the requests sent before it, as `risk_sim` counts answers.

    python -m benchmarks.risk_seeds --data ../shared/data/alpaca_eval [--seeds 1-5] [--days 30] [--users 1000]
        [--campaign-days 10]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from gateway.exchange import Identity
from gateway.risk import RiskEngine
from gateway.risk.features import Seen, features
from gateway.risk.signals import MemorySignals

from .risk_sim import EPOCH, ROOT, load, summarise
from .risk_traffic import CAMPAIGN_DAYS, Request, in_time_order, simulated

console = Console(stderr=True)


def replay(requests: list[Request], progress, task) -> dict[str, list[dict]]:
    """Each account's tier moves (as the evidence log would hold them), from its requests in time order."""
    store = MemorySignals()
    engine = RiskEngine(store, "shadow")
    moves: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(requests):
        identity = Identity(r.account, "normal")
        found = features(Seen(identity, EPOCH + r.time, EPOCH + r.time, r.prompt, 0, r.prompt, False, False, r.address))
        decision = engine.decide(found, identity, store.update(found))
        if decision is not None:
            moves[r.account].append({"to": decision.tier, "observed_at": found.time})
        if i % 5000 == 0:
            progress.update(task, completed=i)
    return moves


def run_seed(seed: int, instructions: list[str], args, progress) -> dict:
    # drawn as risk_sim draws them: seed 1 here is risk_sim's --seed 1
    groups = simulated(seed, instructions, args.users, args.days, args.campaign_days)
    requests = in_time_order(groups)
    task = progress.add_task(f"seed {seed}", total=len(requests))
    moves = replay(requests, progress, task)
    progress.update(task, completed=len(requests))
    served = defaultdict(list)
    for r in requests:
        served[r.account].append(r.time)
    return summarise(groups, served, moves)


def parse_seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def write(out: Path, command: str, results: dict[int, dict]) -> None:
    (out / "risk-seeds.json").write_text(json.dumps({"command": command, "seeds": results}, indent=2) + "\n")
    campaigns_seen = [g for g in next(iter(results.values())) if g != "benign"]
    lines = [
        "# Risk engine over several draws of the simulated traffic",
        "",
        f"Command: `{command}`. Each seed draws other popular questions, campaign start days and pacing; the",
        "traffic is replayed through the engine's parts in this process (every request answered), so the",
        "answers before suspect are the requests sent before it. `risk.md` is the same traffic (seed 1) through",
        "a real gateway.",
        "",
        "| seed | benign users | ever watch | ever suspect | "
        + " | ".join(f"{c} reduction" for c in campaigns_seen)
        + " |",
        "|---" * (4 + len(campaigns_seen)) + "|",
    ]
    for seed, result in results.items():
        b = result["benign"]
        cells = [str(seed), str(b["accounts"]), str(b["ever_watch"])]
        cells.append(f"{b['ever_suspect']} ({100 * b['ever_suspect'] / b['accounts']:.2f}%)")
        for c in campaigns_seen:
            row = result[c]
            caught = "" if row["ever_suspect"] == row["accounts"] else f" ({row['ever_suspect']}/{row['accounts']})"
            cells.append(f"{row['reduction']}x{caught}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A campaign's reduction: its requests under static limits alone over those it sent before its accounts",
        "reached suspect (in parentheses, where not all did: how many reached suspect). It is the bound were",
        "suspect accounts cut off (scale 0); the default suspect tier slows them (scale 0.1, a 2 s tarpit).",
    ]
    (out / "risk-seeds.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "alpaca_eval_sample.jsonl"))
    parser.add_argument("--seeds", default="1-5", help="a seed or a range (1-5)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--campaign-days", type=int, default=CAMPAIGN_DAYS, help="how long each campaign runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    instructions, _ = load(Path(args.data))
    command = f"python -m benchmarks.risk_seeds --data {args.data} --seeds {args.seeds}"
    command += f" --days {args.days} --users {args.users}"
    if args.campaign_days != CAMPAIGN_DAYS:
        command += f" --campaign-days {args.campaign_days}"
    with Progress(console=console) as progress:
        results = {s: run_seed(s, instructions, args, progress) for s in parse_seeds(args.seeds)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out, command, results)
    console.print((out / "risk-seeds.md").read_text())


if __name__ == "__main__":
    main()
