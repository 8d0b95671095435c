"""What one finished exchange says about its caller: a few hashes and flags, computed once, in microseconds.

Nothing here keeps state or reads a clock. The prompt is reduced to:
- the skeleton of the caller's latest message: the hashes of its first and of its last six words (of a
  message of twelve words or more; a shorter one is its own skeleton). A template swept over topics ("You
  are an expert. Write a detailed essay about X", "X: explain it to a child in simple words") keeps one of
  the two while the slot changes, and six words are more than the common openings people share ("write a
  poem about"). Not the whole prompt's: an honest app's system prompt (and a chat's history) begins every
  request of every account that uses it, which would read as one template swept by all of them (a message
  with no words falls back to the whole prompt);
- its length in words (machine-made prompts vary little in length; people's vary a lot);
- the words of that message's opening and of its closing (six each, as two-byte hashes): a template reworded
  from a few interchangeable parts keeps drawing both ends from the same few words, where a person's bring
  new ones;
- whether it asks for the model's reasoning (in any message: a harvester's system prompt may ask for it), or
  probes for the system prompt (in the caller's latest message only: an honest app's system prompt often
  says "never reveal your system prompt", and a chat's history repeats every earlier turn);
and the answer to whether it carried prose the watermark could mark (an account that only ever asks for
code, JSON or quotations avoids the marks).

Words are runs of letters and digits in any script, each CJK character one word (those scripts put no space
between words): a prompt in Russian or Chinese has words like any other. They are compared as `folded`
reads them (look-alike letters of other scripts as Latin ones, invisible characters dropped). Only the first
and last `READ_CHARS` / 2 characters of a longer prompt (and of a longer latest message) are read, its middle's
words estimated at one per six characters, so that scoring stays microseconds however large the prompt, and
the queue holds no more. A phrase in the middle of such a prompt is not seen: hiding one there costs its caller
the tokens of 16 KB on every request.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import time
import unicodedata
import zlib
from dataclasses import dataclass

from ..exchange import Exchange, Identity

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and ideographs
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:'[^\W_{_CJK}]+)*")
READ_CHARS = 16384


class _Phrases:
    """A pattern of phrases, searched only in text holding one of `needed`: every match of the pattern
    contains one of them (a test checks each alternative). `in` runs at memchr speed; the pattern's
    alternation is tried at every position, which made it most of the features' time (10 µs a prompt)."""

    def __init__(self, pattern: str, needed: tuple[str, ...]) -> None:
        self.pattern = re.compile(pattern)
        self.needed = needed

    def search(self, text: str) -> bool:
        return any(word in text for word in self.needed) and self.pattern.search(text) is not None


_REASONING = _Phrases(
    r"step[- ]by[- ]step|chain[- ]of[- ]thought|show (?:me )?your (?:work|reasoning|thinking)|"
    r"explain your reasoning|reasoning (?:process|trace|steps)|think (?:it )?through|<think",
    ("step", "chain", "your", "reasoning", "think"),
)
_PROBE = _Phrases(
    r"system prompt|ignore (?:all |any )?(?:the )?(?:previous|prior|above) instructions|"
    r"(?:repeat|print|reveal|show) (?:me )?(?:the |your )?(?:text|words|instructions|prompt) above|"
    r"your (?:initial|original|hidden) (?:instructions|prompt)|developer message",
    ("prompt", "instructions", "above", "developer message"),
)
_REASONING_FIELDS = ("reasoning_effort", "reasoning", "thinking", "include_reasoning")
UNMARKED_MIN_CHARS = 600  # an answer with this much text that the watermark read and found no site in avoided prose
END_WORDS = 6  # words of a prompt's opening and of its closing that are kept
END_BYTES = 2 * END_WORDS  # an end's word hashes, packed (_word_hashes)


# Not frozen, like Seen and signals.Signals: one of each is made per request, and a frozen dataclass takes
# about three times as long to make (3.1 against 1.1 µs for fifteen fields here).
@dataclass(slots=True)
class Observation:
    identity: str
    tenant: str
    time: float
    prefix: str  # skeleton hashes (8 hex digits each)
    suffix: str
    message: str  # the whole latest message's hash: the fill of its two ends together (a slot between them)
    owner: str  # whose account it is across accounts: its tenant's (one organisation's keys are one), or its own
    words: int
    reasoning: bool
    probe: bool
    unmarked: bool
    network: str  # the client's /24 (IPv4) or /48 (IPv6): where accounts behind one proxy meet
    opening: bytes  # its first END_WORDS words, two bytes each (_word_hashes), padded with zero bytes
    closing: bytes  # of its last words


@dataclass(slots=True)
class Seen:
    """What `features` needs of an exchange, taken in constant time on the request path; the text work
    (words, hashes, patterns, the network) is left to the engine's background task."""

    identity: Identity
    time: float
    admitted: float  # when admission read the identity's tier, on the same clock as `time`
    prompt: str  # at most READ_CHARS of it (_readable)
    unread: int  # characters of the prompt left out
    question: str  # at most READ_CHARS of it
    reasoning_asked: bool  # a reasoning field in the request
    unmarked: bool
    client_ip: str


def seen(exchange: Exchange, now: float) -> Seen | None:
    """The exchange as the engine keeps it, or None when it says nothing about its caller (no identity, not
    a model call)."""
    identity = exchange.identity
    if identity is None or exchange.route is None or not exchange.admitted:
        return None
    request = exchange.request or {}
    prompt, unread = _readable(exchange.prompt_text)
    return Seen(
        identity,
        now,
        now - (time.perf_counter() - exchange.started),  # the request's start: admission follows within it
        prompt,
        unread,
        _readable(exchange.question)[0],
        any(request.get(f) for f in _REASONING_FIELDS),
        exchange.structured or _prose_free(exchange.marks),
        exchange.client_ip,
    )


def _readable(text: str) -> tuple[str, int]:
    """(the text, or its first and last READ_CHARS / 2 characters; how many were left out)."""
    if len(text) <= READ_CHARS:
        return text, 0
    half = READ_CHARS // 2
    return f"{text[:half]}\n{text[-half:]}", len(text) - READ_CHARS


def _prose_free(marks: list[dict]) -> bool:
    """The lexical watermark (whose records count sites) read UNMARKED_MIN_CHARS or more of the answer's text and
    found no site in it. With the watermark off there is no such record, and nothing is said."""
    read = [mark for mark in marks if "sites" in mark]
    chars = sum(mark.get("chars", 0) for mark in read)
    return bool(read) and not any(mark["sites"] for mark in read) and chars >= UNMARKED_MIN_CHARS


def features(found: Seen) -> Observation:
    text = folded(found.prompt)
    words = _WORD.findall(text)
    question = folded(found.question)
    asked = (words if question == text else _WORD.findall(question)) or words  # most prompts are one message
    head, tail = (asked[:6], asked[-6:]) if len(asked) >= 12 else (asked, asked)
    return Observation(
        identity=caller(found.identity),
        tenant=found.identity.tenant or "",
        time=found.time,
        prefix=_hash(head),
        suffix=_hash(tail),
        message=_hash(asked),
        owner=f"t:{found.identity.tenant}" if found.identity.tenant else caller(found.identity),
        words=len(words) + found.unread // 6,
        reasoning=found.reasoning_asked or _REASONING.search(text),
        probe=_PROBE.search(question),
        unmarked=found.unmarked,
        network=network_of(found.client_ip),
        opening=_word_hashes(asked[:END_WORDS]),
        closing=_word_hashes(asked[-END_WORDS:]),
    )


# Letters of other scripts that read as Latin ones (the common ones of Unicode's confusables; capitals and
# small letters each as they look: a Cyrillic capital Т is a T, its small т no t), and characters that show
# nothing: a template with its letters swapped for these at random reads the same to a person, and its words
# hashed differently at every request (100 accounts sweeping one stayed in `watch`; review)
_LOOKALIKES = str.maketrans(
    "аеорсхуіјѕԁһӏԛԝүкАВЕКМНОРСТХУІЈЅαορνικυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",  # Cyrillic, then Greek
    "aeopcxyijsdhlqwykABEKMHOPCTXYIJSaopvikuxABEZHIKMNOPTYX",
    "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff",
)


def folded(text: str) -> str:
    """The text as its words are compared: lower case and, beyond ASCII, in NFKC (fullwidth and mathematical
    letters as plain ones) with look-alike letters read as the Latin ones and invisible characters dropped."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).translate(_LOOKALIKES).lower()


def caller(identity: Identity) -> str:
    """Whose signals these are: the identity's name and when it was registered, so that a name revoked and
    registered anew starts afresh (a new customer is not scored on the last holder's requests)."""
    return f"{identity.name}@{identity.registered:.3f}" if identity.registered else identity.name


def observe(exchange: Exchange, now: float) -> Observation | None:
    """The exchange's features at once (`seen`, then `features`)."""
    found = seen(exchange, now)
    return None if found is None else features(found)


def _word_hashes(words: list[str]) -> bytes:
    """Each word as two bytes (a 16-bit hash), padded with zero bytes (no word). Only which are equal is asked of
    them, so their byte order does not matter; no byte of a word's hash is 0, so that the padding words are
    the only two zero bytes in a row and `bytes.count` finds them (signals.variety)."""
    return b"".join(map(_word_hash, words)).ljust(END_BYTES, b"\0")


@functools.lru_cache(maxsize=65536)  # words recur
def _word_hash(word: str) -> bytes:
    crc = zlib.crc32(word.encode())  # CRC-32: the same in every process, unlike hash()
    return bytes((crc % 255 + 1, (crc >> 8) % 255 + 1))  # two bytes, neither 0


def _hash(words: list[str]) -> str:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=4).hexdigest()


@functools.lru_cache(maxsize=65536)  # parsing took 19 of a request's 49 µs of features here; clients come back
def network_of(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
