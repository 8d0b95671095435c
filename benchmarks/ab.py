"""The gateway at two commits, side by side: is a change cheaper per request, and by how much?

This machine's speed drifts over minutes, so two harness runs minutes apart cannot tell a 5% change from the
drift. Here the baseline runs from a git worktree of `--baseline` and the other gateway from this checkout as it
is (uncommitted changes included), in front of one upstream, in rounds: each round starts both afresh (one
pair of processes of the same code kept a 6% difference in CPU per request over ten rounds) and wrk loads
them in turn, in a new random order. Each round gives a ratio of the two, taken seconds apart, and the result
is the median of those ratios beside each side's median.

    python -m benchmarks.ab --baseline HEAD [--rounds 8] [--duration 5] [--data ../shared/data/alpaca_eval]
        [--off record,...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import measure, systems
from .harness import DEFAULT_DATA, cpu_model, load_answers

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)
# what each round's wrk runs give, by connections: (name, the field of wrk's result); CPU and throughput loaded,
# latency not
MEASURES = {32: (("cpu_us_c32", "cpu_us_per_request"), ("rps_c32", "rps")), 1: (("p50_ms_c1", "p50_ms"),)}
NAMES = [name for fields in MEASURES.values() for name, _ in fields]


def worktree(commit: str, folder: Path) -> None:
    """A checkout of `commit` (a detached git worktree of this repository) in `folder`."""
    made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        raise SystemExit(f"no worktree of {commit}: {made.stderr.strip()}")


def measure_both(commit: str, answers: Path, workdir: Path, off: tuple[str, ...], rounds: int, duration: float):
    """Each measure of each gateway, one value per round; whatever fails, everything started is stopped and the
    worktree removed."""
    baseline, upstream = workdir / "baseline-tree", None
    trees = {"baseline": baseline, "this": ROOT}
    try:
        worktree(commit, baseline)
        upstream = systems.start_upstream(workdir, answers, 0.0)
        states = {name: _state(workdir / name) for name in trees}
        runs = {name: {m: [] for m in NAMES} for name in trees}
        order = random.Random(0)
        with Progress(console=console) as progress:
            task = progress.add_task("rounds", total=rounds)
            for _ in range(rounds):
                _round(trees, states, upstream, off, order.sample(sorted(trees), len(trees)), workdir, duration, runs)
                progress.advance(task)
        return runs
    finally:
        if upstream is not None:
            upstream.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True)


def _round(trees: dict, states: dict, upstream, off, order: list[str], workdir: Path, duration: float, runs) -> None:
    """One round: each gateway started afresh (a process keeps its own speed: its hash seed, its memory
    layout), measured in `order`, and stopped."""
    gateways = {}
    try:
        for name, tree in trees.items():
            gateways[name] = systems.start_gateway(workdir / name, upstream, *states[name], off, tree=tree)
        for name in order:
            _measure(gateways[name], duration, runs[name])
    finally:
        for gateway in gateways.values():
            gateway.stop()


def _state(folder: Path) -> tuple[Path, str]:
    """A gateway's own folder (config, state, evidence log), and its benchmark identity's key."""
    folder.mkdir()
    return systems.prepare_gateway_state(folder)


def _measure(gateway, duration: float, runs: dict[str, list[float]]) -> None:
    """One round's wrk runs of one gateway, appended to its `runs`."""
    for connections, fields in MEASURES.items():
        seconds = duration if connections > 1 else max(1.0, duration / 2)
        result = measure.wrk(gateway, connections, seconds)
        if result.errors:
            raise RuntimeError(f"{gateway.name}: {result.errors} failed requests")
        for measure_name, field in fields:
            runs[measure_name].append(getattr(result, field))


def summarise(runs: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    for measure_name in NAMES:
        base, new = runs["baseline"][measure_name], runs["this"][measure_name]
        rows.append({
            "measure": measure_name,
            "baseline_median": round(statistics.median(base), 3),
            "this_median": round(statistics.median(new), 3),
            "median_ratio": round(statistics.median(n / b for b, n in zip(base, new, strict=True)), 4),
            "rounds_this_lower": sum(n < b for b, n in zip(base, new, strict=True)),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per loaded run")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--off", default="", help="stages switched off on both sides (benchmarks.variants)")
    parser.add_argument("--out", help="write the runs and the summary here (JSON)")
    args = parser.parse_args()
    off = tuple(s for s in args.off.split(",") if s)
    workdir = Path(tempfile.mkdtemp(prefix="canarygate-ab-"))
    try:
        answers = workdir / "answers.json"
        answers.write_text(json.dumps(load_answers(Path(args.data))))
        runs = measure_both(args.baseline, answers, workdir, off, args.rounds, args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(runs)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    table = Table(title=f"this checkout against {args.baseline} ({commit}), {args.rounds} rounds, {cpu_model()}")
    for column in ("measure", "baseline median", "this median", "median ratio", "rounds this lower"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    if args.out:
        doc = {"command": "python -m benchmarks.ab " + " ".join(sys.argv[1:]), "this": _this_checkout(),
               "baseline": args.baseline, "commit": commit, "cpu": cpu_model(), "rounds": args.rounds,
               "duration": args.duration, "off": list(off), "summary": rows, "runs": runs}  # fmt: skip
        Path(args.out).write_text(json.dumps(doc, indent=1))


def _this_checkout() -> str:
    """This checkout's commit, and "+ changes" when it has uncommitted ones."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
