"""Performance harness: the gateway against the upstream alone, nginx, a bare passthrough and LiteLLM,
side by side in one run, with fixed real answers. Writes markdown and JSON to --out.

    python -m benchmarks.harness --data ../shared/data/alpaca_eval            # the full comparison
    python -m benchmarks.harness --data ../shared/data/alpaca_eval --litellm  # and LiteLLM (installs it once)
    python -m benchmarks.harness --systems upstream,gateway --soak 600 --out benchmarks/results/soak
                                                                              # a 10-minute memory soak
    python -m benchmarks.harness --quick --out /tmp/x                         # a tiny load (the test suite's)
    python -m benchmarks.harness --systems gateway,gateway-redis --redis       # limits on Redis (starts one)

Needs wrk (and nginx for the nginx row): `apt-get install wrk nginx-light`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tests.redis_servers import RedisProcess

from . import measure, profile, systems
from .variants import OFF

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "tests" / "data" / "alpaca_eval_sample.jsonl"
console = Console(stderr=True)


def cpu_model() -> str:
    """The CPU's model name: results from different models do not compare (the same code ran 1.4-1.6 times
    slower on an AMD EPYC than on an Intel Xeon, and the gateway more so than the bare passthrough)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load_answers(data: Path, limit: int = 64) -> list[str]:
    """Real model answers of about 1.5 KB (1.2 to 1.8 KB), the same for every system."""
    files = sorted(data.glob("*.jsonl.gz")) if data.is_dir() else [data]
    answers = []
    for path in files:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            for line in f:
                text = json.loads(line)["output"]
                if 1200 <= len(text.encode()) <= 1800:
                    answers.append(text)
    if not answers:
        raise SystemExit(f"no answers of 1.2-1.8 KB in {data}")
    step = max(1, len(answers) // limit)
    return answers[::step][:limit]


def stages_that_work() -> list[str]:
    """Stages whose 'off' version differs from what runs by default: only these have a cost to measure."""
    from gateway import config
    from gateway.app import build_pipeline

    stages = build_pipeline(config.Settings()).stages
    return [name for name, (slot, off) in OFF.items() if type(stages[_STAGE_OF[slot]]) is not off]


_STAGE_OF = {"identifier": "identify", "recorder": "record", "admitter": "admit", "transform": "transform"}


def measure_system(system, upstream, args, progress, task, *, streams: bool, memory: bool) -> dict:
    out = {}
    out["c32"] = asdict(measure.wrk(system, 32, args.duration))
    progress.advance(task)
    out["c1"] = asdict(measure.wrk(system, 1, args.duration))
    progress.advance(task)
    if streams:
        out["stream_c32"] = asdict(measure.wrk(system, 32, args.duration, stream=True))
        out["stream_timing"] = asdict(measure.stream_timing(system, upstream, args.stream_samples))
    progress.advance(task)
    if memory:
        out["memory_per_stream_bytes"] = measure.memory_per_stream(system, args.streams)
    progress.advance(task)
    return out


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="canarygate-bench-"))
    answers_file = workdir / "answers.json"
    answers = load_answers(Path(args.data))
    answers_file.write_text(json.dumps(answers))
    state, key = systems.prepare_gateway_state(workdir)
    working = stages_that_work()
    plan = [("upstream", None), ("nginx", None), ("bare", None), ("gateway", ())]
    if not args.quick:
        plan += [("gateway", (stage,)) for stage in working]
        plan += [("gateway-workers", ())]
    if args.systems:
        plan = [(kind, off) for kind, off in plan if kind in args.systems.split(",")]
    if args.redis:
        plan.append(("gateway-redis", ()))
    if args.litellm:
        plan.append(("litellm", None))
    results, skipped = {}, []
    upstream = systems.start_upstream(workdir, answers_file, args.event_delay)
    redis = RedisProcess(str(workdir)).start() if args.redis else None
    args.redis_url = redis.url if redis else None
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("benchmark", total=4 * len(plan) + (1 if args.soak else 0))
            for kind, off in plan:
                try:
                    system = _start(kind, off, workdir, upstream, state, key, args)
                except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                    console.print(f"[red]{kind} did not start: {str(e)[-500:]}")
                    system = None
                if system is None:
                    skipped.append(kind)
                    progress.advance(task, 4)
                    continue
                progress.update(task, description=system.name)
                try:
                    memory = kind in ("bare", "nginx") or (kind == "gateway" and not off)
                    results[system.name] = measure_system(
                        system, upstream, args, progress, task, streams=True, memory=memory
                    )
                    if args.soak and kind == "gateway" and not off:
                        results[system.name]["soak"] = measure.soak(system, args.soak, 32, max(1, args.soak / 60))
                        progress.advance(task)
                finally:
                    if system is not upstream:
                        system.stop()
        rounds = args.quick or args.systems
        budget_runs, budget_rps = ({}, {}) if rounds else measure_budget(workdir, upstream, state, key, working, args)
        profiled = args.profile_seconds and not args.systems
        profiles = profile_gateway(workdir, upstream, state, key, args) if profiled else []
    finally:
        upstream.stop()
        if redis is not None:
            redis.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "systems": results,
        "budget_runs": budget_runs,
        "budget_rps": budget_rps,
        "profiles": profiles,
        "stages_measured": working,
        "answers": len(answers),
        "answer_bytes_median": sorted(len(a.encode()) for a in answers)[len(answers) // 2],
    }


def measure_budget(workdir, upstream, state, key, stages: list[str], args) -> tuple[dict, dict]:
    """CPU µs per request and req/s (32 connections) of the bare passthrough, the gateway, and the gateway with
    each stage off, in `args.budget_rounds` rounds that take the systems in a new random order each time: a
    stage's cost is a difference of two such numbers, and on a noisy machine one run of each can even
    make it negative. The budget uses each system's median; the throughput target, the median of the
    gateway's share of the bare passthrough's within each round."""
    started = []
    try:  # each system joins `started` as it starts, so that a failed start still stops the others
        started.append(systems.start_bare(workdir, upstream))
        for off in [(), *((stage,) for stage in stages)]:
            started.append(systems.start_gateway(workdir, upstream, state, key, off))
        runs: dict[str, list[float]] = {system.name: [] for system in started}
        rates: dict[str, list[float]] = {system.name: [] for system in started}
        order = random.Random(0)
        with Progress(console=console) as progress:
            task = progress.add_task("per-stage budget", total=args.budget_rounds * len(started))
            for _ in range(args.budget_rounds):
                for system in order.sample(started, len(started)):
                    load = measure.wrk(system, 32, args.budget_duration)
                    runs[system.name].append(load.cpu_us_per_request)
                    rates[system.name].append(load.rps)
                    progress.advance(task)
        return runs, rates
    finally:
        for system in started:
            system.stop()


def profile_gateway(workdir, upstream, state, key, args) -> list[dict]:
    """py-spy's view of the gateway, everything on, under load of whole answers and of streams."""
    if profile.py_spy() is None:
        console.print("[yellow]py-spy is not installed (pip install py-spy): no profile")
        return []
    gateway = systems.start_gateway(workdir, upstream, state, key)
    try:
        return [profile.profile(gateway, args.profile_seconds, stream) for stream in (False, True)]
    except RuntimeError as e:  # py-spy may not be allowed to attach (no ptrace in a container)
        console.print(f"[yellow]no profile: {e}")
        return []
    finally:
        gateway.stop()


def _start(kind, off, workdir, upstream, state, key, args):
    if kind == "upstream":
        return upstream
    if kind == "nginx":
        return systems.start_nginx(workdir, upstream)
    if kind == "bare":
        return systems.start_bare(workdir, upstream)
    if kind == "gateway":
        return systems.start_gateway(workdir, upstream, state, key, off)
    if kind == "gateway-redis":
        return systems.start_gateway(workdir, upstream, state, key, limits_storage=args.redis_url)
    if kind == "gateway-workers":
        return systems.start_gateway(workdir, upstream, state, key, workers=2)
    return systems.start_litellm(workdir, upstream, Path(args.litellm_venv))


def evaluate(report: dict) -> list[dict]:
    """The issue's targets, as ratios and differences measured in this run."""
    s = report["systems"]
    gw, bare, up = s.get("gateway"), s.get("bare"), s.get("upstream")
    targets = []

    def target(name, value, limit, ok, unit=""):
        targets.append({"target": name, "measured": round(value, 3), "limit": limit, "unit": unit, "met": ok})

    paired = report.get("budget_rps") or {}
    if "gateway" in paired and "bare" in paired:  # one run of each, minutes apart, moved the ratio by a third
        each = [g / b for g, b in zip(paired["gateway"], paired["bare"], strict=True)]
        ratio = statistics.median(each)
        name = f"throughput at 32 connections vs bare passthrough (median of {len(each)} interleaved rounds)"
        target(name, ratio, ">= 0.5", ratio >= 0.5, "x")
    elif gw and bare:
        ratio = gw["c32"]["rps"] / bare["c32"]["rps"]
        target("throughput at 32 connections vs bare passthrough", ratio, ">= 0.5", ratio >= 0.5, "x")
    if gw and "litellm" in s:
        ratio = gw["c32"]["rps"] / s["litellm"]["c32"]["rps"]
        target("throughput at 32 connections vs LiteLLM", ratio, ">= 20", ratio >= 20, "x")
    if gw and up:
        added = gw["c1"]["p50_ms"] - up["c1"]["p50_ms"]
        target("median latency added at 1 connection", added, "<= 1.0", added <= 1.0, "ms")
        added = gw["stream_timing"]["added_first_content_ms"]
        target(
            "median time to first content added (stream, paired with the upstream)", added, "<= 2.0", added <= 2.0, "ms"
        )
        same = gw["stream_timing"]["events"] == up["stream_timing"]["events"]
        target(
            "events per streamed response unchanged",
            gw["stream_timing"]["events"],
            f"== {up['stream_timing']['events']}",
            same,
        )
    if gw and "soak" in gw:
        samples = gw["soak"]
        warm = samples[max(1, len(samples) // 10)][1]
        growth = (samples[-1][1] - warm) / warm
        target("memory growth over the soak (after warm-up)", growth * 100, "< 10", growth < 0.10, "%")
    return targets


def budget(report: dict) -> list[dict]:
    """CPU microseconds per request (32 connections, whole answers), split by stage; rows sum to the total.
    From the interleaved rounds' medians where they were run, else from the single runs in the table."""
    runs = report.get("budget_runs") or {}
    if runs:
        cpu = {name: statistics.median(values) for name, values in runs.items()}
    else:
        cpu = {name: r["c32"]["cpu_us_per_request"] for name, r in report["systems"].items()}
    if "gateway" not in cpu or "bare" not in cpu:
        return []
    total = cpu["gateway"]
    rows = [{"part": "forward: HTTP server + client (the bare passthrough's own cost)", "us": cpu["bare"]}]
    for stage in report["stages_measured"]:
        off = f"gateway-no-{stage}"
        if off in cpu:
            row = {"part": stage, "us": total - cpu[off]}
            if runs:  # the same difference within each round: how far noise moves it
                each = [on - without for on, without in zip(runs["gateway"], runs[off], strict=True)]
                row["range"] = [min(each), max(each)]
            rows.append(row)
    rows.append(
        {
            # by difference: what no switch turns off (the risk engine among it), and how the stages interact
            "part": "the rest, by difference: pipeline core (routing, parsing, hygiene, SSE framing, metrics), "
            "the risk engine's scoring, and noise",
            "us": total - sum(r["us"] for r in rows),
        }
    )
    rows.append({"part": "total (gateway, everything on)", "us": total})
    return rows


def environment() -> dict:
    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None

    cpu = cpu_model()
    packages = {p: _version(p) for p in ("uvicorn", "uvloop", "httptools", "aiohttp", "prometheus-client")}
    return {
        "cpu": cpu,
        "cores": len(Path("/proc/cpuinfo").read_text().split("processor")) - 1,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "wrk": version(["wrk", "-v"]),
        "nginx": version(["nginx", "-v"]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Gateway performance",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}; {env['wrk']}; {env['nginx']}; "
        f"{', '.join(f'{k} {v}' for k, v in env['packages'].items())}. {env['date']}.  ",
        f"Answers: {report['answers']} real model answers (median {report['answer_bytes_median']} bytes). "
        f"Each load run: wrk, 1 thread, {report['duration']} s. All systems measured in this one run.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']} {t['unit']} | {t['limit']} {t['unit']} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "## Systems",
        "",
        "| system | req/s c32 | p50 ms c1 | p99 ms c32 | CPU µs/req | stream req/s c32 | first event ms | "
        "first content ms | event gap ms | events | memory/stream KiB | errors |",
        "| --- | " + "--- | " * 11,
    ]
    for name, r in report["systems"].items():
        timing = r.get("stream_timing", {})
        memory = r.get("memory_per_stream_bytes")
        errors = r["c32"]["errors"] + r["c1"]["errors"] + r.get("stream_c32", {}).get("errors", 0)
        lines.append(
            f"| {name} | {r['c32']['rps']:.0f} | {r['c1']['p50_ms']:.3f} | {r['c32']['p99_ms']:.2f} | "
            f"{r['c32']['cpu_us_per_request']:.0f} | {r.get('stream_c32', {}).get('rps', 0):.0f} | "
            f"{timing.get('first_event_ms', 0):.2f} | {timing.get('first_content_ms', 0):.2f} "
            f"({timing.get('added_first_content_ms', 0):+.2f}) | "
            f"{timing.get('gap_ms', 0):.2f} | {timing.get('events', '')} | "
            f"{'' if memory is None else f'{memory / 1024:.1f}'} | {errors} |"
        )
    if report["budget"]:
        lines += [
            "",
            "## Per-stage budget (CPU µs per request, whole answers, 32 connections)",
            "",
            "Each stage's cost is the gateway's CPU per request minus the same with that stage switched off "
            "(benchmarks/variants.py); stages that are pass-through today are not listed. Rows sum to the "
            "total. "
            + (
                f"Each number is the median of {len(next(iter(report['budget_runs'].values())))} interleaved runs "
                f"of {report['budget_duration']:g} s per system (runs in perf.json), not the single runs above."
                if report.get("budget_runs")
                else "From the single runs above."
            ),
            "",
            "A stage cheaper than the noise can come out below zero: the range column gives the same difference "
            "within each round.",
            "",
            "| part | µs/request | range over rounds |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {r['part']} | {r['us']:.1f} | "
            + (f"{r['range'][0]:.0f} to {r['range'][1]:.0f} |" if "range" in r else " |")
            for r in report["budget"]
        ]
    if report.get("profiles"):
        lines += ["", *profile.markdown(report["profiles"])]
    lines += [
        "",
        "CPU µs/req counts every process of the system (all workers), user and system time, divided by "
        "the requests wrk completed. Memory per stream: resident memory with "
        f"{2 * report['streams']} streams held open minus with {report['streams']}, divided by {report['streams']} "
        "(after a first hold that warms the allocator).",
        "",
    ]
    return "\n".join(lines)


def show(report: dict) -> None:
    table = Table(title="canarygate performance")
    for column in ("system", "req/s c32", "p50 ms c1", "CPU µs/req", "first content ms"):
        table.add_column(column, justify="right")
    for name, r in report["systems"].items():
        table.add_row(
            name,
            f"{r['c32']['rps']:.0f}",
            f"{r['c1']['p50_ms']:.3f}",
            f"{r['c32']['cpu_us_per_request']:.0f}",
            f"{r.get('stream_timing', {}).get('first_content_ms', 0):.2f}",
        )
    console.print(table)
    for t in report["targets"]:
        console.print(f"{'[green]met' if t['met'] else '[red]NOT met'}[/] {t['target']}: {t['measured']} {t['unit']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="canarygate performance harness")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of *.jsonl.gz model outputs, or one file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--stream-samples", type=int, default=100)
    parser.add_argument("--streams", type=int, default=200, help="streams held open for memory per stream")
    parser.add_argument("--event-delay", type=float, default=0.005)
    parser.add_argument("--soak", type=float, default=0, help="seconds of steady load while sampling memory")
    parser.add_argument("--litellm", action="store_true", help="also measure LiteLLM (installed in its own venv)")
    parser.add_argument("--litellm-venv", default=str(ROOT / "benchmarks" / ".litellm-venv"))
    parser.add_argument("--quick", action="store_true", help="a tiny load: 1-second runs, fewer systems")
    parser.add_argument("--systems", help="only these, e.g. upstream,gateway (for a soak)")
    parser.add_argument("--budget-rounds", type=int, default=5, help="interleaved runs per system for the budget")
    parser.add_argument("--budget-duration", type=float, default=5.0, help="seconds per budget run")
    parser.add_argument("--redis", action="store_true", help="also the gateway with its limits on a Redis it starts")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="py-spy's load runs (0: no profile)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.stream_samples, args.streams = min(args.duration, 1.0), 3, 10
        args.profile_seconds = 0
    if shutil.which("wrk") is None:
        console.print("wrk is needed: apt-get install wrk")
        return 2
    report = run(args)
    report.update(
        command="python -m benchmarks.harness " + " ".join(argv if argv is not None else sys.argv[1:]),
        duration=args.duration,
        budget_duration=args.budget_duration,
        streams=args.streams,
        environment=environment(),
    )
    if "litellm" in report["systems"]:  # the ratio to it means little without its version
        report["environment"]["packages"]["litellm"] = systems.litellm_version(Path(args.litellm_venv))
    report["targets"] = evaluate(report)
    report["budget"] = budget(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(report, indent=1))
    (out / "perf.md").write_text(markdown(report))
    show(report)
    console.print(f"wrote {out / 'perf.md'} and {out / 'perf.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
