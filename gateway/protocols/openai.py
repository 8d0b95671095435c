"""The OpenAI API: error shape, credentials, and where text lives in each route's answers.

Chat completions and legacy completions stream `data:` chunks ending in `[DONE]`; the Responses API
streams typed events and repeats the whole text in its `*.done` and `response.completed` events, which
are exposed as AGGREGATE slots so that they repeat the rewritten text, not the original.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ..exchange import ErrorKind, GatewayError, Quota
from .base import (
    MAX_CHOICES,
    Api,
    Dialect,
    RequestFacts,
    Slot,
    SlotKind,
    binding_quota,
    ietf_rate_headers,
    text_of,
)
from .sse import encode_event, event_name, first_data

_ERROR_TYPES = {
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", "invalid_request"),
    ErrorKind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION: ("invalid_request_error", "permission_denied"),
    ErrorKind.NOT_FOUND: ("invalid_request_error", "unknown_url"),
    ErrorKind.METHOD_NOT_ALLOWED: ("invalid_request_error", "method_not_allowed"),
    ErrorKind.TOO_LARGE: ("invalid_request_error", "request_too_large"),
    ErrorKind.UNSUPPORTED_MEDIA: ("invalid_request_error", "unsupported_media_type"),
    ErrorKind.RATE_LIMITED: ("rate_limit_error", "rate_limit_exceeded"),
    ErrorKind.UPSTREAM_UNAVAILABLE: ("server_error", "upstream_unavailable"),
    ErrorKind.UPSTREAM_AUTH: ("server_error", "upstream_unavailable"),
    ErrorKind.UPSTREAM_OVERLOADED: ("server_error", "upstream_overloaded"),
    ErrorKind.UPSTREAM_TIMEOUT: ("server_error", "upstream_timeout"),
    ErrorKind.UPSTREAM_FAILED: ("server_error", "upstream_error"),
    ErrorKind.UNAVAILABLE: ("server_error", "service_unavailable"),
    ErrorKind.INTERNAL: ("server_error", "internal_error"),
}


class OpenAIApi(Api):
    name = "openai"
    upstream_auth_header = "authorization"

    def upstream_auth_value(self, key: str) -> str:
        return f"Bearer {key}"

    def error_body(self, error: GatewayError) -> dict[str, Any]:
        kind, code = _ERROR_TYPES[error.kind]
        return {"error": {"message": error.message, "type": kind, "param": None, "code": code}}

    def stream_error_event(self, error: GatewayError) -> bytes:
        # Chat and completions clients raise on a data chunk that carries "error".
        return encode_event(json.dumps(self.error_body(error)))

    def rate_limit_headers(self, quotas: tuple[Quota, ...]) -> list[tuple[bytes, bytes]]:
        headers = ietf_rate_headers(quotas)
        for unit in ("requests", "tokens"):
            q = binding_quota(quotas, unit)
            if q is not None:
                headers += [
                    (f"x-ratelimit-limit-{unit}".encode(), str(q.limit).encode()),
                    (f"x-ratelimit-remaining-{unit}".encode(), str(q.remaining).encode()),
                    (f"x-ratelimit-reset-{unit}".encode(), _duration(q.reset_s).encode()),
                ]
        return headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3.5s"."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


API = OpenAIApi()


def _usage_only(raw: bytes) -> bool:
    """A chunk with no choices and a usage object: what `stream_options.include_usage` adds at the end."""
    if b'"usage"' not in raw or b'"choices"' not in raw:
        return False
    _, _, payload = raw.partition(b"data:")
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)


def _finished_at(raw: bytes) -> bool:
    """Chat and completions streams of servers that send no `data: [DONE]` (older TGI and llama.cpp among
    them) end after the chunk whose every choice has its finish_reason, or after the usage chunk that follows."""
    if _usage_only(raw):
        return True
    _, _, payload = raw.partition(b"data:")
    try:
        choices = json.loads(payload).get("choices")
    except (ValueError, AttributeError):
        return False
    return (
        bool(choices)
        and isinstance(choices, list)
        and all(isinstance(c, dict) and c.get("finish_reason") for c in choices)
    )


def _ask_usage(body: dict[str, Any]) -> bool:
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if options is None:
        options = body["stream_options"] = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


# request fields that constrain the output to a grammar or a schema (vLLM's guided decoding)
# constrained decoding: vLLM's guided_* and structured_outputs; llama.cpp's json_schema and grammar; SGLang's regex
# and ebnf (and json_schema). A request with one of them is structured output, which no mark touches: so a field
# the upstream ignores lets a client switch the marks off, and `[upstream] constrained_decoding` lists only those
# the upstream honours.
CONSTRAINED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                      "json_schema", "grammar", "regex", "ebnf")  # fmt: skip


def _json_format(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("type") in ("json_object", "json_schema")


def _constrained(body: dict[str, Any], fields: tuple[str, ...]) -> bool:
    """JSON mode or a schema; the constrained decoding of vLLM, llama.cpp and SGLang (chat and completions) where
    `fields` names it."""
    return _json_format(body.get("response_format")) or any(body.get(name) for name in fields)


# a chunk that carries an error (OpenAI's), or is one (vLLM's, which older versions sent before [DONE])
_ERROR_CHUNKS = (b'{"error"', b'{"object":"error"', b'{"object": "error"')
_TERMINAL_STARTS = (b"[DONE]", *_ERROR_CHUNKS)


def _data_terminal(raw: bytes) -> bool:
    """Chat and completions streams end with `data: [DONE]`, or with an error chunk."""
    return first_data(raw).startswith(_TERMINAL_STARTS)


def _data_error(raw: bytes) -> bool:
    return first_data(raw).startswith(_ERROR_CHUNKS)


_RESPONSE_ENDS = (b"response.completed", b"response.failed", b"response.incomplete", b"error")


class ChatCompletions(Dialect):
    api = API
    conversation = "messages"
    streams = True
    takes_logit_bias = True
    choice_fields = ("n",)
    # max_tokens is deprecated and refused by reasoning models; compatible servers ignore what they lack
    output_fields = ("max_completion_tokens", "max_tokens")

    def ask_usage(self, body: dict[str, Any]) -> bool:
        return _ask_usage(body)

    def structured_output(self, body: dict[str, Any], fields: tuple[str, ...] = CONSTRAINED_FIELDS) -> bool:
        return _constrained(body, fields)

    def cites_by_offset(self, body: dict[str, Any]) -> bool:
        return body.get("web_search_options") is not None

    def asks_logprobs(self, body: dict[str, Any]) -> bool:
        return bool(body.get("logprobs")) or body.get("top_logprobs") is not None

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        body.pop("logprobs", None)
        body.pop("top_logprobs", None)

    def drop_logprobs(self, data: Any) -> bool:
        return _drop_choice_logprobs(data)

    def is_usage_only(self, raw: bytes) -> bool:
        return _usage_only(raw)

    def is_terminal(self, raw: bytes) -> bool:
        return _data_terminal(raw)

    def is_failure(self, raw: bytes) -> bool:
        return _data_error(raw)

    def finished_at(self, raw: bytes) -> bool:
        return _finished_at(raw)

    def prompt_text(self, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return "\n".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        slots = []
        for choice in _choices(body):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                slots.append(Slot(SlotKind.DELTA, ("choice", choice.get("index", 0)), message, "content"))
        return slots

    def event_slots(self, state: Any, name: str | None, data: Any) -> list[Slot]:
        slots = []
        for choice in _choices(data):
            part = ("choice", choice.get("index", 0))
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("content") is None or isinstance(delta["content"], str)):
                slots.append(Slot(SlotKind.DELTA, part, delta, "content"))
            if choice.get("finish_reason") is not None:
                slots.append(Slot(SlotKind.END, part))
        return slots


class Completions(Dialect):
    api = API
    streams = True
    takes_logit_bias = True
    choice_fields = ("n", "best_of")
    output_fields = ("max_tokens",)

    def ask_usage(self, body: dict[str, Any]) -> bool:
        return _ask_usage(body)

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        """As every route's, but a list of prompts writes n answers to each: the reservation counts them all (up
        to MAX_CHOICES, the most the limits' arithmetic takes; the rest is charged when the usage comes)."""
        facts = super().facts(body)
        prompts = _prompt_count(body.get("prompt"))
        return replace(facts, choices=min(facts.choices * prompts, MAX_CHOICES)) if prompts > 1 else facts

    def free_ending(self, body: dict[str, Any]) -> bool:
        return False  # the answer continues the prompt's own text (code, a document): nothing may follow it

    def structured_output(self, body: dict[str, Any], fields: tuple[str, ...] = CONSTRAINED_FIELDS) -> bool:
        return _constrained(body, fields)

    def asks_logprobs(self, body: dict[str, Any]) -> bool:
        return body.get("logprobs") is not None

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        body.pop("logprobs", None)

    def drop_logprobs(self, data: Any) -> bool:
        return _drop_choice_logprobs(data)

    def is_usage_only(self, raw: bytes) -> bool:
        return _usage_only(raw)

    def is_terminal(self, raw: bytes) -> bool:
        return _data_terminal(raw)

    def is_failure(self, raw: bytes) -> bool:
        return _data_error(raw)

    def finished_at(self, raw: bytes) -> bool:
        return _finished_at(raw)

    def prompt_text(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            return "\n".join(p for p in prompt if isinstance(p, str))
        return prompt if isinstance(prompt, str) else ""

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        return [Slot(SlotKind.DELTA, ("choice", c.get("index", 0)), c, "text") for c in _choices(body)]

    def event_slots(self, state: Any, name: str | None, data: Any) -> list[Slot]:
        slots = []
        for choice in _choices(data):
            part = ("choice", choice.get("index", 0))
            slots.append(Slot(SlotKind.DELTA, part, choice, "text"))
            if choice.get("finish_reason") is not None:
                slots.append(Slot(SlotKind.END, part))
        return slots


class Responses(Dialect):
    api = API
    conversation = "input"
    streams = True
    output_fields = ("max_output_tokens",)
    usage_holders = ("response",)

    def structured_output(self, body: dict[str, Any], fields: tuple[str, ...] = ()) -> bool:
        text = body.get("text")
        return isinstance(text, dict) and _json_format(text.get("format"))

    def cites_by_offset(self, body: dict[str, Any]) -> bool:
        tools = body.get("tools")
        return isinstance(tools, list) and any(
            isinstance(t, dict) and str(t.get("type", "")).startswith(("web_search", "file_search")) for t in tools
        )

    def asks_logprobs(self, body: dict[str, Any]) -> bool:
        include = body.get("include")
        return body.get("top_logprobs") is not None or (
            isinstance(include, list) and "message.output_text.logprobs" in include
        )

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        body.pop("top_logprobs", None)
        if isinstance(body.get("include"), list):
            body["include"] = [i for i in body["include"] if i != "message.output_text.logprobs"]

    def drop_logprobs(self, data: Any) -> bool:
        return _drop_output_logprobs(data)

    def is_terminal(self, raw: bytes) -> bool:
        return event_name(raw) in _RESPONSE_ENDS

    def is_failure(self, raw: bytes) -> bool:
        return event_name(raw) in (b"response.failed", b"error")

    def prompt_text(self, body: dict[str, Any]) -> str:
        parts = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
        given = body.get("input")
        if isinstance(given, str):
            parts.append(given)
        elif isinstance(given, list):
            parts.extend(text_of(item.get("content")) for item in given if isinstance(item, dict))
        return "\n".join(parts)

    def question(self, body: dict[str, Any]) -> str:
        given = body.get("input")
        return given if isinstance(given, str) else super().question(body)

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        return _output_slots(body.get("output"), SlotKind.DELTA)

    def event_slots(self, state: Any, name: str | None, data: Any) -> list[Slot]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type")
        if kind == "response.output_text.delta":
            return [Slot(SlotKind.DELTA, _part_of(data), data, "delta")]
        if kind == "response.output_text.done":
            part = _part_of(data)
            return [Slot(SlotKind.END, part), Slot(SlotKind.AGGREGATE, part, data, "text")]
        if kind == "response.content_part.done":
            content = data.get("part")
            if isinstance(content, dict) and content.get("type") == "output_text":
                return [Slot(SlotKind.AGGREGATE, _part_of(data), content, "text")]
        elif kind == "response.output_item.done":
            item = data.get("item")
            return _item_slots(data.get("output_index", 0), item, SlotKind.AGGREGATE)
        elif kind in ("response.completed", "response.incomplete"):
            response = data.get("response")
            if isinstance(response, dict):
                return _output_slots(response.get("output"), SlotKind.AGGREGATE)
        return []

    def stream_error_event(self, api: Api, error: GatewayError) -> bytes:
        body = api.error_body(error)["error"]
        payload = {"type": "error", "code": body["code"], "message": error.message, "param": None}
        return encode_event(json.dumps(payload), name="error")


class Embeddings(Dialect):
    api = API

    def prompt_text(self, body: dict[str, Any]) -> str:
        given = body.get("input")
        return given if isinstance(given, str) else ""


class Models(Dialect):
    method = "GET"


def _drop_choice_logprobs(data: Any) -> bool:
    choices = data.get("choices") if isinstance(data, dict) else None
    dropped = False
    for choice in choices if isinstance(choices, list) else ():  # every event: no list made (_choices)
        if isinstance(choice, dict) and choice.get("logprobs") is not None:
            choice["logprobs"], dropped = None, True
    return dropped


def _drop_output_logprobs(data: Any) -> bool:
    """A Responses answer's or event's log-probabilities: on a text delta or its done, and on each output text of
    an output item or a whole response (as the body, or in response.completed)."""
    if not isinstance(data, dict):
        return False
    holders = [data]
    response = data.get("response") if isinstance(data.get("response"), dict) else data
    items = response.get("output")
    items = items if isinstance(items, list) else [data.get("item")]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            holders += [c for c in item["content"] if isinstance(c, dict)]
    if isinstance(data.get("part"), dict):
        holders.append(data["part"])
    dropped = False
    for holder in holders:
        if holder.get("logprobs"):
            holder["logprobs"], dropped = [], True
    return dropped


def _choices(body: Any) -> list[dict]:
    choices = body.get("choices") if isinstance(body, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _part_of(data: dict) -> tuple:
    return ("output", data.get("output_index", 0), data.get("content_index", 0))


def _prompt_count(prompt: Any) -> int:
    """How many prompts a completion request holds: a list of strings, or of token lists, is that many; a
    string, or one list of token ids, is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def _output_slots(output: Any, kind: SlotKind) -> list[Slot]:
    if not isinstance(output, list):
        return []
    slots = []
    for index, item in enumerate(output):
        slots.extend(_item_slots(index, item, kind))
    return slots


def _item_slots(output_index: int, item: Any, kind: SlotKind) -> list[Slot]:
    if not isinstance(item, dict) or item.get("type") != "message" or not isinstance(item.get("content"), list):
        return []
    return [
        Slot(kind, ("output", output_index, k), content, "text")
        for k, content in enumerate(item["content"])
        if isinstance(content, dict) and content.get("type") == "output_text"
    ]
