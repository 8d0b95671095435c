"""The canary stage: wraps the transform (the watermark) and ends the prose of chosen answers with a canary.

Who gets canaries: identities in the tiers of `[canaries] density` (a share of their answers, higher for
higher tiers) and those listed by name or tenant (every answer). Which answers: a keyed coin on the
request id. Which requests: those whose answer ends with the model's own prose (Dialect.free_ending: no
tools it may call after its text, no completion or assistant turn it continues, no cited passages that
split it), not structured output (JSON mode, schemas, guided decoding), and not after a question about
death, grief, illness or harm (a cheerful line there would do harm; the list of such words is short and will
miss some). Where: after the last text of the answer's first text part that can take it, on a line of
its own: not a part with no text, nor one that ends inside code (a fenced block, or an HTML code element or
a <think> left open: _Code),
nor one that is data (it starts with { or [: JSON asked for in the prompt alone);
thinking blocks are never text parts. Every canary served is recorded on the exchange
(its id, epoch and part), and so in the evidence log's end entry, whose sealed response holds the exact
context it was served in.

In a stream, the last character of each piece is held back until the next one (so that the piece that
ends the part can carry the canary); only canaried answers pay that.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import NamedTuple

from ..exchange import Exchange
from ..stages import Commitment, TextRewriter, Transform
from ..watermark.sites import CODE_TAGS, fences_after, head_width, indent_width, skipped_line
from .phrases import Canary, canaries_of

# A cheerful closing line would be out of place, even hurtful, after these: such answers carry no canary.
SOMBRE = re.compile(
    r"\b(?:die[ds]?|dying|death|dead|funeral|grie(?:f|ving|ve)|mourn\w*|ashes|bereave\w*|condolence\w*|"
    r"passed away|suicid\w*|self[- ]harm|overdose|cancer|terminal(?:ly)? ill|miscarriage|abuse\w*|assault\w*|"
    r"rape|trauma\w*|war crimes?|genocide|hospice|kill(?:ed|ing)? (?:myself|himself|herself|themselves|yourself)|"
    r"murder\w*|end (?:my|his|her|their) life|leuka?emia|tumou?rs?|chemo\w*|holocaust|mass shooting|"
    r"put to sleep|euthana\w*)\b"
)


class CanaryTransform:
    def __init__(self, inner: Transform, key: bytes, epoch: int, count: int, density: dict[str, float],
                 identities: frozenset[str], tenants: frozenset[str]) -> None:  # fmt: skip
        self._inner = inner
        self._key = key
        self._epoch = epoch
        self._count = count
        self._density = density
        self._identities = identities
        self._tenants = tenants
        self._cache: dict[str, list[Canary]] = {}

    def commitments(self) -> list[Commitment]:
        return self._inner.commitments()

    def applies(self, exchange: Exchange) -> bool:
        return self._inner.applies(exchange) or self._chosen(exchange) is not None

    def rewriter(self, exchange: Exchange, part: tuple) -> TextRewriter | None:
        inner = self._inner.rewriter(exchange, part) if self._inner.applies(exchange) else None
        canary = self._chosen(exchange)
        # one canary per answer, in the first text part that takes it
        if canary is None or exchange.canary_claimed or _later_choice(part):
            return inner
        exchange.canary_claimed = True
        return _CanaryRewriter(inner, canary, exchange, part)

    def _chosen(self, exchange: Exchange) -> Canary | None:
        identity = exchange.identity
        if identity is None or exchange.structured or not exchange.free_ending:
            return None
        share = 1.0 if identity.name in self._identities or identity.tenant in self._tenants else 0.0
        share = max(share, self._density.get(identity.tier, 0.0))
        # the prompt (all its messages, so it can be long) is searched only for those who may get a canary
        if share <= 0 or SOMBRE.search(exchange.prompt_text.lower()):
            return None
        coin = hmac.new(self._key, exchange.id.encode(), hashlib.sha256).digest()
        if int.from_bytes(coin[:8], "big") >= share * 2**64:
            return None
        canaries = self._cache.get(identity.name)
        if canaries is None:
            canaries = self._cache[identity.name] = canaries_of(self._key, identity.name, self._epoch, self._count)
        return canaries[coin[8] % len(canaries)]


def _later_choice(part: tuple) -> bool:
    """Whether the part is an answer of n > 1 other than the first: a stream interleaves them, so the first may
    give up the canary (it ends in code) after the others have begun without one; whole, they come in order and
    the next would take it. Only the first carries one, streamed or whole."""
    return part[0] == "choice" and part[1] != 0


class _CanaryRewriter:
    __slots__ = ("_inner", "_canary", "_exchange", "_part", "_held", "_code", "_prose", "_data")

    def __init__(self, inner: TextRewriter | None, canary: Canary, exchange: Exchange, part: tuple) -> None:
        self._inner = inner
        self._canary = canary
        self._exchange = exchange
        self._part = part
        self._held = ""
        self._code = _Code()
        self._prose = False  # whether the part has any text but spaces (a tool call's message has none)
        # whether the part is data (it starts with { or [, as the watermark reads it): JSON asked for in words
        # alone, which a line after it would break for the client's parser; None until its first character
        self._data: bool | None = None

    def feed(self, text: str) -> str:
        out = self._inner.feed(text) if self._inner is not None else text
        if not out:
            return ""
        self._read(out)
        emitted, self._held = self._held + out[:-1], out[-1]
        return emitted

    def flush(self) -> str:
        inner_rest = self._inner.flush() if self._inner is not None else ""
        self._read(inner_rest)
        rest, self._held = self._held + inner_rest, ""
        if not rest:  # nothing held: no event left to carry a canary; a later text part may take it
            self._exchange.canary_claimed = False
            return ""
        return rest + self._suffix()

    def whole(self, text: str) -> str:
        out = self._inner.whole(text) if self._inner is not None else text
        self._read(out)
        return out + self._suffix()

    @property
    def holding(self) -> bool:
        return bool(self._held) or (self._inner is not None and self._inner.holding)

    def _read(self, text: str) -> None:
        self._code.feed(text)
        if self._data is None and (start := text.lstrip()[:1]):
            self._data = start in "{["
        self._prose = self._prose or bool(text.strip())

    def _suffix(self) -> str:
        if self._code.inside or not self._prose or self._data:  # in code or data, or after no text: not here,
            self._exchange.canary_claimed = False  # but a later text part may take it
            return ""
        canary = self._canary
        record = {"id": canary.id, "epoch": canary.epoch, "slot": canary.slot, "part": list(self._part)}
        self._exchange.canaries.append(record)  # only a canary served: a client that left got none
        return "\n\n" + canary.text


class _Code:
    """Whether the text so far ends inside code, read line by line with the watermark's rules: a fenced block
    (watermark.sites.fences_after, which takes CommonMark's reading wherever a list item's indent is in doubt),
    or an HTML element whose text is code (sites.CODE_TAGS: <pre>, <code>, <script>, a <think> a server left in
    the answer) left open; code spans, and the lines the watermark skips (quotes, indented code), where a lone
    backtick opens no span, as it reads them. The line not yet ended is read as if it ended there, so the answer
    is the same whole or in any pieces. (Counting runs instead put a canary inside a block that held
    "text.replace('```', '')".)"""

    __slots__ = ("_pending", "_state")

    def __init__(self) -> None:
        self._pending: list[str] = []  # the line not yet ended, in pieces (joined once it ends)
        self._state = _Reading()

    @property
    def inside(self) -> bool:
        reading = _read_line("".join(self._pending), self._state)
        return bool(reading.fence) or reading.html

    def feed(self, text: str) -> None:
        if "\n" not in text:
            self._pending.append(text)
            return
        *lines, rest = ("".join(self._pending) + text).split("\n")
        for line in lines:
            self._state = _read_line(line, self._state)
        self._pending = [rest]


class _Reading(NamedTuple):
    """Where the text so far leaves the reader, as sites.Scanner's fields of the same names."""

    fence: str = ""  # the character of the fenced block it is in, or ""
    length: int = 0  # its run's length
    indent: int | None = None  # its opening's indent (None: opened within a line)
    inline: int = 0  # the backtick run of the code span it is in (0: none)
    html: bool = False  # within an HTML code element
    blank_before: bool = True  # the last line was blank (or there was none)
    in_code_block: bool = False  # the last line with text was indented code


_CODE_MARKS = re.compile(rf"`+|~{{3,}}|</?(?:{'|'.join(CODE_TAGS)})(?![\w-])", re.IGNORECASE)
_LINE_HEAD = re.compile(r"[\s>]*")
_INDENT = re.compile(r"\s*")


def _read_line(line: str, state: _Reading) -> _Reading:
    fence, length, indent, inline, html, blank_before, in_code_block = state
    if not line.strip():  # a blank line ends a code span
        return state._replace(inline=0, blank_before=True)
    first = _INDENT.match(line).end()
    if fence:  # a fenced block's lines are its own (Scanner._begin_line)
        skipped, in_code_block = False, False
    else:
        skipped, in_code_block = skipped_line(indent_width(line[:first]), line[first], blank_before, in_code_block)
    head_end = _LINE_HEAD.match(line).end()
    width = head_width(line[:head_end])
    for mark in _CODE_MARKS.finditer(line):
        token = mark.group()
        if token[0] == "<":
            if not (fence or inline):
                html = token[1] != "/"
        elif not html:  # HTML's code holds backticks as text
            head = width if mark.start() == head_end else None
            fence, length, indent, inline, closing = fences_after(token, fence, length, indent, inline, skipped, head)
            if closing and not line[mark.end() :].strip():
                fence = ""
    return _Reading(fence, length, indent, inline, html, False, in_code_block)
