"""Reading mode: which member of each word set does the suspect itself prefer, read from its log-probabilities.

Asking a suspect to write text and counting its word choices needs a great deal of text: a set votes only
where the suspect happens to use it. Where the suspect scores given text (the completions API with
`echo`), its preference can be read directly: take a passage of ordinary reference text where a set
member occurs, write it once with each member of the set in that place, and ask the suspect for the
log-probability of each version from that place on (the member and the words after it; the words before
are the same in every version). Summed over a few passages per set, the member with the highest total
is the suspect's vote for that set.

The test is the writing mode's: one vote per set, a hit when the vote is the key's member, an exact
Poisson-binomial tail. Its null holds for the same reason: a suspect that never learned from marked text
has preferences (for shorter words, for common ones) that owe nothing to the key, and the key's member
of each set was drawn uniformly at random, so each vote hits with probability 1 / |set|. Passages come
from the reference text shipped with the word sets and then from the suspect's own answers (which reach
sets the reference does not); neither depends on the key, so neither can bias the votes under the null.
"""

from __future__ import annotations

from ..watermark.scheme import LexicalKey, reference_texts
from ..watermark.scoring import poisson_binomial_sf
from ..watermark.sites import Scanner
from ..watermark.wordsets import WordSets
from .echo import scored
from .probe import Session

BEFORE_CHARS = 300  # of the passage before the site: enough context for the next word
AFTER_CHARS = 40  # after the site: the words a member choice changes the probability of


def passages(sets: WordSets, texts: list[str], per_set: int = 4) -> list[dict]:
    """Up to `per_set` passages per set, from the reference text and then `texts`: each passage written once
    with every member of its set in turn."""
    found: dict[int, list[dict]] = {}
    for number, text in enumerate([*reference_texts(), *texts]):
        scanner = Scanner(sets)
        scanner.feed(text)
        scanner.flush()
        for position, site in enumerate(scanner.sites):
            mine = found.setdefault(site.set_index, [])
            if len(mine) < per_set:
                variants = _variants(text, sets, position, len(sets.sets[site.set_index].members))
                if variants is not None:
                    mine.append({"id": f"{site.set_index}-{number}-{position}", "set": site.set_index, **variants})
    return [p for set_index in sorted(found) for p in found[set_index]]


def _variants(text: str, sets: WordSets, position: int, members: int) -> dict | None:
    """The passage around site `position` of `text`, once per member: the same words before (from a word
    boundary) and after (to one), only the member differing. None when the versions do not differ."""
    written = [_with_member(text, sets, position, m) for m in range(members)]
    start = len(_common_prefix(written))
    shared_end = len(_common_prefix([w[::-1] for w in written]))
    if start == 0 or len(set(written)) < members:
        return None
    begin = max(0, start - BEFORE_CHARS)
    begin = text.find(" ", begin) + 1 if begin else 0
    after = written[0][len(written[0]) - shared_end :][:AFTER_CHARS]
    after = after[: after.rfind(" ")] if " " in after.strip() else after
    texts = [w[begin : len(w) - shared_end] + after for w in written]
    return {"texts": texts, "start": start - begin}


def _with_member(text: str, sets: WordSets, position: int, member: int) -> str:
    seen = [0]

    def choose(site) -> int:
        seen[0] += 1
        return member if seen[0] - 1 == position else site.member

    scanner = Scanner(sets, frozenset(), choose)
    return scanner.feed(text) + scanner.flush()


def _common_prefix(texts: list[str]) -> str:
    shortest = min(texts, key=len)
    for i, ch in enumerate(shortest):
        if any(t[i] != ch for t in texts):
            return shortest[:i]
    return shortest


async def read(session: Session, passage: dict) -> dict:
    """The suspect's log-probability of each version of one passage, from the site on."""
    scores = await scored(session, passage["texts"], lambda _: passage["start"])
    return {"id": passage["id"], "set": passage["set"], "scores": scores}


def reading_test(rows: list[dict], key: LexicalKey) -> tuple[float, int, int]:
    """(p-value, votes, hits): per set, the member with the highest summed score votes; ties cast none."""
    totals: dict[int, list[float]] = {}
    for row in rows:
        mine = totals.setdefault(row["set"], [0.0] * len(row["scores"]))
        for i, score in enumerate(row["scores"]):
            mine[i] += score
    probabilities, hits = [], 0
    for set_index, scores in totals.items():
        best = max(scores)
        if scores.count(best) > 1:
            continue
        probabilities.append(1 / len(scores))
        hits += scores.index(best) == key.preferred[set_index]
    return poisson_binomial_sf(hits, probabilities), len(probabilities), hits
