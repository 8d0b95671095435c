"""The lexical watermark, measured on real model outputs: calibration, power, robustness, quality, cost.

    python -m benchmarks.watermark_bench --data ../shared/data/alpaca_eval [--keys 100] [--out benchmarks/results]

- Calibration: for each of --keys random (vetted) keys, the p-value of every unmarked response and of each
  model's whole corpus; the share at or below alpha is compared with alpha's 99% binomial interval. The
  reported p-values are exact but discrete (few votes per response), hence conservative; randomised
  p-values (the same test, ties in the statistic broken by a uniform draw) are exactly uniform under the
  null and show the test's size itself.
- Power: every response marked by the gateway, then tested alone: p-value against length; and the words
  of marked text (a model's responses, concatenated in order) needed to reach p < 1e-6.
- Robustness: each model's marked corpus after 10% word deletion, 10% insertion, re-randomising 20% of the
  set choices, sentence shuffling, truncation to the first half, and canonicalisation.
- Quality: the share of words the mark changed; blind side-by-side samples.
- Cost: microseconds per whole 1.5 KB answer and per streamed event, through the gateway's rewriters.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from scipy import stats

from gateway import demo, jsonio
from gateway.exchange import Exchange
from gateway.protocols import ROUTES
from gateway.rewrite import StreamRewrite, rewrite_body
from gateway.watermark.mark import LexicalWatermark
from gateway.watermark.scheme import LexicalKey, epoch_key
from gateway.watermark.scoring import fixed_scheme_p, poisson_binomial_pmf, vote_counts, votes
from gateway.watermark.sites import Scanner
from gateway.watermark.wordsets import default_sets

from .harness import cpu_model

console = Console(stderr=True)
SETS = default_sets()
ALPHAS = (0.05, 0.01, 0.001)
WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def load(data: Path) -> dict[str, list[dict]]:
    corpora = {}
    for path in sorted(data.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            corpora[path.name.removesuffix(".jsonl.gz")] = [json.loads(line) for line in f]
    return corpora


def words(text: str) -> int:
    return len(WORD.findall(text))


def _vote_table(items: list[tuple[str, str]]) -> tuple[list[int], list[int], list[float]]:
    """The votes cast: their sets, their members, and each set's chance of a hit under the null."""
    cast = votes(vote_counts(items, SETS))
    return [s for s, _ in cast], [m for _, m in cast], [1 / len(SETS.sets[s].members) for s, _ in cast]


def calibration(corpora, n_keys: int, rng: random.Random, progress) -> dict:
    """Per-response and per-corpus p-values of unmarked text, under many keys."""
    task = progress.add_task("calibration: scanning", total=sum(len(v) for v in corpora.values()))
    responses, corpus_tables = [], []
    for rows in corpora.values():
        items = [(r["output"], r["instruction"]) for r in rows]
        for item in items:
            sets_, members, probs = _vote_table([item])
            responses.append((np.array(sets_, dtype=int), np.array(members), _tails(probs)))
            progress.advance(task)
        sets_, members, probs = _vote_table(items)
        corpus_tables.append((np.array(sets_, dtype=int), np.array(members), _tails(probs)))
    keys = [epoch_key(rng.randbytes(32), 0, SETS) for _ in range(n_keys)]
    task = progress.add_task("calibration: keys", total=n_keys)
    single, single_rand, corpus, corpus_rand = [], [], [], []
    for key in keys:
        preferred = np.array(key.preferred)
        for table, out, out_rand in ((responses, single, single_rand), (corpus_tables, corpus, corpus_rand)):
            for sets_, members, (sf, pmf) in table:
                hits = int((preferred[sets_] == members).sum()) if len(sets_) else 0
                out.append(sf[hits])
                out_rand.append(sf[hits] - rng.random() * pmf[hits])  # P(X > x) + U P(X = x)
        progress.advance(task)
    return {
        "keys": n_keys,
        "single": _shares(single),
        "single_randomised": _shares(single_rand),
        "corpus": _shares(corpus),
        "corpus_randomised": _shares(corpus_rand),
        "each_corpus": _each_corpus(corpus, corpus_rand, len(corpus_tables)),
        "votes_per_response_median": statistics.median(len(t[0]) for t in responses),
    }


def _each_corpus(exact: list[float], randomised: list[float], corpora: int) -> dict:
    """Each corpus alone, over the keys: its p-values are independent draws (one per key), where the pooled ones
    are not (under one key, the twelve models' shared habits move their p-values together, so the pooled count
    varies more than a binomial interval of n = keys x corpora allows)."""
    out = {}
    for alpha in ALPHAS:
        rows = [(_shares(exact[i::corpora])[str(alpha)], _shares(randomised[i::corpora])[str(alpha)])
                for i in range(corpora)]  # fmt: skip
        out[str(alpha)] = {
            "corpora": corpora,
            "randomised_within": sum(r["within"] for _, r in rows),
            "exact_not_above": sum(e["at_most_upper"] for e, _ in rows),
            "randomised_counts": [r["count"] for _, r in rows],
            "interval": rows[0][1]["interval"],
        }
    return out


def _tails(probabilities: list[float]) -> tuple[np.ndarray, np.ndarray]:
    pmf = poisson_binomial_pmf(probabilities)
    sf = np.minimum(1.0, pmf[::-1].cumsum()[::-1])  # sf[k] = P(X >= k), summed term by term
    return sf, pmf


def _shares(p_values: list[float]) -> dict:
    n = len(p_values)
    values = np.array(p_values)
    out = {"n": n}
    for alpha in ALPHAS:
        count = int((values <= alpha).sum())
        low, high = stats.binom.ppf(0.005, n, alpha), stats.binom.ppf(0.995, n, alpha)
        out[str(alpha)] = {
            "share": count / n,
            "count": count,
            "interval": [int(low), int(high)],
            "within": bool(low <= count <= high),
            "at_most_upper": bool(count <= high),
        }
    return out


def power(corpora, key: LexicalKey, progress) -> tuple[dict, dict[str, list[tuple[str, str]]]]:
    mark = LexicalWatermark(key)
    task = progress.add_task("power: marking", total=sum(len(v) for v in corpora.values()))
    marked_corpora, per_response, changed, total_words = {}, [], 0, 0
    for name, rows in corpora.items():
        marked = []
        for r in rows:
            scanner = mark._scanner(r["instruction"])
            text = scanner.feed(r["output"]) + scanner.flush()
            changed += scanner.changed
            total_words += words(r["output"])
            marked.append((text, r["instruction"]))
            p, n, hits, sites = fixed_scheme_p(vote_counts([marked[-1]], SETS), key)
            per_response.append((words(text), p, n))
            progress.advance(task)
        marked_corpora[name] = marked
    buckets = {}
    for low, high in ((0, 100), (100, 200), (200, 300), (300, 500), (500, 10_000)):
        inside = [p for w, p, _ in per_response if low <= w < high]
        if inside:
            buckets[f"{low}-{high}"] = {
                "responses": len(inside),
                "median_p": statistics.median(inside),
                "share_below_1e-6": sum(p < 1e-6 for p in inside) / len(inside),
            }
    needed = []
    for marked in marked_corpora.values():
        for start in range(0, len(marked), 100):  # several sequences per model
            text_words, items = 0, []
            for item in marked[start:]:
                items.append(item)
                text_words += words(item[0])
                if fixed_scheme_p(vote_counts(items, SETS), key)[0] < 1e-6:
                    needed.append(text_words)
                    break
    return {
        "responses": len(per_response),
        "by_length": buckets,
        "words_to_p_below_1e-6": {
            "median": statistics.median(needed),
            "sequences": len(needed),
            "quartiles": statistics.quantiles(needed, n=4),
        },
        "share_of_words_changed": changed / total_words,
    }, marked_corpora


def attacks(rng: random.Random):
    filler = ["the", "and", "of", "very", "also", "this", "that", "with", "more", "some"]

    def delete(text):
        return " ".join(w for w in text.split(" ") if rng.random() > 0.1)

    def insert(text):
        return " ".join(w + (" " + rng.choice(filler) if rng.random() < 0.1 else "") for w in text.split(" "))

    def rerandomise(text):
        return _rechoose(
            text,
            lambda site: rng.randrange(len(SETS.sets[site.set_index].members)) if rng.random() < 0.2 else site.member,
        )

    def shuffle(text):
        sentences = re.split(r"(?<=[.!?])\s+", text)
        rng.shuffle(sentences)
        return " ".join(sentences)

    def truncate(text):
        return text[: len(text) // 2]

    def canonicalise(text):
        return _rechoose(text, lambda site: 0)

    return {
        "none": lambda t: t,
        "delete 10% of words": delete,
        "insert 10% more words": insert,
        "re-randomise 20% of set choices": rerandomise,
        "shuffle sentences": shuffle,
        "truncate to the first half": truncate,
        "canonicalise (every member to the first)": canonicalise,
    }


def _rechoose(text: str, choose) -> str:
    scanner = Scanner(SETS, frozenset(), choose)
    return scanner.feed(text) + scanner.flush()


def robustness(marked_corpora, key: LexicalKey, rng: random.Random, progress) -> dict:
    results = {}
    task = progress.add_task("robustness", total=len(attacks(rng)) * len(marked_corpora))
    for name, attack in attacks(rng).items():
        corpus_p, single_p = [], []
        for marked in marked_corpora.values():
            attacked = [(attack(text), prompt) for text, prompt in marked]
            corpus_p.append(fixed_scheme_p(vote_counts(attacked, SETS), key)[0])
            single_p += [fixed_scheme_p(vote_counts([item], SETS), key)[0] for item in attacked[:200]]
            progress.advance(task)
        results[name] = {
            "corpus_median_p": statistics.median(corpus_p),
            "corpora_below_1e-6": sum(p < 1e-6 for p in corpus_p),
            "corpora": len(corpus_p),
            "single_median_p": statistics.median(single_p),
        }
    return results


def cost(corpora, key: LexicalKey) -> dict:
    """What the gateway pays: a whole answer through the transform (JSON decoded, marked, encoded), the
    marking alone, the JSON decoding and encoding alone (jsonio, as the gateway does it), each three times
    per answer in three orders (medians over all); and a streamed answer's events (one word each, OpenAI
    chunks, cut with the space after each word and before it) through the stream rewriter, per event, and
    through the stream parser with nothing to rewrite (the share that is the mark's own is the difference),
    and how many events leave on their own push."""
    mark = LexicalWatermark(key)
    rows = [r for rows in corpora.values() for r in rows if 1200 <= len(r["output"].encode()) <= 1800]
    rows = rows[:: max(1, len(rows) // 200)]
    texts = [r["output"] for r in rows]
    exchanges = [_exchange(r["instruction"]) for r in rows]  # the prompt is read for its trigrams, as it is live
    dialect = ROUTES["/v1/chat/completions"]
    whole, marked, plain = [], [], []
    event, parsed = {style: [] for style in PIECE_STYLES}, {style: [] for style in PIECE_STYLES}
    on_time, sent = dict.fromkeys(PIECE_STYLES, 0), dict.fromkeys(PIECE_STYLES, 0)

    def through_the_transform(i: int) -> None:
        data, write = jsonio.read(bodies[i])
        rewrite_body(dialect, data, lambda part: mark.rewriter(exchanges[i], part))
        write(data)

    def marking(i: int) -> None:
        mark.mark(texts[i], rows[i]["instruction"])

    def json_only(i: int) -> None:
        data, write = jsonio.read(bodies[i])
        write(data)

    bodies = [json.dumps(demo.chat_completion("m", [text])).encode() for text in texts]
    ways = [(whole, through_the_transform), (marked, marking), (plain, json_only)]
    for turn in range(3):  # in three orders: whichever runs first on a text finds the caches cold
        for i in range(len(texts)):
            for times, function in ways[turn:] + ways[:turn]:
                started = time.perf_counter()
                function(i)
                times.append(time.perf_counter() - started)
    for text, exchange in zip(texts, exchanges, strict=True):
        open_marker = functools.partial(mark.rewriter, exchange)
        for style, pattern in PIECE_STYLES.items():
            events = demo.chat_events("m", [re.findall(pattern, text)])
            seconds, on_own_push = _stream(events, dialect, open_marker)
            event[style].append(seconds)
            parsed[style].append(_stream(events, dialect, lambda part: None)[0])
            on_time[style] += on_own_push
            sent[style] += len(events)
    return {
        "answers": len(texts),
        "whole_1.5KB_median_us": statistics.median(whole) * 1e6,
        "marking_only_1.5KB_median_us": statistics.median(marked) * 1e6,
        "json_only_1.5KB_median_us": statistics.median(plain) * 1e6,
        "per_event_median_us": {style: statistics.median(times) * 1e6 for style, times in event.items()},
        "per_event_parse_only_median_us": {style: statistics.median(times) * 1e6 for style, times in parsed.items()},
        "events_on_their_own_push": {style: round(on_time[style] / sent[style], 3) for style in PIECE_STYLES},
    }


# how a stream cuts its text into events: a word and the space after it, or (as OpenAI's tokens come) the
# space before it, which leaves each event's last word unfinished until the next event
PIECE_STYLES = {"word and space after": r"\S+\s*", "space and word (OpenAI)": r"\s*\S+"}


def _exchange(prompt: str) -> Exchange:
    exchange = Exchange("x", "POST", "/v1/chat/completions", "openai", "/v1/chat/completions", "127.0.0.1")
    exchange.prompt_text = prompt
    return exchange


def _stream(events: list[bytes], dialect, open_rewriter) -> tuple[float, int]:
    """(seconds per event, how many events left on their own push) through a stream rewriter that opens its
    parts' rewriters with `open_rewriter`; the rest waited for later events (the mark's look-ahead)."""
    released = on_time = 0
    started = time.perf_counter()
    stream = StreamRewrite(dialect, open_rewriter)
    for pushed, raw in enumerate(events, 1):
        released += len(stream.push(raw))
        on_time += released >= pushed
    stream.close()
    return (time.perf_counter() - started) / len(events), on_time


def samples(corpora, key: LexicalKey, rng: random.Random, n: int = 8) -> list[dict]:
    mark = LexicalWatermark(key)
    rows = [r for rows in corpora.values() for r in rows if 400 <= len(r["output"]) <= 900]
    out = []
    for r in rng.sample(rows, n):
        marked = mark.mark(r["output"], r["instruction"])
        pair = [("original", r["output"]), ("marked", marked)]
        rng.shuffle(pair)
        out.append(
            {
                "instruction": r["instruction"],
                "A": pair[0][1],
                "B": pair[1][1],
                "answer": {"A": pair[0][0], "B": pair[1][0]},
            }
        )
    return out


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "watermark.json").write_text(json.dumps(report, indent=1))
    c, p, q = report["calibration"], report["power"], report["cost"]
    lines = [
        "# Lexical watermark",
        "",
        f"`{report['command']}` on {report['machine']}; word sets {report['word_sets'][:16]} "
        f"({report['sets']} sets); {report['responses']} real responses of {report['models']} models.",
        "",
        f"## Calibration ({c['keys']} random vetted keys, unmarked text)",
        "",
        "| p-values | n | alpha | count at or below | 99% binomial interval | within | not above |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in (
        ("single responses", "single"),
        ("single responses, randomised", "single_randomised"),
        ("whole-model corpora", "corpus"),
        ("whole-model corpora, randomised", "corpus_randomised"),
    ):
        for alpha in ALPHAS:
            s = c[key][str(alpha)]
            lines.append(
                f"| {label} | {c[key]['n']} | {alpha} | {s['count']} ({s['share']:.4f}) | "
                f"{s['interval'][0]}-{s['interval'][1]} | {s['within']} | {s['at_most_upper']} |"
            )
    lines += [
        "",
        f"Each model's corpus alone, over the {c['keys']} keys (independent draws; pooled, the twelve are not: "
        "under one key, the models' shared habits move their p-values together):",
        "",
        "| alpha | corpora whose randomised share is within its 99% binomial interval | interval | counts | "
        "corpora whose exact share is not above it |",
        "|---|---|---|---|---|",
    ]
    for alpha in ALPHAS:
        e = c["each_corpus"][str(alpha)]
        lines.append(
            f"| {alpha} | {e['randomised_within']}/{e['corpora']} | {e['interval'][0]}-{e['interval'][1]} | "
            f"{', '.join(map(str, e['randomised_counts']))} | {e['exact_not_above']}/{e['corpora']} |"
        )
    lines += [
        "",
        f"A response casts {c['votes_per_response_median']} votes at the median, so its exact p-value can only take "
        "a few values and is conservative (below alpha more rarely than alpha); the randomised p-value shows the "
        "test's size is exactly alpha.",
        "",
        "## Power (every response marked by the gateway, tested alone)",
        "",
        "| words | responses | median p | share p < 1e-6 |",
        "|---|---|---|---|",
    ]
    for bucket, b in p["by_length"].items():
        lines.append(f"| {bucket} | {b['responses']} | {b['median_p']:.3g} | {b['share_below_1e-6']:.3f} |")
    w = p["words_to_p_below_1e-6"]
    lines += [
        "",
        f"Words of marked text needed for p < 1e-6 (a model's responses concatenated): median {w['median']:.0f} "
        f"(quartiles {w['quartiles'][0]:.0f}, {w['quartiles'][2]:.0f}; {w['sequences']} sequences).",
        f"Share of words changed by the mark: {100 * p['share_of_words_changed']:.2f}%.",
        "",
        "## Robustness (each model's marked corpus, 805 responses, attacked)",
        "",
        "| attack | corpus median p | corpora with p < 1e-6 | single-response median p |",
        "|---|---|---|---|",
    ]
    for name, r in report["robustness"].items():
        lines.append(
            f"| {name} | {r['corpus_median_p']:.3g} | {r['corpora_below_1e-6']}/{r['corpora']} | "
            f"{r['single_median_p']:.3g} |"
        )
    lines += [
        "",
        "## Cost",
        "",
        f"Median over {q['answers']} answers of 1.2-1.8 KB (each timed three times, in three orders, as the first "
        "to run on an answer finds the caches cold), as the gateway runs them: "
        f"{q['whole_1.5KB_median_us']:.0f} µs per whole answer (JSON decoded, marked, encoded; the marking alone "
        f"{q['marking_only_1.5KB_median_us']:.0f} µs, reading the answer's instruction as its prompt, for the "
        "trigrams no site may repeat, as every request's prompt is read). Of that, the JSON decoding and encoding "
        f"(gateway/jsonio.py, as the gateway does it) take {q['json_only_1.5KB_median_us']:.0f} µs.",
        "",
        "Streamed, one word per OpenAI chunk, by how the words are cut into events:",
        "",
        "| pieces | µs per event, rewriter | µs per event, stream parser alone | events out on their own push |",
        "|---|---|---|---|",
        *(
            f"| {style} | {q['per_event_median_us'][style]:.1f} | {q['per_event_parse_only_median_us'][style]:.1f} "
            f"| {q['events_on_their_own_push'][style]:.0%} |"
            for style in PIECE_STYLES
        ),
        "",
        "An event not out on its own push waits for later ones while the mark looks ahead (at most three words); "
        "an event whose text changed is encoded again, and with the space before each word more events change "
        "(text that waits moves to a later event).",
        "",
        "Blind side-by-side samples (original and marked, in random order) are in `watermark-samples.md`.",
    ]
    (out / "watermark.md").write_text("\n".join(lines) + "\n")
    sample_lines = ["# Blind samples: one of A and B is marked", ""]
    for i, s in enumerate(report["samples"], 1):
        sample_lines += [f"## {i}. {s['instruction']}", "", "**A**", "", s["A"], "", "**B**", "", s["B"], ""]
    sample_lines += ["## Key", ""] + [
        f"{i}. A is {s['answer']['A']}, B is {s['answer']['B']}" for i, s in enumerate(report["samples"], 1)
    ]
    (out / "watermark-samples.md").write_text("\n".join(sample_lines) + "\n")
    console.print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of *.jsonl.gz model outputs")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--limit", type=int, default=0, help="responses per model (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    corpora = load(args.data)
    if args.limit:
        corpora = {name: rows[: args.limit] for name, rows in corpora.items()}
    key = epoch_key(rng.randbytes(32), 0, SETS)
    with Progress(console=console) as progress:
        report = {"calibration": calibration(corpora, args.keys, rng, progress)}
        report["power"], marked = power(corpora, key, progress)
        report["robustness"] = robustness(marked, key, rng, progress)
    report["cost"] = cost(corpora, key)
    report["samples"] = samples(corpora, key, rng)
    report.update(
        command="python -m benchmarks.watermark_bench " + " ".join(argv or __import__("sys").argv[1:]),
        machine=f"{platform.node()} ({len(os.sched_getaffinity(0))} CPUs, {cpu_model()})",  # costs differ by CPU
        word_sets=SETS.version,
        sets=len(SETS.sets),
        responses=sum(len(v) for v in corpora.values()),
        models=len(corpora),
    )
    write(report, args.out)


if __name__ == "__main__":
    main()
