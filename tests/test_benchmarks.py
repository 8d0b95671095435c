"""The performance harness runs end to end on a tiny load (performance itself is never asserted here)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import redis_servers

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None and not os.environ.get("CANARYGATE_CI"),
    reason="wrk is not installed (apt-get install wrk); CI installs it and never skips",
)


def run_benchmark(module: str, *args: str, out, timeout: int = 120) -> None:
    """Run one benchmark script on a tiny load, writing into `out`; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@needs_wrk
def test_harness_runs_on_a_tiny_load(tmp_path):
    run_benchmark("harness", "--quick", out=tmp_path, timeout=300)
    report = json.loads((tmp_path / "perf.json").read_text())
    for name in ("upstream", "bare", "gateway"):
        run = report["systems"][name]
        assert run["c32"]["requests"] > 0 and run["c32"]["errors"] == 0, name
        assert run["stream_timing"]["events"] > 10
    assert (
        report["systems"]["gateway"]["stream_timing"]["events"]
        == report["systems"]["upstream"]["stream_timing"]["events"]
    )
    assert {t["target"] for t in report["targets"]} >= {"median latency added at 1 connection"}
    assert "| gateway |" in (tmp_path / "perf.md").read_text()


@needs_wrk
def test_the_throughput_target_is_the_median_of_the_ratios_within_interleaved_rounds():
    """One run of each system, minutes apart, moved the ratio by a third on a noisy machine; rounds that take
    both in turn give a ratio per round, and their median is the target's measurement."""
    from benchmarks.harness import evaluate

    single = {"c32": {"rps": 100.0}, "c1": {"p50_ms": 1.0}}
    report = {"systems": {"gateway": single, "bare": {**single, "c32": {"rps": 1000.0}}},
              "budget_rps": {"gateway": [100.0, 300.0, 240.0], "bare": [1000.0, 500.0, 600.0]}}  # fmt: skip
    target = evaluate(report)[0]
    assert "3 interleaved rounds" in target["target"] and target["measured"] == 0.4  # ratios 0.1, 0.6, 0.4
    del report["budget_rps"]
    assert evaluate(report)[0]["measured"] == 0.1  # without rounds (--quick): the single runs


def test_ab_compares_this_checkout_with_a_commit_on_a_tiny_load(tmp_path):
    """HEAD (from a git worktree it makes and removes) against this checkout: both gateways serve every run."""
    listed = ["git", "worktree", "list"]
    before = subprocess.run(listed, capture_output=True, text=True, check=True).stdout
    run_benchmark("ab", "--rounds", "1", "--duration", "1", out=tmp_path / "ab.json", timeout=180)
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert [row["measure"] for row in doc["summary"]] == ["cpu_us_c32", "rps_c32", "p50_ms_c1"]
    assert doc["command"].startswith("python -m benchmarks.ab --rounds 1") and doc["cpu"] and doc["this"]
    assert sorted(doc["runs"]) == ["baseline", "this"]
    assert all(value > 0 for side in doc["runs"].values() for values in side.values() for value in values)
    assert subprocess.run(listed, capture_output=True, text=True, check=True).stdout == before


def test_the_profile_counts_each_sample_once_in_the_part_of_its_innermost_known_frame():
    from benchmarks.profile import OTHER, summarise

    raw = "\n".join(
        [
            "run (asyncio/runners.py:1);_forward (gateway/pipeline.py:2);scan (gateway/watermark/whole.py:3) 6",
            "run (asyncio/runners.py:1);end (gateway/evidence/recorder.py:4);iterencode (json/encoder.py:5) 3",
            "run (asyncio/runners.py:1);_forward (gateway/pipeline.py:2);send (aiohttp/client.py:6) 2",
            "run (asyncio/runners.py:1);select (selectors.py:7) 1",
        ]
    )
    summary = summarise(raw)
    parts = {row["part"]: row["percent"] for row in summary["parts"]}
    assert summary["samples"] == 12
    assert parts == {
        "transform: watermark": 50.0,
        "record: evidence log": 25.0,
        "forward: upstream client (aiohttp)": 16.7,
        OTHER: 8.3,
    }
    assert summary["functions"][0] == {"function": "scan (gateway/watermark/whole.py)", "percent": 50.0}


def test_a_frame_name_written_across_lines_is_one_sample_not_a_crash():
    from benchmarks.profile import summarise

    summary = summarise(
        "run (asyncio/runners.py:1);scan (gateway/watermark/whole.py:3\nx) 4\nselect (selectors.py:7) 1"
    )
    assert summary["samples"] == 5 and summary["parts"][0] == {"part": "transform: watermark", "percent": 80.0}


def test_json_benchmark_runs_on_the_sample_answers(tmp_path):
    sample = Path(__file__).parent / "data" / "alpaca_eval_sample.jsonl"
    run_benchmark("jsonio_bench", "--data", str(sample), out=tmp_path)
    rows = json.loads((tmp_path / "jsonio.json").read_text())["rows"]
    kinds = {"whole answer, 1.5 KB", "stream chunk", "chat request"}
    assert {(r["document"], r["operation"]) for r in rows} == {(k, o) for k in kinds for o in ("decode", "round trip")}
    assert {r["document"]: r["reader"] for r in rows}["chat request"] == "jsonio.loads"


def test_evidence_benchmark_runs_on_a_few_entries(tmp_path):
    run_benchmark("evidence_bench", "--entries", "400", "--tenants", "7", out=tmp_path)
    rows = json.loads((tmp_path / "evidence.json").read_text())
    assert [(r["mode"], r["tenants"]) for r in rows] == [("batch", 0), ("fsync", 0), ("batch", 7), ("fsync", 7)]
    assert all(r["entries_per_second"] > 0 for r in rows)


def test_admission_benchmark_runs_on_a_few_requests(tmp_path):
    redis_servers.require_redis()
    run_benchmark("admission_bench", "--requests", "100", out=tmp_path)
    results = json.loads((tmp_path / "admission.json").read_text())["results"]
    assert set(results) == {"memory_c1", "memory_c32", "redis_c1", "redis_c32", "redis_floor"}
    assert all(results[name]["admit_median_us"] > 0 for name in ("memory_c1", "redis_c32"))
    assert results["redis_floor"]["ping_median_us"] > 0


def test_risk_simulation_runs_on_a_short_day_of_two_campaigns(tmp_path):
    run_benchmark(
        "risk_sim",
        *("--days", "2", "--users", "20", "--campaign-days", "1", "--campaigns", "sweeper,harvester"),
        out=tmp_path,
    )
    doc = json.loads((tmp_path / "risk.json").read_text())
    assert set(doc["groups"]) == {"benign", "sweeper", "harvester"} and doc["non_200"] == 0
    assert doc["groups"]["sweeper"]["ever_suspect"] == 1  # a script sweeping one template, 1,500 a day
    assert doc["scoring_cost"]["memory"]["median_us"] > 0 and (tmp_path / "risk-time-to-suspect.png").stat().st_size > 0


def test_risk_script_ab_runs_the_script_at_a_commit_against_this_checkouts(tmp_path):
    redis_servers.require_redis()
    with redis_servers.standalone() as server:
        args = ("--baseline", "HEAD", "--redis", server.url, "--observations", "300", "--rounds", "2")
        run_benchmark("risk_script_ab", *args, out=tmp_path / "ab.json")
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert doc["rounds"] == 2 and all(len(runs) == 2 and min(runs) > 0 for runs in doc["runs"].values())
    assert doc["ratio_median"] > 0 and doc["command"].startswith("python -m benchmarks.risk_script_ab --baseline HEAD")


def test_risk_seeds_replays_each_seed_and_tables_them(tmp_path):
    run_benchmark(
        "risk_seeds", *("--seeds", "1-2", "--days", "2", "--users", "20", "--campaign-days", "1"), out=tmp_path
    )
    seeds = json.loads((tmp_path / "risk-seeds.json").read_text())["seeds"]
    assert set(seeds) == {"1", "2"} and seeds["1"]["sweeper"]["ever_suspect"] == 1
    people = seeds["2"]["benign"]["accounts"]  # 20, and the heavy users
    assert (
        seeds["1"]["paraphrase"]["accounts"] == 100 and f"| 2 | {people} |" in (tmp_path / "risk-seeds.md").read_text()
    )


def test_wordset_coverage_counts_more_sites_with_more_sets(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sample = (Path(__file__).parent / "data" / "alpaca_eval_sample.jsonl").read_bytes()
    (data / "sample.jsonl.gz").write_bytes(gzip.compress(sample))
    review = tmp_path / "review.tsv"
    review.write_text("proposal\tverdict\nthe | a\tDROP\nlarge | huge\tDROP\n")  # the second is taken already
    run_benchmark("wordset_coverage", "--data", str(data), "--proposals", str(review), out=tmp_path)
    report = json.loads((tmp_path / "wordset-coverage.json").read_text())
    shipped, more = report["shipped"], report["shipped_and_every_proposal"]
    assert more["sets"] == shipped["sets"] + 1
    assert more["sites_per_100_words"] > shipped["sites_per_100_words"] > 0
