"""What the pipeline needs to know about one API and each of its routes.

An `Api` renders errors in its own shape and names the header that carries its credential. A `Dialect`
(one per route) reads the few request facts the gateway needs, and points at every text-bearing part of
an answer, whole or streamed, as `Slot`s that a transform may rewrite in place.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..exchange import ErrorKind, GatewayError, Quota


class SlotKind(Enum):
    DELTA = "delta"  # a piece of a part's text, in order
    END = "end"  # the part is complete: flush what a rewriter holds back
    AGGREGATE = "aggregate"  # the whole text of a part so far, repeated (Responses API *.done events)


@dataclass(slots=True)
class Slot:
    """A place in a decoded JSON document that carries the text of one part (a choice, a content block)."""

    kind: SlotKind
    part: tuple
    holder: dict | None = None
    field: str = ""

    @property
    def text(self) -> str:
        value = self.holder.get(self.field) if self.holder is not None else None
        return value if isinstance(value, str) else ""

    def set(self, text: str) -> None:
        if self.holder is not None and (text or self.field in self.holder):
            self.holder[self.field] = text


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str | None
    stream: bool
    max_output: int | None = None  # the output token limit the request sets, if any


class Api(ABC):
    """One API family's wire conventions: credentials and error shapes."""

    name: str
    upstream_auth_header: str

    def upstream_auth_value(self, key: str) -> str:
        return key

    @abstractmethod
    def error_body(self, error: GatewayError) -> dict[str, Any]: ...

    @abstractmethod
    def stream_error_event(self, error: GatewayError) -> bytes: ...

    @abstractmethod
    def rate_limit_headers(self, quotas: tuple[Quota, ...]) -> list[tuple[bytes, bytes]]:
        """The limits in force, in this API's own headers and the IETF RateLimit fields."""


class Dialect:
    """One route of one API. Subclasses override what their shapes need."""

    api: Api | None = None  # whose route this is; None where both APIs share the path (/v1/models)
    streams = False  # whether `stream: true` is meaningful on this route
    method = "POST"
    output_fields: tuple[str, ...] = ()  # the request fields that limit output tokens; the first is the one set
    takes_logit_bias = False  # whether the route's API accepts a per-token `logit_bias` (the sampling-bias mark)

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'model' must be a string")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'stream' must be true or false")
        return RequestFacts(model, stream and self.streams, self._max_output(body))

    def _max_output(self, body: dict[str, Any]) -> int | None:
        limits = []
        for name in self.output_fields:
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GatewayError(ErrorKind.INVALID_REQUEST, f"'{name}' must be a non-negative integer")
            limits.append(value)
        return min(limits) if limits else None

    def cap_output(self, body: dict[str, Any], cap: int) -> bool:
        """Make the request ask for at most `cap` output tokens; whether the body changed."""
        present = [name for name in self.output_fields if body.get(name) is not None]
        if not present:
            body[self.output_fields[0]] = cap
            return True
        changed = False
        for name in present:
            if body[name] > cap:
                body[name] = cap
                changed = True
        return changed

    def ask_usage(self, body: dict[str, Any]) -> bool:
        """Make a streamed request report its token usage; True if the client did not ask for it (the
        pipeline then keeps the usage event from the client)."""
        return False

    def is_usage_only(self, raw: bytes) -> bool:
        """Whether a raw event carries nothing but usage (the kind `ask_usage` added)."""
        return False

    def structured_output(self, body: dict[str, Any]) -> bool:
        """Whether the request asks for structured output (JSON mode or a schema) rather than prose."""
        return False

    def asks_logprobs(self, body: dict[str, Any]) -> bool:
        """Whether the request asks for log-probabilities (which would reveal the unmarked tokens)."""
        return False

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        """Remove the request's ask for log-probabilities."""

    def prompt_text(self, body: dict[str, Any]) -> str:
        return ""

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        return []

    def new_stream_state(self) -> Any:
        return None

    def event_slots(self, state: Any, name: str | None, data: Any) -> list[Slot]:
        return []

    def is_terminal(self, raw: bytes) -> bool:
        """Whether this raw event ends the stream (the gateway records the exchange before sending it)."""
        return False

    def stream_error_event(self, api: Api, error: GatewayError) -> bytes:
        return api.stream_error_event(error)


def text_of(content: Any) -> str:
    """The plain text of a message content: a string, or a list of typed parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


_USAGE_KEY = b'"usage"'
_DECODER = json.JSONDecoder()


def usage_of(body: bytes) -> dict[str, Any] | None:
    """Token usage reported in an answer, whole or streamed, of either API, merged in order of appearance.

    Both APIs report it as a `"usage": {...}` object (OpenAI chat once, in the body or the last chunk;
    Responses in response.completed; Anthropic in message_start and again, for output, in message_delta),
    so the objects are decoded where they stand rather than parsing the whole answer."""
    usage: dict[str, Any] = {}
    start = 0
    while (at := body.find(_USAGE_KEY, start)) >= 0:
        start = at + len(_USAGE_KEY)
        colon = body.find(b":", start)
        try:
            value, _ = _DECODER.raw_decode(body[colon + 1 : colon + 4096].decode("utf-8", "replace").lstrip())
        except ValueError:
            continue
        if isinstance(value, dict):
            usage.update(value)
    return usage or None


def estimate_tokens(text: str) -> int:
    """An upper estimate of a prompt's tokens before the upstream counts them: a token is rarely under
    three bytes of UTF-8 (English averages about four characters; CJK about one character of three
    bytes). Admission reserves this much and the real count corrects it."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // 3)


def total_tokens(usage: dict[str, Any] | None) -> int | None:
    """Prompt plus completion tokens, in either API's usage shape (Anthropic counts cached input apart)."""
    if not usage:
        return None
    if isinstance(usage.get("total_tokens"), int):
        return usage["total_tokens"]
    names = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
             "cache_creation_input_tokens", "cache_read_input_tokens")  # fmt: skip
    counts = [usage[name] for name in names if isinstance(usage.get(name), int)]
    return sum(counts) if counts else None


def binding_quota(quotas: tuple[Quota, ...], unit: str) -> Quota | None:
    """The limit of a unit that runs out first: the one an API's single set of headers reports."""
    candidates = [q for q in quotas if q.unit == unit]
    return min(candidates, key=lambda q: (q.remaining, q.reset_s)) if candidates else None


def ietf_rate_headers(quotas: tuple[Quota, ...]) -> list[tuple[bytes, bytes]]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers): every limit in force."""
    policies, states = [], []
    for q in quotas:
        if q.unit == "concurrent":
            name = "concurrency"
            policies.append(f'"{name}";q={q.limit};qu="concurrent-requests"')
            states.append(f'"{name}";r={q.remaining}')
            continue
        name = f"{q.unit}-{q.window_s}s"
        unit = ';qu="tokens"' if q.unit == "tokens" else ""
        policies.append(f'"{name}";q={q.limit};w={q.window_s}{unit}')
        states.append(f'"{name}";r={q.remaining};t={math.ceil(q.reset_s)}')
    if not policies:
        return []
    return [(b"ratelimit-policy", ", ".join(policies).encode()), (b"ratelimit", ", ".join(states).encode())]
