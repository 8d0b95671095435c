"""Canaries on real model outputs: false attribution on unmarked text, power against the number of canaries
a suspect reproduces, and a blind sample of canaried answers for review.

- False attribution: every unmarked answer in the data (twelve models' AlpacaEval outputs), tested against
  `--identities` identities' canaries under `--keys` random keys; any attribution at p < 0.01 is one.
- Power: a suspect corpus of 200 unmarked answers plus k of one identity's canaries (k = 1 to 4, each on
  its own answer), attributed among the same identities: the Holm-adjusted p-value, per key.
- Samples: answers as a watched identity receives them (watermarked, canary at the end), blind: which
  line is the canary is not marked.

    python -m benchmarks.canary_bench --data ../shared/data/alpaca_eval [--identities 1000] [--keys 20]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import secrets
import statistics
from pathlib import Path

from gateway.canary import CanaryTransform, attribute, canaries_of
from gateway.exchange import Exchange, Identity
from gateway.watermark import LexicalWatermark, default_sets
from gateway.watermark.scheme import epoch_key

ROOT = Path(__file__).resolve().parent.parent


def outputs(data: Path) -> list[dict]:
    rows = []
    for path in sorted(data.glob("*.jsonl.gz")) if data.is_dir() else [data]:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            rows += [json.loads(line) for line in f]
    return rows


def owners_for(key: bytes, identities: int) -> dict:
    return {(f"user{i}", 0): canaries_of(key, f"user{i}", 0, 8) for i in range(identities)}


def samples(rows: list[dict], count: int = 8) -> list[str]:
    key = secrets.token_bytes(32)
    mark = LexicalWatermark(epoch_key(key, 0, default_sets()))
    stage = CanaryTransform(mark, key, 0, 8, {"suspect": 1.0}, frozenset(), frozenset())
    out = []
    for row in random.Random(7).sample(rows, count):
        exchange = Exchange(f"req_{len(out)}", "POST", "/v1/chat/completions", "openai", "/v1/chat/completions", "x")
        exchange.identity, exchange.prompt_text = Identity("reviewer", "suspect"), row["instruction"]
        out.append(f"**{row['instruction']}**\n\n{stage.rewriter(exchange, ('choice', 0)).whole(row['output'])}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "alpaca_eval_sample.jsonl"))
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    rows = outputs(Path(args.data))
    texts = [r["output"] for r in rows]
    rng = random.Random(1)
    false, phrases, power = 0, 0, {k: [] for k in range(1, 5)}
    for _ in range(args.keys):
        owners = owners_for(secrets.token_bytes(32), args.identities)
        results, found = attribute(texts, owners)
        false += sum(r.p_value < 0.01 for r in results)
        phrases += found
        target = owners[(f"user{rng.randrange(args.identities)}", 0)]
        base = rng.sample(texts, min(200, len(texts)))
        for k in power:
            corpus = base + [f"{t}\n\n{c.text}" for t, c in zip(rng.sample(texts, k), target, strict=False)]
            ranked, _ = attribute(corpus, owners)
            named = ranked[0] if ranked and ranked[0].identity == target[0].identity else None
            power[k].append(named.p_value if named else 1.0)
    doc = {
        "command": f"python -m benchmarks.canary_bench --data {args.data} --identities {args.identities} "
        f"--keys {args.keys}",
        "answers": len(texts),
        "false_attributions": false,
        "phrases_found_in_unmarked": phrases,
        "power": {k: {"median_p": statistics.median(v), "max_p": max(v)} for k, v in power.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "canaries.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# Canaries on real model outputs",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"False attribution: {len(texts)} unmarked answers tested against {args.identities} identities' canaries "
        f"under {args.keys} random keys: {phrases} canary-space phrases found, {false} attributions at p < 0.01.",
        "",
        f"Power: a corpus of 200 unmarked answers plus k of one identity's canaries, among {args.identities} "
        "identities (Holm-adjusted p-value of the right identity; 1 when another came first):",
        "",
        "| canaries reproduced | median p | largest p |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['median_p']:.3g} | {v['max_p']:.3g} |" for k, v in doc["power"].items()),
    ]
    (out / "canaries.md").write_text("\n".join(lines) + "\n")
    blind = ["# Canaried answers, blind sample", "", "As a watched identity receives them: watermarked, each"
             " carries one canary line, not marked, unless its question is about grief or harm (review: is"
             " anything odd, false or harmful?).", ""]  # fmt: skip
    for sample in samples(rows):
        blind += ["---", "", sample, ""]
    (out / "canary-samples.md").write_text("\n".join(blind) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
