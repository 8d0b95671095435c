"""The transform stage that marks every answer: each site's member becomes the key's preferred one.

Every text part of every choice is marked (n > 1 included); code, quotations, structured output, tool
calls and thinking blocks are never touched (the protocols never offer the last two as text, and the
scanner skips the rest). Each part's record lists how many sites it had and how many it changed, with the
scheme, epoch, key fingerprint and word-set version, so that the evidence says what was applied.
"""

from __future__ import annotations

from ..exchange import Exchange
from .scheme import SCHEME, LexicalKey
from .sites import Scanner, prompt_trigrams

GENERATING_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


class LexicalWatermark:
    def __init__(self, key: LexicalKey) -> None:
        self.key = key
        self._sets = key.sets

    def applies(self, exchange: Exchange) -> bool:
        return exchange.route in GENERATING_ROUTES and not exchange.structured

    def rewriter(self, exchange: Exchange, part: tuple) -> _Marker:
        return _Marker(self, exchange, part)

    def mark(self, text: str, prompt: str = "") -> str:
        """The whole text, marked: what a stream of it gives, in any pieces."""
        scanner = self._scanner(prompt)
        return scanner.feed(text) + scanner.flush()

    def _scanner(self, prompt: str) -> Scanner:
        trigrams = prompt_trigrams(prompt, self._sets) if prompt else frozenset()
        preferred = self.key.preferred
        return Scanner(self._sets, trigrams, lambda site: preferred[site.set_index])


class _Marker:
    """One part's rewriter (the TextRewriter the pipeline drives); records the part's marks at its end."""

    __slots__ = ("_mark", "_exchange", "_part", "_scanner")

    def __init__(self, mark: LexicalWatermark, exchange: Exchange, part: tuple) -> None:
        self._mark = mark
        self._exchange = exchange
        self._part = part
        self._scanner = mark._scanner(exchange.prompt_text)

    def feed(self, text: str) -> str:
        return self._scanner.feed(text)

    def flush(self) -> str:
        out = self._scanner.flush()
        sites = self._scanner.sites
        if sites or not self._exchange.marks:
            key = self._mark.key
            self._exchange.marks.append(
                {
                    "scheme": SCHEME,
                    "epoch": key.epoch,
                    "key": key.fingerprint,
                    "sets": key.sets.version[:16],
                    "part": list(self._part),
                    "sites": len(sites),
                    "changed": self._scanner.changed,
                }
            )
        return out

    @property
    def holding(self) -> bool:
        return self._scanner.holding
