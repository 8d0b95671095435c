"""How much of real text the word sets can mark, and so how many votes a response can cast.

    python -m benchmarks.wordset_coverage --data ../shared/data/alpaca_eval \
        [--proposals benchmarks/results/wordset-review.tsv] [--out benchmarks/results]

Per response the detector counts one vote per distinct set (gateway/watermark/scoring.py), and with sets of
two members a response needs 20 votes for p < 1e-6 (2^-20). This reads every response through the
watermark's own site rules and reports sites per 100 words and distinct sets per 300 words, for the
shipped sets and, with --proposals, for the shipped sets plus every proposal of a review file, kept or
not (a proposal sharing a member with a set already there is left out whole): about what accepting every
proposal of that kind would give.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.watermark_bench import load, words
from gateway.watermark.scoring import vote_counts
from gateway.watermark.wordsets import WordSets, default_sets, default_text

MIN_WORDS = 150  # shorter responses say little about a rate per 300 words


def coverage(sets: WordSets, texts: list[str]) -> dict:
    sites = total = 0
    distinct, used = [], set()
    for text in texts:
        found = vote_counts([(text, "")], sets)  # per set, how often each member stood at a site
        used |= found.keys()
        n = words(text)
        sites, total = sites + sum(sum(c.values()) for c in found.values()), total + n
        if n >= MIN_WORDS:
            distinct.append(300 * len(found) / n)
    if not distinct:
        raise SystemExit(f"no response of {MIN_WORDS} words or more to measure")
    return {
        "sets": len(sets.sets),
        "sets_used": len(used),
        "sites_per_100_words": round(100 * sites / total, 2),
        "distinct_sets_per_300_words_median": round(statistics.median(distinct), 2),
    }


def with_proposals(review: Path) -> WordSets:
    """The shipped sets plus every proposal whose members are all new (a member may be in one set only)."""
    taken = {" ".join(member) for member in default_sets().lookup}
    lines = []
    for row in review.read_text().splitlines()[1:]:
        members = [m.strip() for m in row.split("\t")[0].split("|")]
        if not taken.intersection(members) and all(len(m.split()) <= 3 for m in members):
            taken.update(members)
            lines.append(" | ".join(members))
    return WordSets.parse(default_text() + "\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--proposals", type=Path, help="a review file (TSV, the proposal first on each line)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    texts = [row["output"] for rows in load(Path(args.data)).values() for row in rows]
    report = {"responses": len(texts), "shipped": coverage(default_sets(), texts)}
    if args.proposals:
        report["shipped_and_every_proposal"] = coverage(with_proposals(args.proposals), texts)
    command = f"python -m benchmarks.wordset_coverage --data {args.data}"
    command += f" --proposals {args.proposals}" if args.proposals else ""
    report["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wordset-coverage.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        f"| {name.replace('_', ' ')} | {r['sets']} | {r['sets_used']} | {r['sites_per_100_words']} "
        f"| {r['distinct_sets_per_300_words_median']} |"
        for name, r in report.items()
        if isinstance(r, dict)
    ]
    (args.out / "wordset-coverage.md").write_text(
        "# Word-set coverage of real model text\n\n"
        f"`{command}`: {len(texts)} responses, read with the watermark's site rules.\n\n"
        "| sets | count | used | sites per 100 words | distinct sets per 300 words (median) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "A response casts one vote per distinct set; p < 1e-6 takes 20 votes with two-member sets.\n"
    )
    print((args.out / "wordset-coverage.md").read_text())


if __name__ == "__main__":
    main()
