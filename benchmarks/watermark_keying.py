"""Which keying does a student model trained on marked text carry? The experiment behind the scheme.

    pip install torch==2.13.0      # the CPU build; only this experiment needs it
    python -m benchmarks.watermark_keying --data ../shared/data/alpaca_eval [--models 6] [--train-seconds 240]

The same real answers are marked two ways: a fixed keyed preference (one preferred member per set, what
the gateway ships) and a context-keyed preference (the preferred member depends on the key, the set and
the word before the site). Students are trained from scratch on each marked corpus and on the unmarked
corpus (the control): a word-level bigram model (counts, learns each context's choice exactly where it
saw it) and a small neural language model (a GRU trained by gradient descent on the CPU, which, like a
real student, must generalise across contexts). Each student then writes text from training prompts'
openings; its text is tested for both keys, each with its own exact test: one vote per distinct set for
the fixed scheme, one per distinct (set, previous word) for the context scheme.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

from gateway.watermark.scheme import LexicalKey
from gateway.watermark.scoring import fixed_scheme_p, poisson_binomial_sf, vote_counts
from gateway.watermark.sites import Scanner
from gateway.watermark.wordsets import default_sets

from .students import detokenise, tokens_of

SETS = default_sets()


class ContextKey:
    """The preferred member depends on the set and the word before the site."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def preferred(self, set_index: int, context: str) -> int:
        digest = hmac.new(self.key, f"{set_index}|{context}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") % len(SETS.sets[set_index].members)


def mark(text: str, choose) -> str:
    scanner = Scanner(SETS, frozenset(), choose)
    return scanner.feed(text) + scanner.flush()


def context_scheme_p(texts: list[str], key: ContextKey) -> tuple[float, int, int]:
    counts: dict[tuple[int, str], Counter] = defaultdict(Counter)
    for text in texts:
        scanner = Scanner(SETS, frozenset())
        scanner.feed(text)
        scanner.flush()
        for site in scanner.sites:
            counts[site.set_index, site.context][site.member] += 1
    probabilities, hits = [], 0
    for (set_index, context), members in counts.items():
        ranked = members.most_common(2)
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            continue
        probabilities.append(1 / len(SETS.sets[set_index].members))
        hits += ranked[0][0] == key.preferred(set_index, context)
    return poisson_binomial_sf(hits, probabilities), len(probabilities), hits


class Bigram:
    def __init__(self, corpus: list[list[str]]) -> None:
        self.next: dict[str, Counter] = defaultdict(Counter)
        for tokens in corpus:
            for a, b in zip(["<s>", *tokens], [*tokens, "</s>"], strict=True):
                self.next[a][b] += 1

    def sample(self, opening: list[str], length: int, rng: random.Random) -> list[str]:
        out = list(opening)
        while len(out) < length:
            options = self.next.get(out[-1] if out else "<s>")
            if not options:
                break
            token = rng.choices(list(options), weights=list(options.values()))[0]
            if token == "</s>":
                break
            out.append(token)
        return out


def train_gru(corpus: list[list[str]], seconds: float, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    counts = Counter(t for tokens in corpus for t in tokens)
    vocab = ["<unk>", "</s>", *[t for t, _ in counts.most_common(7998)]]
    index = {t: i for i, t in enumerate(vocab)}
    stream = torch.tensor([index.get(t, 0) for tokens in corpus for t in [*tokens, "</s>"]])

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(vocab), 128)
            self.rnn = nn.GRU(128, 256, batch_first=True)
            self.out = nn.Linear(256, len(vocab))

        def forward(self, x, h=None):
            y, h = self.rnn(self.embed(x), h)
            return self.out(y), h

    model = Student()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    started, steps, seq, batch = time.monotonic(), 0, 64, 64
    while time.monotonic() - started < seconds:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,))
        x = torch.stack([stream[s : s + seq] for s in starts])
        y = torch.stack([stream[s + 1 : s + seq + 1] for s in starts])
        logits, _ = model(x)
        loss = loss_fn(logits.reshape(-1, len(vocab)), y.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1

    def sample(opening: list[str], length: int, rng: random.Random) -> list[str]:
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        with torch.no_grad():
            ids = [index.get(t, 0) for t in opening] or [1]
            logits, h = model(torch.tensor([ids]))
            out = list(opening)
            for _ in range(length - len(out)):
                probs = torch.softmax(logits[0, -1], dim=-1)
                probs[0] = 0  # never write <unk>
                token = int(torch.multinomial(probs, 1, generator=generator))
                if token == 1:
                    break
                out.append(vocab[token])
                logits, h = model(torch.tensor([[token]]), h)
        return out

    return sample, {"steps": steps, "final_loss": float(loss.detach()), "vocabulary": len(vocab)}


def _answers(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["output"] for line in f]


def run(args) -> dict:
    rng = random.Random(args.seed)
    files = sorted(Path(args.data).glob("*.jsonl.gz"))[: args.models]
    answers = [answer for path in files for answer in _answers(path)]
    fixed = LexicalKey(rng.randbytes(32), SETS)
    context = ContextKey(rng.randbytes(32))
    corpora = {
        "control (unmarked)": answers,
        "fixed keyed preference": [mark(a, lambda s: fixed.preferred[s.set_index]) for a in answers],
        "context-keyed preference": [mark(a, lambda s: context.preferred(s.set_index, s.context)) for a in answers],
    }
    openings = [tokens_of(a)[:4] for a in rng.sample(answers, args.samples)]
    results = {"answers": len(answers), "models": [p.name for p in files], "students": {}}
    for name, texts in corpora.items():
        corpus = [tokens_of(t) for t in texts]
        students = {"bigram": (Bigram(corpus).sample, {})}
        if args.train_seconds > 0:
            students["gru"] = train_gru(corpus, args.train_seconds, args.seed)
        for student, (sample, info) in students.items():
            written = [detokenise(sample(o, args.length, rng)) for o in openings]
            fixed_p = fixed_scheme_p(vote_counts([(t, "") for t in written], SETS), fixed)
            context_p = context_scheme_p(written, context)
            words = sum(len(t.split()) for t in written)
            results["students"][f"{student} / {name}"] = {
                **info,
                "words_written": words,
                "fixed_key": {"p_value": fixed_p[0], "votes": fixed_p[1], "hits": fixed_p[2]},
                "context_key": {"p_value": context_p[0], "votes": context_p[1], "hits": context_p[2]},
            }
            print(name, student, results["students"][f"{student} / {name}"], flush=True)
    return results


def write(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["command"] = "python -m benchmarks.watermark_keying " + " ".join(args.argv)
    (out / "watermark-keying.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Keying experiment: what a student trained on marked text carries",
        "",
        f"`{results['command']}`: {results['answers']} answers of {len(results['models'])} models "
        "(AlpacaEval outputs). Each student wrote text from the first four words of "
        f"{args.samples} training answers; each key's exact test on that text.",
        "",
        "| student / training corpus | words written | fixed key: p (hits/votes) | context key: p (hits/votes) |",
        "|---|---|---|---|",
    ]
    for name, r in results["students"].items():
        f, c = r["fixed_key"], r["context_key"]
        lines.append(
            f"| {name} | {r['words_written']} | {f['p_value']:.3g} ({f['hits']}/{f['votes']}) | "
            f"{c['p_value']:.3g} ({c['hits']}/{c['votes']}) |"
        )
    (out / "watermark-keying.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--train-seconds", type=float, default=240, help="per neural student; 0: bigram only")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--length", type=int, default=400, help="tokens per written text")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    write(run(args), args, args.out)


if __name__ == "__main__":
    main()
