"""A test transform that rewrites text in a way that needs lookahead, like a word-level watermark does.

It upper-cases chosen whole words. A word is only known to be whole once the character after it has
arrived, so the trailing partial word is held back: exactly the case the stream rewriter must handle.
"""

from __future__ import annotations

import re

TARGETS = {"the", "fox", "dog", "hello", "demo"}
_WORD = re.compile(r"[A-Za-z]+")


def rewrite_text(text: str) -> str:
    return _WORD.sub(lambda m: m.group(0).upper() if m.group(0).lower() in TARGETS else m.group(0), text)


class WordCaps:
    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        cut = len(text)
        while cut > 0 and text[cut - 1].isalpha():
            cut -= 1
        self._held = text[cut:]
        return rewrite_text(text[:cut])

    def flush(self) -> str:
        out, self._held = rewrite_text(self._held), ""
        return out

    def whole(self, text: str) -> str:
        return self.feed(text) + self.flush()

    @property
    def holding(self) -> bool:
        return bool(self._held)


class SwitchableTransform:
    """The transform stage for tests: while `enabled`, WordCaps on every text part, or with `watermark`
    set, the real lexical watermark (with a fixed test key)."""

    def __init__(self) -> None:
        self.enabled = False
        self.watermark = None

    def commitments(self) -> list:
        return self.watermark.commitments() if self.watermark is not None else []

    def applies(self, exchange) -> bool:
        if self.watermark is not None:
            return self.enabled and self.watermark.applies(exchange)
        return self.enabled

    def rewriter(self, exchange, part):
        if self.watermark is not None:
            return self.watermark.rewriter(exchange, part)
        return WordCaps()
