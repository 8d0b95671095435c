"""What the pipeline needs to know about one API and each of its routes.

An `Api` renders errors in its own shape and names the header that carries its credential. A `Dialect`
(one per route) reads the few request facts the gateway needs, and points at every text-bearing part of
an answer, whole or streamed, as `Slot`s that a transform may rewrite in place.
"""

from __future__ import annotations

import contextlib
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .. import jsonio
from ..exchange import ErrorKind, GatewayError, Quota
from .sse import SSEEvent


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
    max_output: int | None = None  # the output token limit the request sets, if any (per choice)
    choices: int = 1  # answers the upstream writes for it (n, best_of): each up to max_output


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


# The largest output limit a request may set: the limits count tokens in doubles (in memory and in Redis's
# script), exact to 2**53; a larger integer (JSON allows a thousand digits) is no token count.
MAX_TOKEN_COUNT = 2**53
MAX_CHOICES = 128  # n, as OpenAI allows it


class Dialect:
    """One route of one API. Subclasses override what their shapes need."""

    api: Api | None = None  # whose route this is; None where both APIs share the path (/v1/models)
    streams = False  # whether `stream: true` is meaningful on this route
    method = "POST"
    output_fields: tuple[str, ...] = ()  # the request fields that limit output tokens; the first is the one set
    takes_logit_bias = False  # whether the route's API accepts a per-token `logit_bias` (the sampling-bias mark)
    # Where an answer's token usage is: the `usage` of the body or of a streamed event's data, and of these of
    # its top-level objects (OpenAI chat and completions: the body, or the last chunk; Responses: `response`
    # in response.completed; Anthropic: `message` in message_start, and message_delta's own). Never deeper.
    usage_holders: tuple[str, ...] = ()
    choice_fields: tuple[str, ...] = ()  # the request fields that ask for several answers (n, best_of)
    conversation: str | None = None  # the request field holding its messages (each with a role and content)

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'model' must be a string")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise GatewayError(ErrorKind.INVALID_REQUEST, "'stream' must be true or false")
        # the output limit (per answer: the smallest of the fields that set one) and how many answers the
        # upstream writes (the largest: best_of writes that many and returns n of them)
        limits = _integers(body, self.output_fields, 0, MAX_TOKEN_COUNT, "2**53")
        choices = _integers(body, self.choice_fields, 1, MAX_CHOICES, str(MAX_CHOICES))
        return RequestFacts(model, stream and self.streams, min(limits, default=None), max(choices, default=1))

    def usage(self, data: Any) -> dict[str, Any] | None:
        """The usage one decoded answer (or one event's data) reports, where this route puts it."""
        found: dict[str, Any] = {}
        for holder in (data, *(data.get(name) for name in self.usage_holders)) if isinstance(data, dict) else ():
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                found.update(holder["usage"])
        return found or None

    def cap_output(self, body: dict[str, Any], cap: int) -> bool:
        """Make the request ask for at most `cap` output tokens; whether the body changed (a route that
        generates nothing, embeddings, has no such field)."""
        if not self.output_fields:
            return False
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

    def structured_output(self, body: dict[str, Any], fields: tuple[str, ...] = ()) -> bool:
        """Whether the request asks for structured output (JSON mode or a schema) rather than prose; `fields`:
        the constrained-decoding fields beyond the API's own that the upstream honours (protocols.openai)."""
        return False

    def free_ending(self, body: dict[str, Any]) -> bool:
        """Whether the answer ends where the model ends its own prose, so that a line may follow it (a canary):
        not where a tool call may come after the text, the text continues the request's own (a completion,
        an assistant turn the client began), or cited passages split it into several parts."""
        return not _asks_tools(body) and not _prefilled(self._messages(body))

    def cites_by_offset(self, body: dict[str, Any]) -> bool:
        """Whether the answer may cite its sources by character offsets into its own text (OpenAI's web and file
        search annotations): a rewritten text would leave each citation pointing at other words."""
        return False

    def asks_logprobs(self, body: dict[str, Any]) -> bool:
        """Whether the request asks for log-probabilities (which would reveal the unmarked tokens)."""
        return False

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        """Remove the request's ask for log-probabilities."""

    def drop_logprobs(self, data: Any) -> bool:
        """Empty the log-probabilities an answer (or one streamed event's data) carries; whether any were there.
        An upstream may send them unasked: they would show the tokens the mark replaced."""
        return False

    def prompt_text(self, body: dict[str, Any]) -> str:
        return ""

    def question(self, body: dict[str, Any]) -> str:
        """The caller's own latest words: the last user message's text (the whole prompt where there are no
        messages). Not the system prompt nor the history, which an honest app repeats on every request."""
        return _last_user_text(self._messages(body)) if self.conversation else self.prompt_text(body)

    def _messages(self, body: dict[str, Any]) -> Any:
        return body.get(self.conversation) if self.conversation else None

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        return []

    def new_stream_state(self) -> Any:
        return None

    def event_slots(self, state: Any, name: str | None, data: Any) -> list[Slot]:
        return []

    def is_terminal(self, raw: bytes) -> bool:
        """Whether this raw event ends the stream (the gateway records the exchange before sending it)."""
        return False

    def is_failure(self, raw: bytes) -> bool:
        """Whether this terminal event is the upstream's report that it failed (the exchange did not complete)."""
        return False

    def finished_at(self, raw: bytes) -> bool:
        """Whether a stream whose body ended cleanly after this event, without the terminal one, still gave its
        whole answer (some servers end where their last event says the answer finished)."""
        return False

    def stream_error_event(self, api: Api, error: GatewayError) -> bytes:
        return api.stream_error_event(error)


def _integers(body: dict[str, Any], names: tuple[str, ...], low: int, high: int, spelt: str) -> list[int]:
    """The values the request sets of `names`, each an integer from `low` to `high` (`spelt` so), else a 400."""
    values = []
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise GatewayError(ErrorKind.INVALID_REQUEST, f"'{name}' must be an integer from {low} to {spelt}")
        values.append(value)
    return values


def _asks_tools(body: dict[str, Any]) -> bool:
    """The request offers the model tools (or the functions that came before them, or MCP servers, whose tools
    Anthropic's connector calls in the middle of the answer) and lets it call them."""
    offered = body.get("tools") or body.get("functions") or body.get("mcp_servers")
    return bool(offered) and body.get("tool_choice") != "none"


def _prefilled(messages: Any) -> bool:
    """The last message is the assistant's, with text the answer is to continue."""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("role") == "assistant" and bool(text_of(messages[-1].get("content")).strip())
    return False


def _last_user_text(messages: Any) -> str:
    """The text of the last message whose role is "user" in a list of messages (either API's shape)."""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    return ""


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
# a usage object, not `"usage": null` (which every chunk of an OpenAI stream that asks for usage carries)
_USAGE_OBJECT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')


def usage_of(answer: bytes, stream: bool, dialect: Dialect) -> dict[str, Any] | None:
    """Token usage an answer reports, whole or streamed, merged in order of appearance, read only where its
    API puts it (`Dialect.usage_holders`): model-written JSON, such as an Anthropic tool's input, may hold a
    `usage` key of its own, which must not settle the caller's token budget. Only the documents (the body,
    or the streamed events) that hold a `usage` key are decoded."""
    if stream:
        documents = [SSEEvent.parse(raw).data for raw in _events_holding(answer, _USAGE_OBJECT)]
    else:
        documents = [answer] if _USAGE_KEY in answer else []
    usage: dict[str, Any] = {}
    for document in documents:
        try:
            data = jsonio.read(document)[0]
        except ValueError:  # not JSON, or nested too deeply to read: no usage from it
            continue
        usage.update(dialect.usage(data) or {})
    return usage or None


_BLANK_LINE = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # what ends an SSE event, whatever its line ends


def _events_holding(stream: bytes, key: re.Pattern) -> list[bytes]:
    """The events of an SSE stream in which `key` occurs, found around each occurrence with searches at C speed
    (cutting a 300-event answer into events first took 280 µs), their line ends made LF as SSEFramer makes them."""
    blanks = (b"\n\n", b"\r\n\r\n", b"\r\r") if b"\r" in stream else (b"\n\n",)
    events, end = [], 0
    while (found := key.search(stream, end)) is not None:
        at = found.start()
        start = max((blank + len(b) for b in blanks if (blank := stream.rfind(b, 0, at)) >= 0), default=0)
        after = _BLANK_LINE.search(stream, at)
        end = after.end() if after is not None else len(stream)
        events.append(stream[start:end].replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    return events


def estimate_tokens(body: bytes, request: Any) -> int:
    """An upper estimate of a request's prompt tokens before the upstream counts them: the UTF-8 bytes of the
    request over three (a token is rarely under three bytes: English averages about four characters, CJK one
    character of three bytes). All of the request, not the messages' text alone: tools, tool results and every
    other field are prompt too; read as decoded (a client's \\u escapes are six bytes for a character of three),
    less the base64 of images and audio in messages, which the upstream counts by the image, not its size
    (a PDF's base64 stays in: its pages are read as text too). Admission reserves this much and the real
    count corrects it."""
    size = len(body)
    if b"\\u" in body:
        with contextlib.suppress(ValueError):  # too deep to write again: the body as sent, then
            size = len(jsonio.dumps(request))
    if b"base64" in body or b'"input_audio"' in body:
        size -= sum(map(len, _media(request)))
    return -(-max(size, 0) // 3)


_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")
_MEDIA_URI = re.compile(r"data:(?:image|audio)/[\w.+-]+;base64,")


def _media(request: Any) -> list[str]:
    """The base64 images and audio in the request's messages, where each API puts them: an image_url part's url
    and a Responses input_image's image_url (data URIs of an image), an input_audio part's data, an Anthropic
    image's base64 source (in a message or a tool result). Each wholly base64, or it is text, and counts."""
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        messages = request.get("input") if isinstance(request, dict) else None
    parts = [p for m in messages if isinstance(m, dict) for p in _parts(m)] if isinstance(messages, list) else []
    parts += [q for p in parts if p.get("type") == "tool_result" for q in _parts(p)]
    found = []
    for part in parts:
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str) and (head := _MEDIA_URI.match(url)) and _BASE64.fullmatch(url, head.end()):
                found.append(url)
        elif kind in ("input_audio", "image"):
            holder = part.get("input_audio") if kind == "input_audio" else part.get("source")
            if not isinstance(holder, dict):  # no source, or one of another shape: the upstream's to refuse
                continue
            data = holder.get("data")
            base64 = kind == "input_audio" or holder.get("type") == "base64"
            if isinstance(data, str) and base64 and _BASE64.fullmatch(data):
                found.append(data)
    return found


def _parts(holder: dict) -> list[dict]:
    content = holder.get("content")
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def total_tokens(usage: dict[str, Any] | None) -> int | None:
    """Prompt plus completion tokens, in either API's usage shape (Anthropic counts cached input apart)."""
    if not usage:
        return None
    if _is_count(usage.get("total_tokens")):
        return usage["total_tokens"]
    names = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
             "cache_creation_input_tokens", "cache_read_input_tokens")  # fmt: skip
    counts = [usage[name] for name in names if _is_count(usage.get(name))]
    return min(sum(counts), MAX_TOKEN_COUNT) if counts else None


def _is_count(value: Any) -> bool:
    """A token count an upstream could mean: a whole number from 0 to MAX_TOKEN_COUNT (not a bool, nor a negative
    count, which would refund beyond the reservation, nor one past what the limits' doubles hold)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT


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
