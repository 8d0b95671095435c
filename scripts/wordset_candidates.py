"""Propose candidate word sets for the lexical watermark from WordNet, for review by hand.

This proposed the second round of WordNet sets in gateway/watermark/wordsets.txt (its last section); every
proposal was then read and kept or dropped by hand (the file's header says by which rules, and
benchmarks/results/wordset-review.tsv holds the verdicts). Nothing here runs in the
gateway. Needs Debian's `wordnet-base` (WordNet 3.0, in /usr/share/wordnet) and `pip install wordfreq`
(general English word frequencies, so that the filter does not depend on any text we mark or test on).

A set is proposed from one synset when at least two of its lemmas pass every filter:
- the synset is the lemma's first sense (WordNet orders senses by SemCor frequency), the lemma was tagged
  at least --min-tags times in that sense, and that sense carries at least --dominance of the lemma's tags
  in its part of speech (so the word nearly always means this);
- the lemma is rarely another part of speech (tags elsewhere at most --other-pos of these tags), since a
  swap inside the other use would break the sentence ("use" the noun);
- it is lower case, one or two words, and common in general English (Zipf frequency at least --min-zipf),
  and the members' frequencies are within --zipf-spread of each other (a rare synonym changes register).
Nouns also give a plural set, verbs a third-person set and, when every member's past tense and past
participle are regular (so they coincide), a past set; inflected forms must be common too (Zipf at least
--min-zipf less half a point). A proposal sharing a member with another proposal is left out.

Usage: python scripts/wordset_candidates.py [--exclude gateway/watermark/wordsets.txt] > candidates.tsv
Output: one proposal per line, tab-separated: the set line, part of speech, the synset's gloss, Zipf values.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from gateway.watermark.wordsets import WordSets

WORDNET = Path("/usr/share/wordnet")
POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}


def read_index(pos: str) -> dict[str, list[str]]:
    senses = {}
    for line in (WORDNET / f"index.{POS[pos]}").read_text().splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        synset_count = int(fields[2])
        senses[fields[0]] = fields[-synset_count:]
    return senses


def read_tag_counts() -> dict[tuple[str, str], dict[int, int]]:
    """(lemma, pos) -> {sense number: SemCor tag count}."""
    counts: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for line in (WORDNET / "cntlist.rev").read_text().splitlines():
        key, sense, tags = line.split()
        lemma, rest = key.split("%", 1)
        counts[(lemma, SS_TYPE[rest[0]])][int(sense)] = int(tags)
    return counts


def read_synsets(pos: str) -> dict[str, tuple[list[str], str]]:
    """offset -> (lemmas as written, gloss)."""
    synsets = {}
    for line in (WORDNET / f"data.{POS[pos]}").read_text().splitlines():
        if line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]) for i in range(count)]
        synsets[fields[0]] = (lemmas, gloss.strip())
    return synsets


def read_exceptions(pos: str) -> dict[str, list[str]]:
    """base form -> irregular inflected forms."""
    forms: dict[str, list[str]] = defaultdict(list)
    for line in (WORDNET / f"{POS[pos]}.exc").read_text().splitlines():
        inflected, *bases = line.split()
        for base in bases:
            forms[base].append(inflected)
    return forms


_IRREGULAR_S = {"be": "is", "have": "has", "do": "does", "go": "goes"}  # third person of the verbs not regular


def s_form(word: str) -> str:
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def ed_form(word: str) -> str | None:
    """The regular past tense, or None where doubling the last consonant is a guess."""
    if word.endswith("e"):
        return word + "d"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ied"
    if re.search(r"[^aeiou][aeiou][^aeiouwxy]$", word):
        return None
    return word + "ed"


class Lexicon:
    def __init__(self) -> None:
        import wordfreq

        self.zipf = lambda w: wordfreq.zipf_frequency(w.replace("_", " "), "en")
        self.index = {pos: read_index(pos) for pos in POS}
        self.tags = read_tag_counts()
        self.synsets = {pos: read_synsets(pos) for pos in POS}
        self.exceptions = {pos: read_exceptions(pos) for pos in ("n", "v")}

    def tag_total(self, lemma: str, pos: str) -> int:
        return sum(self.tags.get((lemma, pos), {}).values())

    def passes(self, lemma: str, pos: str, offset: str, args: argparse.Namespace) -> bool:
        if not re.fullmatch(r"[a-z]+(_[a-z]+)?", lemma) or self.index[pos].get(lemma, [None])[0] != offset:
            return False
        first = self.tags.get((lemma, pos), {}).get(1, 0)
        if first < args.min_tags or first < args.dominance * self.tag_total(lemma, pos):
            return False
        elsewhere = sum(self.tag_total(lemma, other) for other in POS if other != pos)
        return elsewhere <= args.other_pos * first and self.zipf(lemma) >= args.min_zipf

    def inflections(self, members: list[str], pos: str) -> list[tuple[str, list[str]]]:
        """(label, forms) for each inflected set this base set gives, forms in member order."""
        words = [m.split("_") for m in members]
        if pos == "n":
            return [("plural", [self._inflect(w, "n", s_form) for w in words])]
        if pos != "v":
            return []
        out = [("3rd person", [self._inflect(w, "v", s_form) for w in words])]
        past = [self._inflect(w, "v", ed_form) for w in words]
        if all(p is not None and not self.exceptions["v"].get(w[0]) for p, w in zip(past, words, strict=True)):
            out.append(("past", past))
        return out

    def _inflect(self, words: list[str], pos: str, regular) -> str | None:
        """Inflect a member's head (a noun's last word, a verb's first); None where that is not certain."""
        at = len(words) - 1 if pos == "n" else 0
        if pos == "n" and self.exceptions[pos].get(words[at]):
            return None
        if pos == "v" and regular is s_form and words[at] in _IRREGULAR_S:
            head = _IRREGULAR_S[words[at]]
        else:
            head = regular(words[at])
        return None if head is None else " ".join([*words[:at], head, *words[at + 1 :]])


def proposals(lexicon: Lexicon, args: argparse.Namespace, excluded: set[str]):
    for pos, synsets in lexicon.synsets.items():
        for offset, (lemmas, gloss) in synsets.items():
            members = [lemma for lemma in dict.fromkeys(lemmas) if lexicon.passes(lemma, pos, offset, args)]
            members = [m for m in members if m.replace("_", " ") not in excluded]
            zipfs = [lexicon.zipf(m) for m in members]
            if len(members) < 2 or max(zipfs) - min(zipfs) > args.zipf_spread:
                continue
            yield [m.replace("_", " ") for m in members], POS[pos], gloss, zipfs
            for label, forms in lexicon.inflections(members, pos):
                if None in forms or len(set(forms)) < len(forms):
                    continue
                zipfs = [lexicon.zipf(f) for f in forms]
                if min(zipfs) >= args.min_zipf - 0.5 and max(zipfs) - min(zipfs) <= args.zipf_spread:
                    yield forms, f"{POS[pos]}, {label}", gloss, zipfs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exclude", type=Path, help="a word set file whose members are not proposed again")
    parser.add_argument("--min-tags", type=int, default=3)
    parser.add_argument("--dominance", type=float, default=0.6)
    parser.add_argument("--other-pos", type=float, default=0.2)
    parser.add_argument("--min-zipf", type=float, default=3.0)
    parser.add_argument("--zipf-spread", type=float, default=1.5)
    args = parser.parse_args()
    excluded = (
        {" ".join(member) for member in WordSets.parse(args.exclude.read_text()).lookup} if args.exclude else set()
    )
    found = list(proposals(Lexicon(), args, excluded))
    seen = defaultdict(int)
    for members, *_ in found:
        for member in members:
            seen[member] += 1
    for members, pos, gloss, zipfs in found:
        if all(seen[m] == 1 for m in members):
            zipf_text = " ".join(f"{z:.1f}" for z in zipfs)
            print(f"{' | '.join(members)}\t{pos}\t{gloss}\t{zipf_text}")


if __name__ == "__main__":
    main()
