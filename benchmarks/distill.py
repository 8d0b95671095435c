"""Distillation benchmark: students trained on answers served through the gateway, then probed and tested.

1. Collect. Real answers (AlpacaEval outputs of `--models` models) are served by a fake upstream that
   returns, for each instruction and model, that model's real answer. A campaign of `--accounts` accounts
   (in the suspect tier, so their answers carry canaries) asks every instruction through a real
   `canarygate serve` with every mark on, as an extraction campaign would; `--decoys` other identities
   are registered too, so that attribution is tested among all of them.
2. Train. For each mix (the share of training answers that passed through the gateway; the rest are the
   same answers unmarked) and each seed, a student (benchmarks/students.py) is trained from scratch on
   the CPU for `--train-seconds`. The control (mix 0) is trained on the same answers, all unmarked.
3. Probe. Each student is served behind an OpenAI-compatible endpoint and questioned with the real
   `canarygate probe` (built-in prose prompts, the contexts canaries were served in, and each canary's
   exposure against `--candidates` phrases of the same space); fresh canaries (a decoy's, never served)
   are scored the same way for comparison.
4. Test. `canarygate detect` and `canaries attribute` on each transcript; the watermark test under
   `--wrong-keys` random keys (their p-values should be uniform for every student); the p-value against
   the amount of probe text; `canarygate report` for each student, and a headless Chromium screenshot of
   the first.

Every stage keeps its output in `--work` and is skipped when it is there, so an interrupted run resumes.

    pip install torch      # the CPU build; only this benchmark needs it
    python -m benchmarks.distill --data ../shared/data/alpaca_eval --work /tmp/distill \\
        [--models 6] [--train-seconds 240] [--seeds 3] [--mixes 1,0.1,0.01,0]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from gateway import demo
from gateway.canary import canaries_of, canary_key
from gateway.evidence.keys import Keys
from gateway.forensics.exposure import exposure
from gateway.forensics.probe import Limits, Session, Target, read_rows
from gateway.identity import Registry
from gateway.watermark import LexicalKey, default_sets, epoch_keys
from gateway.watermark.scoring import fixed_scheme_p, vote_counts

from .students import Student, server_app, student_name
from .systems import _spawn, _wait_ready, free_port

ROOT = Path(__file__).resolve().parent.parent
CANARYGATE = str(Path(sys.executable).parent / "canarygate")
FRESH = 8  # canaries never served, scored for exposure beside the served ones


class Thread:
    """An ASGI app on a free loopback port, served by uvicorn in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def load(data: Path, models: int) -> list[dict]:
    rows = []
    for path in sorted(data.glob("*.jsonl.gz"))[:models]:
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return rows


def real_upstream(rows: list[dict]):
    """Answers each chat request with the real answer of the requested model to the instruction."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    answers = {(r["generator"], r["instruction"]): r["output"] for r in rows}

    async def chat(request):
        body = await request.json()
        text = answers[body["model"], body["messages"][-1]["content"]]
        return JSONResponse(demo.chat_completion(body["model"], [text]))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def gateway_config(work: Path, upstream: str) -> Path:
    folder = work / "gateway"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "canarygate.toml"
    path.write_text(
        f'[state]\ndir = "{folder / "state"}"\n[upstream]\nurl = "{upstream}"\n'
        '[evidence]\norigin = "canarygate.bench/distill"\n[risk]\nmode = "off"\n'
        '[limits.identity]\nrequests = "1000000/minute"\ntokens = ""\nconcurrency = 1000\n'
        "[limits.tiers.suspect]\nscale = 1.0\ntarpit_ms = 0\n"
    )
    return path


def collect(args, rows: list[dict]) -> list[dict]:
    """Every answer as the campaign received it through the gateway (cached in work/corpus.jsonl)."""
    corpus = args.work / "corpus.jsonl"
    if corpus.exists():
        return read_rows(corpus)
    with Thread(real_upstream(rows)) as upstream:
        cfg = gateway_config(args.work, upstream)
        registry = Registry(args.work / "gateway" / "state")
        accounts = {f"campaign-{i}": registry.add(f"campaign-{i}", tier="suspect") for i in range(args.accounts)}
        for i in range(args.decoys):
            registry.add(f"user-{i:04d}")
        port = free_port()
        process, log = _spawn("gateway", [CANARYGATE, "--config", str(cfg), "serve", "--port", str(port)], args.work)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", process, log, "/healthz")
            served = asyncio.run(_campaign(f"http://127.0.0.1:{port}", accounts, rows))
        finally:
            process.terminate()
            process.wait(30)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in served))
    return served


async def _campaign(url: str, accounts: dict[str, str], rows: list[dict]) -> list[dict]:
    names = sorted(accounts)
    semaphore = asyncio.Semaphore(8)

    async def one(client, i, row) -> dict:
        account = names[i % len(names)]
        body = {"model": row["generator"], "messages": [{"role": "user", "content": row["instruction"]}]}
        async with semaphore:
            response = await client.post(url + "/v1/chat/completions", json=body,
                                         headers={"authorization": f"Bearer {accounts[account]}"})  # fmt: skip
        response.raise_for_status()
        marked = response.json()["choices"][0]["message"]["content"]
        return {"account": account, "generator": row["generator"], "instruction": row["instruction"],
                "original": row["output"], "marked": marked}  # fmt: skip

    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(one(client, i, row) for i, row in enumerate(rows))))


def student_names(args) -> list[tuple[str, float, int]]:
    return [(student_name(mix, seed), mix, seed) for mix in args.mixes for seed in range(args.seeds)]


def train(args, corpus: list[dict], name: str, mix: float, seed: int) -> dict:
    folder = args.work / "students" / name
    if (folder / "training.json").exists():
        return json.loads((folder / "training.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    choose = random.Random(f"{name}")
    chosen = [choose.random() < mix for _ in corpus]
    pairs = [
        (r["instruction"], r["marked"] if marked else r["original"]) for r, marked in zip(corpus, chosen, strict=True)
    ]
    print(f"training {name}: {sum(chosen)} of {len(pairs)} answers marked", flush=True)
    student, info = Student.train(pairs, args.train_seconds, seed)
    student.save(folder / "model.pt")
    doc = {"mix": mix, "seed": seed, "marked_answers": sum(chosen), "answers": len(pairs), **vars(info)}
    (folder / "training.json").write_text(json.dumps(doc, indent=1))
    return doc


def probe(args, name: str) -> None:
    folder = args.work / "students" / name
    student = Student.load(folder / "model.pt")
    cfg = args.work / "gateway" / "canarygate.toml"
    with Thread(server_app(student, name)) as url:
        command = [CANARYGATE, "--config", str(cfg), "probe", "--base-url", url + "/v1", "--model", name,
                   "--out", str(folder / "probe"), "--exposure", "--reading", "--candidates", str(args.candidates),
                   "--exposure-canaries", "8", "--canary-contexts", str(args.canary_contexts),
                   "--prose", str(args.prose), "--max-tokens", "300", "--rate", "1000",
                   "--concurrency", "2", "--temperature", str(args.temperature)]  # fmt: skip
        probed = subprocess.run(command, check=False, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if probed.returncode != 0:  # some answers failed; the transcript holds the rest (see errors.jsonl)
            print(f"probe of {name} exited {probed.returncode}: {probed.stderr[-500:]}", file=sys.stderr)
        fresh = folder / "fresh-exposure.jsonl"
        if not fresh.exists():
            rows = asyncio.run(_fresh_exposures(args, url + "/v1", name, folder / "probe"))
            fresh.write_text("".join(json.dumps(r) + "\n" for r in rows))


async def _fresh_exposures(args, url: str, name: str, probe_dir: Path) -> list[dict]:
    """Exposure of canaries never served (a decoy identity's), each in a served canary's context."""
    keys = Keys.load(args.work / "gateway" / "state" / "keys")
    fresh = canaries_of(canary_key(keys.watermark), "user-0000", 0, FRESH)
    served = [i for i in read_rows(probe_dir / "probe-set.jsonl") if i["kind"] == "canary"]
    contexts = list({i["canary"]: i for i in served}.values())
    async with Session(Target(url, name), Limits(rate=1000, timeout=300)) as session:
        return [await exposure(session, {**item, "canary": c.id, "phrase": c.text, "identity": "user-0000"},
                               args.candidates) for item, c in zip(contexts, fresh, strict=False)]  # fmt: skip


def test(args, name: str) -> dict:
    folder = args.work / "students" / name
    cfg = args.work / "gateway" / "canarygate.toml"
    transcript = folder / "probe" / "transcript.jsonl"
    detected = _cli_json(cfg, "detect", str(transcript), "--json")
    attributed = _cli_json(cfg, "canaries", "attribute", str(transcript), "--json")
    rows = read_rows(transcript)
    items = [(r["text"], r["prompt"]) for r in rows]
    sets = default_sets()
    wrong = wrong_keys(items, sets, name, args.wrong_keys)
    key = epoch_keys(Keys.load(args.work / "gateway" / "state" / "keys"))[0]
    by_amount = by_share(items, sets, key, (0.05, 0.1, 0.25, 0.5, 1.0))
    exposures = read_rows(folder / "probe" / "exposure.jsonl")
    fresh = read_rows(folder / "fresh-exposure.jsonl")
    reading = json.loads((folder / "report" / "report.json").read_text()).get("reading")
    return {
        "watermark": next(iter(detected["schemes"].values())),
        "reading": None
        if reading is None
        else {
            **reading["best"],
            "passages": reading["passages"],
            "wrong_keys": reading["wrong_keys"]["share_at"],
        },  # fmt: skip
        "probe_texts": len(rows),
        "probe_words": sum(len(t.split()) for t, _ in items),
        "wrong_keys": wrong,
        "by_amount": by_amount,
        "attributions": attributed["attributions"],
        "phrases_found": attributed["phrases_found"],
        "identities_tested": attributed["identities_tested"],
        "exposure": [{k: r[k] for k in ("canary", "identity", "rank", "p_value", "exposure")} for r in exposures],
        "fresh_exposure": [{k: r[k] for k in ("canary", "rank", "p_value", "exposure")} for r in fresh],
    }


def wrong_keys(items: list[tuple[str, str]], sets, name: str, count: int) -> list[float]:
    """The watermark test's p-values under `count` random keys, drawn from the student's name: uniform if
    the test holds its size."""
    counts, rng = vote_counts(items, sets), random.Random(f"wrong keys {name}")
    return [fixed_scheme_p(counts, LexicalKey(rng.randbytes(32), sets))[0] for _ in range(count)]


def by_share(items: list[tuple[str, str]], sets, key: LexicalKey, shares: tuple[float, ...]) -> list[dict]:
    """The watermark test under `key` on the transcript's first texts, for each share of it."""
    out = []
    for share in shares:
        part = items[: max(1, int(len(items) * share))]
        p, n, hits, _ = fixed_scheme_p(vote_counts(part, sets), key)
        words = sum(len(t.split()) for t, _ in part)
        out.append({"texts": len(part), "words": words, "p_value": p, "votes": n, "hits": hits})
    return out


def report(args, name: str) -> dict:
    """`canarygate report` on the student's probe, and its proofs checked by the shipped verifier with the
    log's public key alone."""
    folder = args.work / "students" / name
    out = folder / "report"
    cfg = args.work / "gateway" / "canarygate.toml"
    if not (out / "report.json").exists():
        command = [CANARYGATE, "--config", str(cfg), "report", "--probe", str(folder / "probe"), "--out", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((out / "report.json").read_text())
    keys = [arg for vkey in doc["public_keys"] for arg in ("--log-key", vkey)]
    checked = subprocess.run([sys.executable, "verify.py", "--proofs", "proofs.json", *keys], cwd=out,
                             capture_output=True, text=True)  # fmt: skip
    return {
        "claims": [{k: c.get(k) for k in ("about", "identity", "level")} for c in doc["claims"]],
        "proofs": len(json.loads((out / "proofs.json").read_text())),
        "proofs_verified": checked.returncode == 0,
        "verifier": (checked.stdout or checked.stderr).strip(),
    }


def screenshot(html: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: the report is not rendered", file=sys.stderr)
        return
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--window-size=1200,2600", f"--screenshot={png}", html.as_uri()]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=True)


def _cli_json(cfg: Path, *args: str) -> dict:
    result = subprocess.run([CANARYGATE, "--config", str(cfg), *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="kept between runs; a re-run resumes")
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--decoys", type=int, default=997)
    parser.add_argument("--train-seconds", type=float, default=240)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mixes", default="1,0.1,0.01,0")
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--canary-contexts", type=int, default=100)
    parser.add_argument("--prose", type=int, default=504, help="built-in prose prompts per probe")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--wrong-keys", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.mixes = [float(m) for m in args.mixes.split(",")]
    args.argv = argv if argv is not None else sys.argv[1:]
    import torch

    torch.set_num_threads(2)
    started = time.time()
    corpus = collect(args, load(args.data, args.models))
    results = {"students": {}}
    for name, mix, seed in student_names(args):
        training = train(args, corpus, name, mix, seed)
        probe(args, name)
        checked = report(args, name)
        results["students"][name] = {"training": training, **test(args, name), "report": checked}
        print(name, json.dumps(results["students"][name]["watermark"]), flush=True)
    results["seconds"] = round(time.time() - started)
    results["candidates"] = args.candidates
    results["corpus"] = {
        "answers": len(corpus),
        "accounts": args.accounts,
        "decoys": args.decoys,
        "models": args.models,
    }
    from .distill_report import write

    write(results, args)
    first = student_names(args)[0][0]
    screenshot(args.work / "students" / first / "report" / "report.html", args.out / "distill-report.png")


if __name__ == "__main__":
    main()
