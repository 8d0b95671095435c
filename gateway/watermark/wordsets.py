"""The word sets: which words and short phrases the watermark may exchange for one another.

Loaded from `wordsets.txt` (its header says where the sets come from and how they were reviewed). Each
member is a tuple of lower-case words; apostrophes are stored straight (') and matched whatever the text
uses. The file's SHA-256 names the version, so that a detection says which sets it used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

MAX_WORDS = 3  # the longest member, in words: the stream's look-ahead


@dataclass(frozen=True, slots=True)
class WordSet:
    index: int
    members: tuple[tuple[str, ...], ...]
    comma: bool  # used only where a comma follows (sentence connectors)
    contraction: bool  # has a member with an apostrophe: used only before a following word
    articled: bool  # members differ in taking "a" or "an": no site right after either article
    article_inside: bool  # a member begins with "a" or "an" where another does not: no site after a determiner
    negative: bool  # a negative contraction ("isn't"): no site before a subject, where a question inverts it
    lower: bool  # members that are also names ("Swift", "Gray"): used only in lower case
    start: bool  # used only at the start of a sentence ("Finally," is "Lastly," there, not in "he finally,")
    # What may stand beside a member decides whether it is a site: so that a text marked reads back with the
    # sites it was marked at (and marking it again changes nothing), each rule holds for every member of the
    # set and of the neighbour's set alike.
    # Words after which a member would be read as part of another set's phrase ("it isn't" marked "it is not"
    # reads as "it is", a site of another set, scored against the key): no site after them.
    joins: frozenset[str] = frozenset()
    has_s: bool = False  # a member ends in "'s", which before a participle means "has" ("she's written")
    # For contractions, the words before which the set is no site (a subject after a negative one, "isn't it";
    # a conjunction or subject after another, "who you are and"; a participle after "'s"), with every member
    # of a set any of whose members is one ("they" and "they'll", "often" and "frequently").
    not_before: frozenset[str] = frozenset()
    s_members: frozenset[str] = frozenset()  # members ending in "'s": contractions, not possessives ("there's")

    @property
    def name(self) -> str:
        return " | ".join(" ".join(m) for m in self.members)


@dataclass(frozen=True)
class WordSets:
    sets: tuple[WordSet, ...]
    version: str  # sha256 of the file

    def __post_init__(self) -> None:
        lookup, prefixes = {}, set()
        for word_set in self.sets:
            for position, member in enumerate(word_set.members):
                if member in lookup:
                    raise ValueError(f"{' '.join(member)!r} is in two sets")
                lookup[member] = (word_set.index, position)
                prefixes.update(member[:n] for n in range(1, len(member)))
        object.__setattr__(self, "lookup", lookup)  # member words -> (set index, member index)
        object.__setattr__(self, "prefixes", frozenset(prefixes))  # proper prefixes of multi-word members
        # the same for reading word by word without a tuple each: one-word members, and first words of phrases
        object.__setattr__(self, "single", {member[0]: found for member, found in lookup.items() if len(member) == 1})
        object.__setattr__(self, "heads", frozenset(prefix[0] for prefix in prefixes))
        # every beginning of a member's first word ("l", "la", ... "large"): a word being typed that is none
        # of these can begin no member, whatever follows (a later word of a member, such as "summary" of "in
        # summary", may be none of these: the scanner sends such a word early only with nothing held before it)
        starts = {first[:n] for first, *_ in lookup for n in range(1, len(first) + 1)}
        object.__setattr__(self, "starts", frozenset(starts))
        object.__setattr__(self, "longest_start", max(map(len, starts)))
        object.__setattr__(self, "sets", _with_neighbours(self.sets, [*lookup, *prefixes]))

    @classmethod
    def parse(cls, text: str) -> WordSets:
        sets = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            body, *tags = line.split("@")
            members = tuple(tuple(m.strip().split()) for m in body.split("|"))
            tags = {tag.strip() for tag in tags}
            if len(members) < 2 or any(not m or len(m) > MAX_WORDS for m in members) or tags - _TAGS:
                raise ValueError(f"bad word set line: {line!r}")
            contraction = any("'" in word for member in members for word in member)
            articled = len({takes_an(member[0]) for member in members}) > 1
            article_inside = len({member[0] in ("a", "an") for member in members}) > 1
            negative = contraction and any(word.endswith("n't") for member in members for word in member)
            sets.append(
                WordSet(len(sets), members, "comma" in tags, contraction, articled, article_inside, negative,
                        "lower" in tags, "start" in tags)
            )  # fmt: skip
        return cls(tuple(sets), hashlib.sha256(text.encode()).hexdigest())


_TAGS = frozenset({"comma", "lower", "start"})


def _with_neighbours(sets: tuple[WordSet, ...], phrases: list[tuple[str, ...]]) -> tuple[WordSet, ...]:
    """The sets, each with what its neighbours decide: `joins` (the first word of every phrase, member or
    beginning of one, whose second word begins one of the set's members), `has_s`, `not_before` and
    `s_members`."""
    joins: dict[str, set[str]] = {}
    for phrase in phrases:
        if len(phrase) > 1:
            joins.setdefault(phrase[1], set()).add(phrase[0])
    subjects = _SUBJECTS | _closed(sets, _SUBJECTS.__contains__)
    stranding = _STRANDING | _closed(sets, _STRANDING.__contains__)
    participles = _closed(sets, participle)
    s_members = frozenset(m[0] for s in sets for m in s.members if len(m) == 1 and m[0].endswith("'s"))
    out = []
    for s in sets:
        has_s = any(member[-1].endswith("'s") for member in s.members)
        if not s.contraction:
            before = frozenset()
        elif s.negative:
            before = subjects
        else:
            before = stranding | participles if has_s else stranding
        out.append(replace(
            s,
            joins=_last_words_closed(sets, frozenset().union(*(joins.get(m[0], ()) for m in s.members))),
            has_s=has_s,
            not_before=before,
            s_members=s_members,
        ))  # fmt: skip
    return tuple(out)


def _last_words_closed(sets: tuple[WordSet, ...], words: frozenset[str]) -> frozenset[str]:
    """The words, and the last words of every member of a set where one member ends in one of them."""
    return words | _closed(sets, words.__contains__, -1) if words else words


def _closed(sets: tuple[WordSet, ...], rule, position: int = 0) -> frozenset[str]:
    """The first (or, at `position` -1, last) words of the members of every set with a member whose such word
    the rule takes or is one of these already: "in" of "in fact", whose other member "indeed" ends like a
    participle, brings "in the meantime" and so "meanwhile"; "lots" of "parking lots" brings "areas"."""
    ends = [frozenset(member[position] for member in s.members) for s in sets]
    words: set[str] = set()
    grown = True
    while grown:
        grown = False
        for end in ends:
            if not end <= words and any(rule(word) or word in words for word in end):
                words |= end
                grown = True
    return frozenset(words)


# a verb left at its clause's end cannot contract ("who you are and", "whatever it is you want")
_STRANDING = frozenset({"and", "or", "but", "nor", "because", "i", "you", "he", "she", "we", "they", "it"})
# "Isn't it", "why don't you": expanded before its subject, a question reads "is not it"
_SUBJECTS = frozenset({"i", "you", "he", "she", "it", "we", "they", "there", "that", "this", "one"})
# after "'s", which then means "has" ("she's written"): irregular participles, and any word ending as most do
_HAS_WORDS = frozenset(
    {"been", "got", "become", "come", "done", "gone", "had", "made", "run", "put", "set", "let", "said", "told",
     "found", "brought", "bought", "thought", "taught", "caught", "left", "kept", "held", "built", "sent", "spent",
     "lost", "meant", "met", "paid", "sold", "stood", "won", "begun", "led", "read", "heard", "felt", "struck"}
)  # fmt: skip
_HAS_ENDINGS = ("ed", "en", "wn")  # worked, taken, shown; a few adjectives ("green", "open") are lost too


def participle(word: str) -> bool:
    """Whether a (lower-case) word may be a past participle, by the list and the endings above."""
    return word in _HAS_WORDS or word.endswith(_HAS_ENDINGS)


# Words spelt with a vowel but said with a consonant, and the reverse ("a unique", "an hour").
_CONSONANT_SOUND = (
    *("once", "oneself", "unan", "unic", "unif", "unil", "unio", "uniq", "unis", "unit", "univ"),
    *("usa", "use", "usu", "ute", "uti", "uto", "ubi", "eu", "ewe"),
)
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def takes_an(word: str) -> bool:
    """Whether "an" goes before the word (by its spelling, with the common exceptions)."""
    if word.startswith(_VOWEL_SOUND):
        return True
    return word[:1] in "aeiou" and word != "one" and not word.startswith(_CONSONANT_SOUND)


def default_text() -> str:
    """The shipped word-set file."""
    return resources.files(__package__).joinpath("wordsets.txt").read_text()


@cache
def default_sets() -> WordSets:
    return WordSets.parse(default_text())
