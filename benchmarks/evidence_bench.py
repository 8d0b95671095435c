"""Sustained appends per second to the evidence log, for each durability setting.

"batch": producers queue entries without waiting (as the gateway does by default); the rate counts until
the last entry is fsynced. "fsync": `--concurrency` producers each wait for their entry to be on disk
before appending the next (as each request does under durability "fsync"); group commit batches them.
Entries look like the gateway's: a begin entry (prompt, client) and an end entry (a 1.5 KB answer).
"log key" seals everything under the log's own key; "N tenants" seals each entry under one of N tenants'
daily keys, round robin, as the gateway does (tenants.py), to show what erasability costs.

    python -m benchmarks.evidence_bench [--entries 50000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from gateway.evidence import entry, keys
from gateway.evidence.log import EvidenceLog
from gateway.evidence.reader import LogReader

ANSWER = ("The sea is a vast body of salt water that covers most of the planet. " * 22).encode()[:1500]


def _entry(i: int, tenants: int = 0) -> tuple[dict, dict]:
    if i % 2 == 0:
        fields = {
            "prompt": b'{"model":"m","messages":[{"role":"user","content":"Tell me about the sea."}]}',
            "client": b"203.0.113.7",
        }
        public = {
            "v": 1,
            "kind": "begin",
            "id": f"req_{i // 2}",
            "identity": "bench",
            "tenant": _tenant(i, tenants),  # as the gateway's begin entries say it
            "tier": "unlimited",
            "route": "/v1/chat/completions",
            "model": "m",
            "stream": False,
            "decision": "admitted",
        }
    else:
        fields = {"response": ANSWER}
        public = {
            "v": 1,
            "kind": "end",
            "id": f"req_{i // 2}",
            "identity": "bench",
            "status": 200,
            "outcome": "completed",
            "latency_ms": 1.2,
            "events": 0,
            "bytes": len(ANSWER),
        }
    public["commit"], openings = entry.commit(fields)
    return public, openings


def _tenant(i: int, tenants: int) -> str | None:
    return f"tenant-{(i // 2) % tenants}" if tenants else None


async def _batch(evidence: EvidenceLog, count: int, tenants: int) -> None:
    futures = []
    for i in range(count):
        public, openings = _entry(i, tenants)
        futures.append(evidence.append(entry.canonical(public), openings, "bench", tenant=_tenant(i, tenants)))
        if i % 256 == 0:
            await asyncio.sleep(0)  # let the writer run, as a serving event loop would
    await asyncio.gather(*futures)


async def _fsync(evidence: EvidenceLog, count: int, concurrency: int, tenants: int) -> None:
    async def producer(start: int):
        for i in range(start, count, concurrency):
            public, openings = _entry(i, tenants)
            await evidence.append(entry.canonical(public), openings, "bench", tenant=_tenant(i, tenants))

    await asyncio.gather(*(producer(k) for k in range(concurrency)))


def run(mode: str, count: int, concurrency: int, tenants: int = 0) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="canarygate-evidence-bench-"))
    keys.init_keys(folder / "keys", "bench.example/log")
    evidence = EvidenceLog(
        folder / "log", keys.Keys.load(folder / "keys"), "bench.example/log", checkpoint_every=10_000
    )

    async def main() -> float:
        await evidence.start()
        start = time.perf_counter()
        if mode == "batch":
            await _batch(evidence, count, tenants)
        else:
            await _fsync(evidence, count, concurrency, tenants)
        elapsed = time.perf_counter() - start
        await evidence.close()
        return elapsed

    elapsed = asyncio.run(main())
    report = LogReader(folder / "log", keys.Keys.load(folder / "keys")).verify([evidence.verifier.vkey()])
    assert report.entries == report.opened == count
    size = sum(p.stat().st_size for p in (folder / "log").rglob("*") if p.is_file())
    return {
        "mode": mode,
        "entries": count,
        "seconds": round(elapsed, 3),
        "entries_per_second": round(count / elapsed),
        "bytes_per_entry": round(size / count),
        "concurrency": concurrency if mode == "fsync" else None,
        "tenants": tenants,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=100, help="tenants in the rows sealed per tenant")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    results = []
    for tenants in (0, args.tenants):  # alternated, so that both see the same machine
        results += [
            run("batch", args.entries, args.concurrency, tenants),
            run("fsync", args.entries // 5, args.concurrency, tenants),
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Evidence log appends",
        "",
        f"Command: `python -m benchmarks.evidence_bench --entries {args.entries} --tenants {args.tenants}`",
        "",
        "Rows sealed under tenants' keys include making each tenant's key for the day (a file written and",
        "fsynced), which happens once per tenant, day and worker; after that a batch costs one stat per tenant",
        "in it (so that a shredded key is never used again).",
        "",
        "| durability | sealed under | entries | seconds | entries/s | bytes on disk per entry |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        label = r["mode"] if r["concurrency"] is None else f"{r['mode']} ({r['concurrency']} waiting producers)"
        sealed = f"{r['tenants']} tenants' keys" if r["tenants"] else "the log key"
        lines.append(
            f"| {label} | {sealed} | {r['entries']} | {r['seconds']} | {r['entries_per_second']} "
            f"| {r['bytes_per_entry']} |"
        )
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
