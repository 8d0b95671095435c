"""The Anthropic Messages API: error shape, credentials, and where text lives in its answers.

Only `text` content blocks are exposed to transforms. Thinking blocks are signed by the upstream and must
reach the client byte-identical; tool-use input is data. Neither is ever offered as a slot.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..exchange import ErrorKind, GatewayError, Quota
from .base import Api, Dialect, Slot, SlotKind, binding_quota, ietf_rate_headers, text_of
from .sse import encode_event, event_name

_ERROR_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorKind.TOO_LARGE: "request_too_large",
    ErrorKind.UNSUPPORTED_MEDIA: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.UPSTREAM_UNAVAILABLE: "api_error",
    ErrorKind.UPSTREAM_AUTH: "api_error",
    ErrorKind.UPSTREAM_OVERLOADED: "overloaded_error",
    ErrorKind.UPSTREAM_TIMEOUT: "timeout_error",
    ErrorKind.UPSTREAM_FAILED: "api_error",
    ErrorKind.UNAVAILABLE: "overloaded_error",
    ErrorKind.INTERNAL: "api_error",
}


class AnthropicApi(Api):
    name = "anthropic"
    upstream_auth_header = "x-api-key"

    def error_body(self, error: GatewayError) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES[error.kind], "message": error.message}}

    def stream_error_event(self, error: GatewayError) -> bytes:
        return encode_event(json.dumps(self.error_body(error)), name="error")

    def rate_limit_headers(self, quotas: tuple[Quota, ...]) -> list[tuple[bytes, bytes]]:
        headers = ietf_rate_headers(quotas)
        for unit in ("requests", "tokens"):
            q = binding_quota(quotas, unit)
            if q is not None:
                reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + q.reset_s + 0.999))
                headers += [
                    (f"anthropic-ratelimit-{unit}-limit".encode(), str(q.limit).encode()),
                    (f"anthropic-ratelimit-{unit}-remaining".encode(), str(q.remaining).encode()),
                    (f"anthropic-ratelimit-{unit}-reset".encode(), reset.encode()),
                ]
        return headers


API = AnthropicApi()


def _cites(messages: Any) -> bool:
    """The messages hold documents or search results with citations on, which split an answer into text parts."""
    return isinstance(messages, list) and any(
        isinstance(part, dict)
        and part.get("type") in ("document", "search_result")
        and isinstance(part.get("citations"), dict)
        and part["citations"].get("enabled")
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


class Messages(Dialect):
    api = API
    conversation = "messages"
    streams = True
    output_fields = ("max_tokens",)
    usage_holders = ("message",)

    def is_terminal(self, raw: bytes) -> bool:
        return event_name(raw) in (b"message_stop", b"error")

    def structured_output(self, body: dict[str, Any], fields: tuple[str, ...] = ()) -> bool:
        config = body.get("output_config")
        specs = (config.get("format") if isinstance(config, dict) else None, body.get("output_format"))  # GA, beta
        return any(isinstance(spec, dict) and spec.get("type") == "json_schema" for spec in specs)

    def free_ending(self, body: dict[str, Any]) -> bool:
        return super().free_ending(body) and not _cites(body.get("messages"))

    def is_failure(self, raw: bytes) -> bool:
        return event_name(raw) == b"error"

    def prompt_text(self, body: dict[str, Any]) -> str:
        parts = [text_of(body.get("system"))]
        messages = body.get("messages")
        if isinstance(messages, list):
            parts.extend(text_of(m.get("content")) for m in messages if isinstance(m, dict))
        return "\n".join(p for p in parts if p)

    def body_slots(self, body: dict[str, Any]) -> list[Slot]:
        content = body.get("content")
        if not isinstance(content, list):
            return []
        return [
            Slot(SlotKind.DELTA, ("block", index), block, "text")
            for index, block in enumerate(content)
            if isinstance(block, dict) and block.get("type") == "text"
        ]

    def new_stream_state(self) -> set[int]:
        return set()  # indices of the text blocks opened so far

    def event_slots(self, text_blocks: set[int], name: str | None, data: Any) -> list[Slot]:
        if not isinstance(data, dict):
            return []
        kind = data.get("type")
        index = data.get("index")
        if kind == "content_block_delta":
            delta = data.get("delta")
            if index in text_blocks and isinstance(delta, dict) and delta.get("type") == "text_delta":
                return [Slot(SlotKind.DELTA, ("block", index), delta, "text")]
        elif kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(index, int):
                text_blocks.add(index)
                return [Slot(SlotKind.DELTA, ("block", index), block, "text")]
        elif kind == "content_block_stop" and index in text_blocks:
            return [Slot(SlotKind.END, ("block", index))]
        return []
