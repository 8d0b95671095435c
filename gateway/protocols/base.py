"""What the pipeline needs to know about one API and each of its routes.

An `Api` renders errors in its own shape and names the header that carries its credential. A `Dialect`
(one per route) reads the few request facts the gateway needs, and points at every text-bearing part of
an answer, whole or streamed, as `Slot`s that a transform may rewrite in place.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..exchange import ErrorKind, GatewayError


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


class Dialect:
    """One route of one API. Subclasses override what their shapes need."""

    api: Api | None = None  # whose route this is; None where both APIs share the path (/v1/models)
    streams = False  # whether `stream: true` is meaningful on this route
    method = "POST"

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'model' must be a string")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'stream' must be true or false")
        return RequestFacts(model, stream and self.streams)

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
