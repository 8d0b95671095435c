"""The canary phrase space: closing pleasantries with two slots, and the keyed choice of each identity's.

A canary must tie outputs to an account while doing no harm: so it is a closing line of good wishes (it
states nothing about the world, so it can never be a false claim), at the end of the prose of an answer.
Ten templates x 100 adjectives x 100 nouns make N = 100,000 equally likely phrases, which is what an
attribution's p-value and a canary's exposure are computed against. Each identity has `count` canaries per
key epoch, chosen with HMAC from the canary key, so that only the key's holder can tell whose a phrase is.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

TEMPLATES = (
    "Hope this helps, and may your {noun} stay {adj}.",
    "Good luck, and keep your {noun} {adj}!",
    "Until next time, may every {noun} you meet be {adj}.",
    "Take care, and here's to {a_adj} {noun}.",
    "All the best, and may the {noun} stay {adj} for you.",
    "Cheers, and may your next {noun} be {a_adj} one.",
    "Happy exploring, and may your {noun} feel {adj}.",
    "Best wishes for {a_adj} {noun} ahead.",
    "Enjoy, and may your {noun} always be {adj}.",
    "Have a good one, and may your {noun} be {adj} today.",
)
ADJECTIVES = tuple(
    """bright steady calm golden quiet gentle sunny cozy lively mellow sturdy cheerful peaceful warm clear fresh
    brisk kind graceful hopeful joyful nimble patient radiant serene sparkling tidy vivid wise bold breezy crisp
    dazzling earnest faithful fearless friendly generous glowing grand handy hearty humble jolly lucky merry
    mighty modest neat noble playful plucky polished proud quick rosy rugged shiny simple sleek smooth snug
    spirited splendid spry stellar sunlit sweet swift tender thriving timely trusty upbeat valiant vibrant
    willing witty zesty amber silver velvet crimson emerald azure ivory copper coral scarlet violet hazel olive
    pearly misty starry leafy dewy frosty balmy dreamy""".split()  # noqa: SIM905 (a word list reads best as text)
)
NOUNS = tuple(
    """lantern compass garden harbor kettle notebook bicycle teacup meadow orchard windmill lighthouse backpack
    journal sailboat campfire hammock greenhouse bookshelf porch canoe kite telescope workshop pantry balcony
    rowboat trail cabin sketchbook toolbox mailbox fountain bakery bridge chapel cottage courtyard doorway
    fireplace hilltop island lagoon library marketplace mountain pathway picnic quilt riverbank rooftop
    schoolyard seashore skyline snowfall sunrise sunset tapestry thermos treehouse umbrella valley village
    vineyard waterfall wagon weekend windowsill woodpile bonfire carousel chimney clocktower cupboard daydream
    dinghy easel fiddle garland gazebo grove haystack horizon inkwell jigsaw keepsake ladder locket mosaic
    overcoat paddle parasol pinecone postcard puzzle raincoat sandcastle scarf songbook birdhouse""".split()  # noqa: SIM905 (a word list reads best as text)
)
SPACE = len(TEMPLATES) * len(ADJECTIVES) * len(NOUNS)


def phrase(index: int) -> str:
    template, rest = divmod(index, len(ADJECTIVES) * len(NOUNS))
    adj, noun = divmod(rest, len(NOUNS))
    adjective = ADJECTIVES[adj]
    article = "an" if adjective[0] in "aeiou" else "a"
    return TEMPLATES[template].format(adj=adjective, noun=NOUNS[noun], a_adj=f"{article} {adjective}")


@dataclass(frozen=True, slots=True)
class Canary:
    id: str  # what the evidence log records (the phrase itself is derived, never logged)
    identity: str
    epoch: int
    slot: int
    index: int  # in the phrase space

    @property
    def text(self) -> str:
        return phrase(self.index)


def canaries_of(key: bytes, identity: str, epoch: int, count: int) -> list[Canary]:
    """The identity's canaries for an epoch: `count` distinct phrases, chosen with the canary key."""
    found, seen, slot = [], set(), 0
    while len(found) < count:
        digest = hmac.new(key, f"canary\x00{epoch}\x00{identity}\x00{slot}".encode(), hashlib.sha256).digest()
        index = int.from_bytes(digest[:8], "big") % SPACE
        if index not in seen:
            seen.add(index)
            found.append(Canary("cn_" + digest[8:16].hex(), identity, epoch, len(found), index))
        slot += 1
    return found


def canary_key(master: bytes) -> bytes:
    """The canary key, from the watermark master key in its own domain."""
    return hmac.new(master, b"canarygate canary key v1", hashlib.sha256).digest()


_WORD = re.compile(r"[a-z']+")
_TEMPLATE_WORDS = [
    _WORD.findall(t.replace("{noun}", "NOUN").replace("{adj}", "ADJ").replace("{a_adj}", "a ADJ").lower())
    for t in TEMPLATES
]
_ADJ = {a: i for i, a in enumerate(ADJECTIVES)}
_NOUN = {n: i for i, n in enumerate(NOUNS)}


def phrases_in(text: str) -> set[int]:
    """Every phrase of the space in `text`, matched on its words (case, punctuation, curly or straight
    apostrophes and quotes, and spacing aside)."""
    words = [w for w in (w.strip("'") for w in _WORD.findall(text.lower().replace("’", "'"))) if w]
    found = set()
    for start in range(len(words)):
        for template, pattern in enumerate(_TEMPLATE_WORDS):
            index = _match(words, start, pattern)
            if index is not None:
                found.add(template * len(ADJECTIVES) * len(NOUNS) + index)
    return found


def _match(words: list[str], start: int, pattern: list[str]) -> int | None:
    if start + len(pattern) > len(words):
        return None
    adj = noun = None
    for offset, expected in enumerate(pattern):
        word = words[start + offset]
        if expected == "adj":
            adj = _ADJ.get(word)
            if adj is None:
                return None
        elif expected == "noun":
            noun = _NOUN.get(word)
            if noun is None:
                return None
        elif expected == "a" and pattern[offset + 1 : offset + 2] == ["adj"]:
            if word not in ("a", "an"):
                return None
        elif word != expected:
            return None
    return adj * len(NOUNS) + noun
