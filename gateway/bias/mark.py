"""Asking the upstream for the sampling-bias mark: the request side of the transform stage.

Routes whose API takes `logit_bias` (OpenAI's chat completions and completions) get the epoch's green list
in the request. A client's own logit_bias is refused there by default (`client_bias = "refuse"`): with temperature
0, an answer with the mark and one with the client's entries in its place differ first at a favoured token,
so a few hundred pairs of requests would give the list away, to strip the mark or forge it. With "yield", the
client's entries win (those of bias 0 are dropped from the request, as they change nothing, and keep their
token unfavoured) and ours fill what remains of the 300 the API allows. Structured output and tool
calls are left alone (a bias could bend JSON), and so are models that refuse the parameter: reasoning models
by name (`skip_models`), and any model whose upstream refused it. The request is never broken by the mark: a
400 or 422 to the marked request sends the client's own request, whose answer the client gets; the model is
skipped from then on if that went through and the refusal named `logit_bias` (and the client sent none of its
own: a client must not be able to switch the mark off for others).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re

from ..exchange import ErrorKind, Exchange, GatewayError
from .green import SCHEME, GreenList

API_LIMIT = 300  # logit_bias entries OpenAI accepts
MAX_REFUSING = 1000  # models remembered as refusing; model names come from clients, so the set is bounded
log = logging.getLogger("canarygate.bias")


class SamplingBias:
    def __init__(self, green: GreenList, vocabulary_digest: str, skip_models: tuple[str, ...],
                 client_bias: str = "refuse") -> None:  # fmt: skip
        self._green = green
        self._client_bias = client_bias
        self._vocabulary = vocabulary_digest
        self._skip = re.compile("|".join(fnmatch.translate(p) for p in skip_models) or "(?!)")  # one match per request
        self._refusing: set[str] = set()  # models whose upstream refused the parameter (at most MAX_REFUSING)

    def commitments(self) -> list[tuple[dict, dict[str, bytes]]]:
        green = self._green
        key = {"subject": "sampling-bias-key", "scheme": SCHEME, "epoch": green.epoch,
               "fingerprint": green.fingerprint, "size": len(green.words), "pool": green.pool}  # fmt: skip
        return [(key, {}), ({"subject": "tokenizer", "scheme": SCHEME, "digest": self._vocabulary}, {})]

    def applies(self, exchange: Exchange, dialect) -> bool:
        """Whether this exchange's request takes the mark: its route's API accepts logit_bias, the answer is
        prose (no structured output, no tools) and the model is not one that refuses the parameter."""
        model = exchange.model or ""
        request = exchange.request
        if not dialect.takes_logit_bias or exchange.structured or request.get("tools") or request.get("functions"):
            return False
        return model not in self._refusing and not self._skip.match(model)

    def request(self, exchange: Exchange) -> dict | None:
        """The upstream request of an exchange the mark `applies` to, with the green list's bias. A client's own
        logit_bias is refused, or with "yield" its entries win; a client that fills all 300, or sends another form
        than an object (llama.cpp's list of pairs), leaves no room (None), which the evidence records."""
        asked = exchange.request.get("logit_bias")
        if asked is None or asked == [] or asked == {}:  # none: llama.cpp's default is the empty list
            asked = {}
        elif self._client_bias == "refuse":  # in any form: llama.cpp takes a list of pairs, some servers take false
            raise GatewayError(ErrorKind.INVALID_REQUEST, "logit_bias is not accepted by this API")
        elif not isinstance(asked, dict):  # llama.cpp's list of pairs (whose strings are text, not token ids), or
            # malformed: left as the client sent it, unmarked, and the evidence says the mark gave way
            exchange.marks.append({"scheme": SCHEME, "epoch": self._green.epoch, "tokens": 0})
            return None
        theirs = {token: bias for token, bias in asked.items() if not (type(bias) in (int, float) and bias == 0)}
        ours = [(token, bias) for token, bias in self._green.bias.items() if token not in asked]
        ours = ours[: max(0, API_LIMIT - len(theirs))]
        exchange.marks.append({"scheme": SCHEME, "epoch": self._green.epoch, "tokens": len(ours)})
        return {**exchange.request, "logit_bias": {**dict(ours), **theirs}} if ours else None

    def is_refusal(self, exchange: Exchange, body: bytes) -> bool:
        """Whether the upstream's 400 refused the parameter itself: the client sent none of its own (else the
        fault may be theirs), and the error names it, in whatever shape (OpenAI nests it under "error", vLLM's
        older servers do not; some name it only in the message)."""
        if exchange.request.get("logit_bias"):
            return False
        try:
            error = json.loads(body)
        except ValueError:
            return False
        error = error.get("error", error) if isinstance(error, dict) else None
        return isinstance(error, dict) and (
            error.get("param") == "logit_bias" or "logit_bias" in str(error.get("message", ""))
        )

    def marked(self, exchange: Exchange) -> bool:
        """Whether the exchange's request went upstream with the mark (its answer's log-probabilities, which
        would show the favoured tokens, are then removed)."""
        return any(m.get("scheme") == SCHEME for m in exchange.marks)

    def withdraw(self, exchange: Exchange) -> None:
        """The request went upstream without the mark after all: claim none."""
        exchange.marks[:] = [m for m in exchange.marks if m.get("scheme") != SCHEME]

    def note_refusal(self, exchange: Exchange) -> None:
        """The upstream refused the mark and accepted the request without it: skip the model from now on."""
        model = exchange.model or ""
        if model not in self._refusing and len(self._refusing) < MAX_REFUSING:
            self._refusing.add(model)
            log.warning("the upstream refuses logit_bias for model %r: the sampling-bias mark is skipped for it", model)
