"""Asking the upstream for the sampling-bias mark: the request side of the transform stage.

Routes whose API takes `logit_bias` (OpenAI's chat completions and completions) get the epoch's green list
merged into the request: the client's own entries win, and ours fill what remains of the 300 the API
allows. Structured output is left alone (a bias could bend JSON), and so are models that refuse the
parameter: reasoning models by name (`skip_models`), and any model whose upstream answers 400 about
`logit_bias`, which is then asked again without it and skipped from then on. The request is never
broken by the mark.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..exchange import Exchange
from .green import SCHEME, GreenList

API_LIMIT = 300  # logit_bias entries OpenAI accepts


class SamplingBias:
    def __init__(self, green: GreenList, vocabulary_digest: str, skip_models: tuple[str, ...]) -> None:
        self._green = green
        self._vocabulary = vocabulary_digest
        self._skip = skip_models
        self._refusing: set[str] = set()  # models whose upstream refused the parameter

    def commitments(self) -> list[tuple[dict, dict[str, bytes]]]:
        green = self._green
        return [
            (
                {
                    "subject": "sampling-bias-key",
                    "scheme": SCHEME,
                    "epoch": green.epoch,
                    "fingerprint": green.fingerprint,
                    "size": len(green.words),
                    "pool": green.pool,
                },
                {},
            ),  # fmt: skip
            ({"subject": "tokenizer", "scheme": SCHEME, "digest": self._vocabulary}, {}),
        ]

    def request(self, exchange: Exchange, dialect) -> dict | None:
        """The upstream request with the green list's bias, or None where the route or the model cannot take it."""
        model = exchange.model or ""
        if not dialect.takes_logit_bias or exchange.structured or model in self._refusing:
            return None
        if any(fnmatchcase(model, pattern) for pattern in self._skip):
            return None
        theirs = exchange.request.get("logit_bias")
        if theirs is not None and not isinstance(theirs, dict):
            return None  # malformed: the upstream will say so, about the client's own value
        ours = [(token, bias) for token, bias in self._green.bias.items() if token not in (theirs or {})]
        ours = ours[: max(0, API_LIMIT - len(theirs or {}))]
        if not ours:
            return None
        exchange.marks.append({"scheme": SCHEME, "epoch": self._green.epoch, "tokens": len(ours)})
        return {**exchange.request, "logit_bias": {**dict(ours), **(theirs or {})}}

    def refused(self, exchange: Exchange, body: bytes) -> bool:
        """Whether the upstream's 400 was about the bias: if so the model is skipped from now on, and the
        exchange no longer claims the mark."""
        if b"logit_bias" not in body and b"logit bias" not in body.lower():
            return False
        self._refusing.add(exchange.model or "")
        exchange.marks[:] = [m for m in exchange.marks if m.get("scheme") != SCHEME]
        return True
