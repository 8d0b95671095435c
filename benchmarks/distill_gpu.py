"""Distillation with students larger, or trained longer, than distill.py's: does the mark reach them at 10%?

The distillation benchmark (benchmarks/distill.py) trains 2.7M-parameter students for 200 s on the CPU, about
two passes over the answers: enough for the mark at full dose, not at 10%. Whether that is the students' size
and training or the mark is what this asks: students of 9M parameters (`--network large`, for a GPU) or of
the same size (`small`), trained for `--epochs` passes with a one-cycle schedule. Training and sampling need
torch alone and run where it is fast; the test runs here, with the gateway's key.

1. prepare (here): the answers served through a gateway by distill.py's collect stage (kept in its --work
   folder, and reused from there), and the probe's built-in prose prompts, into one folder to carry;
2. train: per student (mix:seed), the same marked and unmarked answers as distill.py's student of that
   name, less HELD_OUT answers whose loss is reported beside the training loss, a GRU word model trained from
   scratch, then its answers to every prose prompt (`--samples` each), sampled in one batch, written as a
   transcript ({"prompt", "text"} lines) with training.json;
3. report (here): `canarygate detect` on each transcript with the gateway's key, the test under 200 random
   keys (their p-values should be uniform), and the p-value against the amount of text.

    python -m benchmarks.distill_gpu prepare --data ../shared/data/alpaca_eval --work /tmp/distill --to gpu-input
    python3 -m benchmarks.distill_gpu train --input gpu-input --out DIR [--students 1:0,0.1:0,0:0] [--epochs 20]
        [--network large|small] [--batch 128] [--window 128] [--lr 2e-3]
    python -m benchmarks.distill_gpu report --work /tmp/distill --transcripts DIR [DIR ...] [--out results/NAME]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from .students import ANSWER, _network, detokenise, sequence_of, student_name, tokens_of, vocabulary_of

ROOT = Path(__file__).resolve().parent.parent
# (embedding, hidden) sizes: 9M parameters at a vocabulary of 10,000, or the CPU students' 2.7M
NETWORKS = {"large": (256, 1024), "small": (128, 384)}
HELD_OUT = 240  # answers kept out of training, whose loss says how far the student generalises


def prepare(args) -> None:
    from gateway.forensics.probeset import prose_prompts

    from .distill import collect, load

    args.to.mkdir(parents=True, exist_ok=True)
    corpus = collect(args, load(args.data, args.models))  # distill.py's first stage, kept in --work
    rows = [{k: r[k] for k in ("instruction", "original", "marked")} for r in corpus]
    (args.to / "corpus.json").write_text(json.dumps(rows))
    (args.to / "prompts.json").write_text(json.dumps(prose_prompts(args.prose)))


def train_all(args) -> None:
    import torch

    corpus = json.loads((args.input / "corpus.json").read_text())
    prompts = json.loads((args.input / "prompts.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    started, summary = time.monotonic(), {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for spec in args.students.split(","):
        mix, seed = float(spec.split(":")[0]), int(spec.split(":")[1])
        name = student_name(mix, seed)
        if time.monotonic() - started > args.budget:
            print(f"budget spent: {name} and after not trained", flush=True)
            break
        choose = random.Random(name)  # as distill.train chooses
        chosen = [choose.random() < mix for _ in corpus]
        order = list(range(len(corpus)))
        random.Random(seed).shuffle(order)
        held, kept = order[:HELD_OUT], order[HELD_OUT:]  # how far the student is from memorising its answers
        pairs = [(r["instruction"], r["marked" if m else "original"]) for r, m in zip(corpus, chosen, strict=True)]
        trained, unseen = [pairs[i] for i in kept], [pairs[i] for i in held]
        recipe = {"batch": args.batch, "window": args.window, "lr": args.lr}
        model, vocab, info = train(trained, unseen, args.epochs, seed, device, NETWORKS[args.network], **recipe)
        asked, clock = [p for p in prompts for _ in range(args.samples)], time.monotonic()
        answers = generate(model, vocab, asked, 300, args.temperature, seed, device)
        info |= {"mix": mix, "seed": seed, "marked_answers": sum(chosen[i] for i in kept), "answers": len(kept)}
        info["sampling_seconds"] = round(time.monotonic() - clock, 1)
        rows = [{"prompt": p, "text": a} for p, a in zip(asked, answers, strict=True)]
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary[name] = info
        (args.out / "training.json").write_text(json.dumps(summary, indent=1))
        print(name, json.dumps(info), flush=True)


def train(pairs: list[tuple[str, str]], held_out: list[tuple[str, str]], epochs: float, seed: int, device: str,
          sizes: tuple[int, int], batch: int, window: int, lr: float):  # fmt: skip
    """A student trained from scratch for `epochs` passes (in random windows) over the pairs' tokens, in the
    order of the list; its loss on `held_out`, which it never sees (its vocabulary included), is reported."""
    import torch

    torch.manual_seed(seed)
    sequences = list(map(sequence_of, pairs))
    vocab = vocabulary_of(sequences, 10000)  # as the CPU students'
    index = {t: i for i, t in enumerate(vocab)}
    stream = torch.tensor([index.get(t, 0) for s in sequences for t in s], device=device)
    unseen = torch.tensor([index.get(t, 0) for pair in held_out for t in sequence_of(pair)], device=device)
    model = _network(len(vocab), *sizes).to(device)
    steps = max(1, int(epochs * len(stream) / (batch * window)))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.arange(window + 1, device=device)
    started, losses = time.monotonic(), []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - window - 1, (batch,), generator=generator, device=device)
        chunk = stream[starts[:, None] + offsets]
        hidden, _ = model.hidden(chunk[:, :-1])
        loss = model.out(hidden.flatten(0, 1), chunk[:, 1:].reshape(-1)).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.detach())
    final = float(torch.stack(losses[-50:]).mean())
    info = {"parameters": sum(p.numel() for p in model.parameters()), "tokens": len(stream), "epochs": epochs,
            "batch": batch, "window": window, "lr": lr,
            "steps": steps, "train_seconds": round(time.monotonic() - started, 1),
            "final_loss": round(final, 3),
            "held_out_loss": round(_loss(model.eval(), unseen, window), 3)}  # fmt: skip
    return model, vocab, info


def _loss(model, stream, window: int) -> float:
    """Mean loss per token over `stream`, read in consecutive windows."""
    import torch

    usable = (len(stream) - 1) // window * window
    x, y = stream[:usable].reshape(-1, window), stream[1 : usable + 1].reshape(-1, window)
    with torch.no_grad():
        hidden, _ = model.hidden(x)
        return float(model.out(hidden.flatten(0, 1), y.reshape(-1)).loss)


def generate(model, vocab: list[str], prompts: list[str], max_tokens: int, temperature: float, seed: int, device: str):
    """Each prompt's answer, sampled for all prompts at once (each prompt's context is read alone)."""
    import torch

    index = {t: i for i, t in enumerate(vocab)}
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        lasts, states = [], []
        for prompt in prompts:
            ids = [index.get(t, 0) for t in tokens_of(prompt)[-400:]] + [index[ANSWER]]
            logprobs, state = model(torch.tensor([ids], device=device))
            lasts.append(logprobs[0, -1])
            states.append(state)
        last, state = torch.stack(lasts), torch.cat(states, 1)
        written = torch.zeros((len(prompts), max_tokens), dtype=torch.long, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_tokens):
            tempered = last / max(temperature, 1e-4)
            tempered[:, 0] = tempered[:, 2] = float("-inf")  # never write <unk> or <answer>
            token = torch.multinomial(torch.softmax(tempered, -1), 1, generator=generator)[:, 0]
            token = torch.where(done, torch.ones_like(token), token)
            written[:, step] = token
            done |= token == 1
            if bool(done.all()):
                break
            logprobs, state = model(token[:, None], state)
            last = logprobs[:, -1]
    answers = []
    for row in written.tolist():
        words = row[: row.index(1)] if 1 in row else row
        answers.append(detokenise([vocab[t] for t in words]))
    return answers


def report(args) -> None:
    from gateway.evidence.keys import Keys
    from gateway.watermark import default_sets, epoch_keys

    cfg = args.work / "gateway" / "canarygate.toml"
    key = epoch_keys(Keys.load(args.work / "gateway" / "state" / "keys"))[0]
    sets, devices, students = default_sets(), set(), {}
    for folder in args.transcripts:  # a student's row is named by its folder too when there are several
        training = json.loads((folder / "training.json").read_text())
        devices.add(training.pop("device"))
        for name, info in training.items():
            row = name if len(args.transcripts) == 1 else f"{name} ({folder.name})"
            tested = test_student(cfg, key, sets, folder / f"{name}.jsonl", args.wrong_keys)
            students[row] = {"training": info, **tested}
    command = "python -m benchmarks.distill_gpu " + " ".join(sys.argv[1:])
    write({"command": command, "device": ", ".join(sorted(devices)), "students": students}, args.out)


def test_student(cfg: Path, key, sets, transcript: Path, count: int) -> dict:
    """`canarygate detect` on the transcript; the same test under random keys; p against the amount of text."""
    from .distill import _cli_json, by_share, wrong_keys

    detected = next(iter(_cli_json(cfg, "detect", str(transcript), "--json")["schemes"].values()))
    items = [(r["text"], r["prompt"]) for r in map(json.loads, transcript.read_text().splitlines())]
    wrong = wrong_keys(items, sets, transcript.stem, count)
    amounts = by_share(items, sets, key, (0.1, 0.25, 0.5, 1.0))
    return {
        "watermark": detected,
        "by_amount": amounts,
        "words": amounts[-1]["words"],
        "wrong_keys_at": {alpha: sum(p <= alpha for p in wrong) / len(wrong) for alpha in (0.05, 0.01)},
    }


def write(results: dict, out: Path) -> None:
    """`out`.json and `out`.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    head = ["student", "marked answers", "parameters", "epochs, windows x tokens, peak lr (s)", "loss, held-out loss",
            "probe words", "watermark p (hits/votes)", "wrong keys: share at 0.05, 0.01"]  # fmt: skip
    title = "# Distillation: students larger or trained longer than distill.py's"
    lines = [title, "", f"`{results['command']}`; students trained on {results['device']}.",
             "", _row(head), _row(["---"] * len(head))]  # fmt: skip
    for name, r in results["students"].items():
        t, w, wrong = r["training"], r["watermark"], r["wrong_keys_at"]
        lines.append(_row([name, f"{t['marked_answers']} / {t['answers']}", f"{t['parameters']:,}",
                           f"{t['epochs']:g}, {t['batch']} x {t['window']}, {t['lr']:g} ({t['train_seconds']})",
                           f"{t['final_loss']}, {t['held_out_loss']}", f"{r['words']:,}",
                           f"{w['p_value']:.3g} ({w['hits']}/{w['n']})",
                           f"{wrong[0.05]:.3f}, {wrong[0.01]:.3f}"]))  # fmt: skip
    amounts = next(iter(results["students"].values()))["by_amount"]
    lines += ["", "p-value against the amount of probe text (the transcript's first answers):", "",
              _row(["student", *(f"{a['texts']} texts" for a in amounts)]),
              _row(["---"] * (len(amounts) + 1))]  # fmt: skip
    for name, r in results["students"].items():
        lines.append(_row([name, *(f"{a['p_value']:.2g} ({a['words']:,} words)" for a in r["by_amount"])]))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _row(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("prepare")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="distill.py's --work (its collect stage is reused)")
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--accounts", type=int, default=3)
    p.add_argument("--decoys", type=int, default=997)
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--prose", type=int, default=504)
    t = verbs.add_parser("train")
    t.add_argument("--input", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--students", default="1:0,0.1:0,0.1:1,0.01:0,0:0,0:1", help="mix:seed, comma-separated")
    t.add_argument("--epochs", type=float, default=20)
    t.add_argument("--network", choices=sorted(NETWORKS), default="large", help="small: the CPU students' size")
    t.add_argument("--batch", type=int, default=128, help="windows per step (the CPU students: 64)")
    t.add_argument("--window", type=int, default=128, help="tokens per window (the CPU students: 64)")
    t.add_argument(
        "--lr", type=float, default=2e-3, help="the one-cycle schedule's peak (the CPU students: 3e-3, flat)"
    )
    t.add_argument("--samples", type=int, default=2, help="answers per prose prompt")
    t.add_argument("--temperature", type=float, default=0.7)
    t.add_argument("--budget", type=float, default=420, help="seconds after which no further student is started")
    r = verbs.add_parser("report")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--transcripts", type=Path, nargs="+", required=True, help="train's --out folders")
    r.add_argument("--wrong-keys", type=int, default=200)
    r.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill-gpu", help="writes OUT.md, OUT.json"
    )
    args = parser.parse_args()
    {"prepare": prepare, "train": train_all, "report": report}[args.verb](args)


if __name__ == "__main__":
    main()
