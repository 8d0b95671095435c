"""The transform stage until marks land: answers pass through untouched.

`applies()` returning False lets the pipeline forward bytes without decoding a single event, so the
pass-through costs nothing.
"""

from __future__ import annotations

from .exchange import Exchange
from .stages import Commitment, TextRewriter


class PassThrough:
    def commitments(self) -> list[Commitment]:
        return []

    def applies(self, exchange: Exchange) -> bool:
        return False

    def rewriter(self, exchange: Exchange, part: tuple) -> TextRewriter | None:
        return None
