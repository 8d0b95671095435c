"""JSON on the request path: the json module against gateway.jsonio (orjson with its fallbacks), on the
documents the gateway reads and writes, in one process, interleaved.

    python -m benchmarks.jsonio_bench --data ../shared/data/alpaca_eval [--out benchmarks/results]

Documents: whole chat answers of 1.2-1.8 KB of real model text (decoded, then encoded again, as the gateway
does after marking one), the stream chunks of the same answers, one word each, as text (decoded, and
encoded again), and a chat request of the same text as the prompt (bytes), each read the way the gateway
reads it (an upstream's with jsonio.read, a client's with jsonio.loads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from gateway import demo, jsonio

from .harness import load_answers

ROUNDS = 7


def _documents(answers: list[str]) -> dict[str, list[bytes | str]]:
    """Each kind of document as the gateway holds it when it reads one: answers and requests as bytes,
    stream chunks as text (the SSE parser's)."""
    chunks = []
    for text in answers[:8]:
        events = demo.chat_events("m", [[f"{word} " for word in text.split()]])
        chunks += [event[6:-2].decode() for event in events if event.startswith(b"data: {")]
    return {
        "whole answer, 1.5 KB": [json.dumps(demo.chat_completion("m", [text])).encode() for text in answers],
        "stream chunk": chunks,
        "chat request": [_request(text) for text in answers],
    }


# how the gateway reads each kind: an upstream's document with `read`, a client's with `loads`
READERS = {"whole answer, 1.5 KB": "read", "stream chunk": "read", "chat request": "loads"}


def _request(prompt: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]}).encode()


def _stdlib_round_trip(document: bytes | str) -> bytes:
    return json.dumps(json.loads(document), ensure_ascii=False, separators=(",", ":")).encode()


def _read_round_trip(document: bytes | str) -> bytes:
    value, write = jsonio.read(document)
    return write(value)


def _loads_round_trip(document: bytes | str) -> bytes:
    return jsonio.dumps(jsonio.loads(document))


def _ways(reader: str) -> dict[str, dict]:
    if reader == "read":
        jsonio_way = {"decode": jsonio.read, "round trip": _read_round_trip}
    else:
        jsonio_way = {"decode": jsonio.loads, "round trip": _loads_round_trip}
    return {"json": {"decode": json.loads, "round trip": _stdlib_round_trip}, "jsonio": jsonio_way}


def _per_document_us(function, documents: list[bytes]) -> float:
    started = time.perf_counter()
    for document in documents:
        function(document)
    return (time.perf_counter() - started) / len(documents) * 1e6


def measure(documents: dict[str, list[bytes]]) -> list[dict]:
    """Median µs per document over ROUNDS rounds, the two ways alternating within each round."""
    rows = []
    for kind, batch in documents.items():
        ways = _ways(READERS[kind])
        for operation in ("decode", "round trip"):
            times = {way: [] for way in ways}
            for _ in range(ROUNDS):
                for way, functions in ways.items():
                    times[way].append(_per_document_us(functions[operation], batch))
            medians = {way: statistics.median(t) for way, t in times.items()}
            rows.append(
                {
                    "document": kind,
                    "operation": operation,
                    "reader": f"jsonio.{READERS[kind]}",
                    "documents": len(batch),
                    **{f"{way}_us": round(m, 2) for way, m in medians.items()},
                    "ratio": round(medians["json"] / medians["jsonio"], 2),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    documents = _documents(load_answers(Path(args.data)))
    for batch in documents.values():  # the two ways read the same values
        assert all(jsonio.read(d)[0] == jsonio.loads(d) == json.loads(d) for d in batch)
    rows = measure(documents)
    command = f"python -m benchmarks.jsonio_bench --data {args.data}"
    report = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "orjson": metadata.version("orjson"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jsonio.json").write_text(json.dumps(report, indent=2) + "\n")
    table = "\n".join(
        f"| {r['document']} | {r['operation']} | {r['documents']} | {r['reader']} | {r['json_us']} | {r['jsonio_us']} "
        f"| {r['ratio']} |"
        for r in rows
    )
    (args.out / "jsonio.md").write_text(
        "# JSON on the request path\n\n"
        f"`{command}` on {report['machine']}; orjson {report['orjson']}. Median µs per document over {ROUNDS} "
        "rounds, json and jsonio alternating in one process. A round trip decodes and encodes again (compact, "
        "UTF-8), as the gateway does with an answer it marked; jsonio's time includes its check for integers "
        "beyond 64 bits.\n\n"
        "| document | operation | documents | jsonio reads with | json µs | jsonio µs | json / jsonio |\n"
        "|---|---|---|---|---|---|---|\n" + table + "\n"
    )
    print((args.out / "jsonio.md").read_text())


if __name__ == "__main__":
    main()
