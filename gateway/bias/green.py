"""The sampling-bias mark: a keyed green list of the upstream's word tokens, and its exact detector.

A proxy cannot change how a model samples, except where the API lets a request do it: OpenAI-compatible
APIs accept `logit_bias`, a bias per token id (OpenAI allows 300). The mark asks the upstream to favour
`size` tokens chosen with a key, so its answers use those words more than they otherwise would.

The tokens: the vocabulary's word-initial, lower-case, alphabetic tokens of at least three letters (a
space or its byte-level stand-in, then the word), less a public list of words that carry negation, truth
values or quantity (NOT_IN_POOL), the pool. Their ids come from the upstream's own
tokenizer file (a `tokenizers` JSON, or any JSON object of token -> id), read offline. The key ranks the
pool with HMAC and the first `size` words are the epoch's green list: a uniformly random subset.

Detection reads words, not tokens, so it needs no tokenizer: a pool word counts when the text holds it as
a whole lower-case word after a space, once per distinct word however often it recurs, and not when the
prompt holds it. If the text was written without the key, the green list is a uniform random subset of
the pool, independent of which pool words the text holds, so the number of green words among the n
counted is exactly hypergeometric (pool size, green size, n); the p-value is its upper tail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..stats import hypergeometric_sf
from ..watermark.detect import Finding
from ..watermark.sites import loosened

SCHEME = "sampling-bias-v1"
_POOL_TOKEN = re.compile(r"^(?:Ġ| |▁)([a-z]{3,})$")  # byte-level BPE marks a leading space with Ġ, SentencePiece with ▁
_WORD = re.compile(r"(?:(?<=\s)|^)([a-z]{3,})\b")
_LETTERS = re.compile(r"[a-z]+")
# Words whose favour could change what an answer says or a JSON value: never in the pool (a public rule, so
# the null is unchanged: detection counts only pool words).
NOT_IN_POOL = frozenset(
    """not nor never none nothing nobody nowhere neither cannot without yes true false null
    nan undefined all any every always only except unless""".split()  # noqa: SIM905 (a word list reads best as text)
)


class VocabularyError(ValueError):
    pass


@dataclass(frozen=True)
class Vocabulary:
    ids: dict[str, int]  # pool word -> token id
    digest: str  # SHA-256 of the tokenizer file: which vocabulary a detection assumed

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        raw = path.read_bytes()
        try:
            data = json.loads(raw)
            # a tokenizers file, or a plain map (where "model" may well be a token)
            vocab = data["model"]["vocab"] if isinstance(data.get("model"), dict) else data
            ids = {m.group(1): i for token, i in vocab.items()
                   if (m := _POOL_TOKEN.match(token)) and m.group(1) not in NOT_IN_POOL}  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VocabularyError(f"{path}: not a tokenizer file with a vocabulary ({e})") from None
        if not all(type(i) is int and 0 <= i < 2**31 for i in ids.values()):  # they go upstream as token ids
            raise VocabularyError(f"{path}: token ids must be whole numbers from 0")
        if len(ids) < 1000:
            raise VocabularyError(f"{path}: only {len(ids)} word tokens; is this the upstream's tokenizer?")
        return cls(ids, hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class GreenList:
    epoch: int
    words: frozenset[str]
    bias: dict[str, float]  # token id (as the API's JSON key) -> bias
    pool: int  # the pool's size
    fingerprint: str  # identifies the key, reveals nothing of it


def green_list(master: bytes, epoch: int, vocabulary: Vocabulary, size: int, bias: float) -> GreenList:
    """The epoch's green list: the `size` pool words the epoch's key ranks first."""
    key = HKDF(hashes.SHA256(), 32, salt=None, info=f"canarygate {SCHEME} epoch {epoch}".encode()).derive(master)
    ranked = sorted(vocabulary.ids, key=lambda w: hmac.new(key, w.encode(), hashlib.sha256).digest())
    words = frozenset(ranked[:size])
    fingerprint = hmac.new(key, b"fingerprint", hashlib.sha256).hexdigest()[:16]
    return GreenList(epoch, words, {str(vocabulary.ids[w]): bias for w in sorted(words)}, len(ranked), fingerprint)


def counted_words(items: list[tuple[str, str]], pool: dict[str, int]) -> set[str]:
    """The distinct pool words the texts hold, less those each text's own prompt holds: in the prompt, any run
    of letters in any case and after anything, read loosely (sites.loosened), since a word passed over is only
    a draw lost, and a prompt holding the text in another typography must hide it as well as a plain copy."""
    found: set[str] = set()
    for text, prompt in items:
        found |= set(_WORD.findall(text)) - set(_LETTERS.findall(loosened(prompt).lower()))
    return {word for word in found if word in pool}


def detect(items: list[tuple[str, str]], greens: list[GreenList], vocabulary: Vocabulary) -> list[Finding]:
    """One finding per epoch's green list, its raw p-value as p_value too: the caller adjusts across schemes."""
    findings = []
    for green in greens:
        p, counted, hits = green_test(items, green, vocabulary)
        findings.append(Finding(SCHEME, green.epoch, green.fingerprint, p, p, counted, hits, counted))
    return findings


def green_test(items: list[tuple[str, str]], green: GreenList, vocabulary: Vocabulary) -> tuple[float, int, int]:
    """(p-value, words counted, green words among them) for one epoch's green list."""
    counted = counted_words(items, vocabulary.ids)
    hits = len(counted & green.words)
    return hypergeometric_sf(hits, green.pool, len(green.words), len(counted)), len(counted), hits
