"""The transform stage that marks every answer: each site's member becomes the key's preferred one.

Every text part of every choice is marked (n > 1 included); code, quotations, structured output, tool
calls and thinking blocks are never touched (the protocols never offer the last two as text, and the
scanner skips the rest). Each part's record lists how many sites it had and how many it changed, with the
scheme, epoch, key fingerprint and word-set version, so that the evidence says what was applied.
"""

from __future__ import annotations

from ..exchange import Exchange
from .scheme import SCHEME, LexicalKey, detector_digest
from .sites import Scanner
from .whole import WholeText

GENERATING_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


class LexicalWatermark:
    def __init__(self, key: LexicalKey) -> None:
        self.key = key
        self._sets = key.sets
        self._whole = WholeText(key.sets)
        self._choose = lambda site: key.preferred[site.set_index]

    def commitments(self) -> list[tuple[dict, dict[str, bytes]]]:
        """The epoch's key (a salted commitment, opened only on disclosure), the word sets and the detector,
        so that a later detection is seen to use what was fixed before any answer was marked."""
        key = self.key
        return [
            (
                {"subject": "watermark-key", "scheme": SCHEME, "epoch": key.epoch, "fingerprint": key.fingerprint},
                {"watermark_key": key.secret},
            ),
            ({"subject": "word-sets", "digest": self._sets.version}, {}),
            ({"subject": "detector", "scheme": SCHEME, "digest": detector_digest()}, {}),
        ]

    def applies(self, exchange: Exchange) -> bool:
        return exchange.route in GENERATING_ROUTES and not exchange.structured and not exchange.cited

    def rewriter(self, exchange: Exchange, part: tuple) -> _Marker:
        return _Marker(self, exchange, part)

    def mark(self, text: str, prompt: str = "") -> str:
        """The whole text, marked: what a stream of it gives, in any pieces."""
        return self.scan_whole(text, prompt)[0]

    def scan_whole(self, text: str, prompt: str) -> tuple[str, list, int]:
        """(marked text, sites, sites changed) of a whole part."""
        return self._whole.scan(text, self._trigrams(prompt), self._choose)

    def _trigrams(self, prompt: str) -> frozenset:
        return self._whole.prompt_trigrams(prompt) if prompt else frozenset()

    def _scanner(self, prompt: str) -> Scanner:
        return Scanner(self._sets, self._trigrams(prompt), self._choose)


class _Marker:
    """One part's rewriter (the TextRewriter the pipeline drives); records the part's marks at its end."""

    __slots__ = ("_mark", "_exchange", "_part", "_scanner", "_chars")

    def __init__(self, mark: LexicalWatermark, exchange: Exchange, part: tuple) -> None:
        self._mark = mark
        self._exchange = exchange
        self._part = part
        self._scanner: Scanner | None = None  # made at the first piece of a stream
        self._chars = 0  # of the part's text: whether an answer with no site was prose-free or short

    def feed(self, text: str) -> str:
        if self._scanner is None:
            self._scanner = self._mark._scanner(self._exchange.prompt_text)
        self._chars += len(text)
        return self._scanner.feed(text)

    def flush(self) -> str:
        if self._scanner is None:
            return ""
        out = self._scanner.flush()
        self._record(len(self._scanner.sites), self._scanner.changed)
        return out

    def whole(self, text: str) -> str:
        marked, sites, changed = self._mark.scan_whole(text, self._exchange.prompt_text)
        self._chars = len(text)
        self._record(len(sites), changed)
        return marked

    def _record(self, sites: int, changed: int) -> None:
        key = self._mark.key
        self._exchange.marks.append(
            {
                "scheme": SCHEME,
                "epoch": key.epoch,
                "key": key.fingerprint,
                "sets": key.sets.version[:16],
                "part": list(self._part),
                "sites": sites,
                "changed": changed,
                "chars": self._chars,
            }
        )

    @property
    def holding(self) -> bool:
        return self._scanner is not None and self._scanner.holding
