"""`canarygate probe` and `canarygate report`: question a suspect model, then say what the answers show."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

from .. import canary, config, evidence
from ..evidence import keys, verifier
from ..evidence.reader import VerifyError


def add_commands(commands, settings_of, readers_of) -> None:
    """`settings_of(args)` loads the settings, `readers_of(args)` opens every evidence log (main's helpers)."""
    probe = commands.add_parser("probe", help="ask a suspect OpenAI-compatible endpoint the probe set; resumable")
    probe.add_argument("--base-url", required=True, help="the suspect's API base, e.g. https://host/v1")
    probe.add_argument("--model", required=True)
    probe.add_argument("--api-key-env", help="the environment variable that holds the suspect's API key")
    probe.add_argument("--out", required=True, help="the probe's folder; run again with the same --out to resume")
    probe.add_argument("--prose", type=int, default=10_000, help="built-in prose prompts to ask (default: all)")
    probe.add_argument("--samples", type=int, default=1, help="answers to ask for per prose prompt")
    probe.add_argument("--prompts", help='more prompts: JSON lines {"prompt": ...}')
    probe.add_argument("--canary-contexts", type=int, default=200, help="served-canary prompts from the log (0: none)")
    probe.add_argument("--exposure", action="store_true", help="also score each canary's exposure (needs logprobs)")
    probe.add_argument("--candidates", type=_enough_candidates, default=10_000,
                       help="reference phrases per canary's exposure (at least 999)")  # fmt: skip
    probe.add_argument("--exposure-canaries", type=int, default=64, help="distinct canaries to score, at most")
    probe.add_argument("--reading", action="store_true", help="also read the suspect's word choices (needs logprobs)")
    probe.add_argument("--concurrency", type=int, default=4)
    probe.add_argument("--rate", type=float, default=4.0, help="requests per second, at most")
    probe.add_argument("--timeout", type=float, default=120.0, help="seconds for one whole answer")
    probe.add_argument("--retries", type=int, default=6)
    probe.add_argument("--max-bytes", type=int, default=2_000_000, help="larger answers are cut off and fail")
    probe.add_argument("--max-tokens", type=int, default=600)
    probe.add_argument("--temperature", type=float, default=0.7)
    probe.add_argument("--keys", help="the keys folder (default: the state folder's)")
    probe.set_defaults(run=lambda args: _probe(args, settings_of, readers_of), log_slot=None)

    report = commands.add_parser("report", help="test a probe's transcript; write report.html and report.json")
    report.add_argument("--probe", required=True, help="the folder canarygate probe wrote")
    report.add_argument("--out", required=True, help="where to write the report")
    report.add_argument("--keys", help="the keys folder (default: the state folder's)")
    report.add_argument("--wrong-keys", type=_positive, default=200, help="random keys to run the watermark test under")
    report.add_argument("--proofs-per-canary", type=_positive, default=3, help="log entries proved per canary found")
    report.set_defaults(run=lambda args: _report(args, settings_of, readers_of), log_slot=None)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {value!r}")
    return int(value)


def _enough_candidates(value: str) -> int:
    """Fewer than MIN_CANDIDATES cannot put a canary in the top 0.1%: every exposure test would come out empty."""
    from .exposure import MIN_CANDIDATES

    if not value.isdigit() or int(value) < MIN_CANDIDATES:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_CANDIDATES} (a canary counts as exposed in the top 0.1% of its candidates, "
            f"which fewer cannot show), not {value!r}"
        )
    return int(value)


def _probe(args, settings_of, readers_of) -> int:
    from .probe import Limits, Target, prepare

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise config.ConfigError(f"--api-key-env {args.api_key_env}: that variable is empty or unset")
    target = Target(args.base_url, args.model, api_key)
    limits = Limits(
        concurrency=args.concurrency,
        rate=args.rate,
        timeout=args.timeout,
        max_bytes=args.max_bytes,
        retries=args.retries,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    out = Path(args.out)
    options = {k: getattr(args, k) for k in ("prose", "samples", "prompts", "canary_contexts", "max_tokens",
                                             "temperature")}  # fmt: skip
    items = prepare(out, target, lambda: _probe_set(args, settings_of, readers_of), options)
    counts = asyncio.run(_run_with_progress(target, limits, items, out))
    print(
        f"{counts['answered']} answered, {counts['failed']} failed (see {out / 'errors.jsonl'}; run again to retry), "
        f"{counts['skipped']} already in {out / 'transcript.jsonl'}"
    )
    if args.exposure:
        print(asyncio.run(_exposures(target, limits, items, out, args.candidates, args.exposure_canaries)))
    if args.reading:
        print(asyncio.run(_readings(target, limits, out)))
    return 0 if counts["failed"] == 0 else 1


def _probe_set(args, settings_of, readers_of) -> list[dict]:
    from .probeset import probe_items

    served = _served(args, settings_of, readers_of) if args.canary_contexts > 0 else []
    if args.canary_contexts > 0:
        print(f"{len(served)} served-canary contexts from the evidence log", file=sys.stderr)
    prompts = Path(args.prompts) if args.prompts else None
    return probe_items(args.prose, args.samples, prompts, served)


def _served(args, settings_of, readers_of) -> list:
    from .served import served_canaries

    settings = settings_of(args)
    try:
        loaded = keys.Keys.load(Path(args.keys) if args.keys else evidence.keys_dir(settings))
        readers = readers_of(args)
    except (keys.KeysError, VerifyError) as e:
        print(f"no served-canary contexts: {e}", file=sys.stderr)
        return []
    key = canary.canary_key(loaded.watermark)
    every = (s for reader in readers for s in served_canaries(reader, key, settings.canaries.count))
    return list(itertools.islice(every, args.canary_contexts))


def _report(args, settings_of, readers_of) -> int:
    need_extra("matplotlib")
    from ..identity import Registry
    from . import html, report

    settings = settings_of(args)
    loaded = keys.Keys.load(Path(args.keys) if args.keys else evidence.keys_dir(settings))
    names = sorted({record.name for record in Registry(settings.state_dir).all()})
    doc = report.build(Path(args.probe), loaded, readers_of(args), names, settings.canaries.count,
                       args.wrong_keys, args.proofs_per_canary)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "report.html").write_text(html.render(doc))
    served = [a["served"] for a in doc["canaries"]["attributions"] + doc["exposure"]["identities"]]
    if any(c["about"] in ("watermark", "reading mode") and c["level"] != "none" for c in doc["claims"]):
        served.append([c for c in doc["watermark"]["commitments"].values() if c is not None])  # when keys were fixed
    # each entry once, whichever claims rest on it: a checkpoint names its log, the index the entry in it
    proofs = list({(s["proof"]["checkpoint"], s["proof"]["leaf_index"]): s["proof"] for entries in served
                   for s in entries if s["proof"]}.values())  # fmt: skip
    (out / "proofs.json").write_text(json.dumps(proofs, indent=1) + "\n")
    shutil.copyfile(Path(verifier.__file__), out / "verify.py")
    for claim in doc["claims"]:
        print(f"[{claim['level']}] {claim['text']}")
    print(f"report: {out / 'report.html'} ({len(proofs)} inclusion proofs in {out / 'proofs.json'})")
    return 0


def need_extra(module: str) -> None:
    """The probe and the report use packages of the `forensics` extra, which the gateway itself does not need."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise config.ConfigError(f"this command needs {module}: pip install 'canarygate[forensics]'")


async def _run_with_progress(target, limits, items, out) -> dict:
    need_extra("rich")
    from rich.console import Console
    from rich.progress import Progress

    from .probe import TRANSCRIPT, read_rows, run

    done = len({row["id"] for row in read_rows(out / TRANSCRIPT)} & {item["id"] for item in items})
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("probing", total=len(items), completed=done)
        return await run(target, limits, items, out, lambda: progress.advance(task))


async def _exposures(target, limits, items, out, count, most) -> str:
    from .exposure import exposure
    from .probe import Transcript

    wanted: dict[str, dict] = {}  # each canary once, in the first context it was served in
    for item in items:
        if item["kind"] == "canary" and (item["canary"] in wanted or len(wanted) < most):
            wanted.setdefault(item["canary"], item)
    results = Transcript(out / "exposure.jsonl")
    stopped = await _score_each(
        target, limits, list(wanted.items()), results, lambda session, item: exposure(session, item, count)
    )
    return f"exposure: {stopped}" if stopped else f"exposure of {len(wanted)} canaries in {results.path}"


async def _readings(target, limits, out) -> str:
    from ..watermark import default_sets
    from .probe import TRANSCRIPT, Transcript, read_rows, write_rows
    from .reading import passages, read

    saved = out / "reading-set.jsonl"
    if not saved.exists():  # fixed by the first run, so that a resumed one reads the same passages
        texts = [row["text"] for row in read_rows(out / TRANSCRIPT)]
        write_rows(saved, passages(default_sets(), texts))
    results = Transcript(out / "reading.jsonl")
    jobs = [(passage["id"], passage) for passage in read_rows(saved)]
    stopped = await _score_each(target, limits, jobs, results, read)
    return f"word choices: {stopped}" if stopped else f"word choices read at {len(jobs)} passages into {results.path}"


async def _score_each(target, limits, jobs: list[tuple[str, dict]], results, score) -> str | None:
    """Score each (id, item) that `results` (a Transcript) lacks, appending each as it is scored; None when
    all are done, else why it stopped (a re-run resumes)."""
    from .probe import Failed, Session

    async with Session(target, limits) as session:
        for key, item in jobs:
            if key in results.done:
                continue
            try:
                results.append(await score(session, item))
            except Failed as e:
                if e.final:
                    return f"the endpoint refused to score text ({e}); does it return logprobs?"
                return f"stopped ({e}); run again to resume"
    return None
