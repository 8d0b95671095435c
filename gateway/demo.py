"""A built-in demo model: answers every route in each API's real wire format, streaming or not.

`canarygate demo` puts it behind the gateway in-process, so a newcomer sees the whole path work with no
upstream. The wire builders (`chat_events`, `message_events`, ...) take the answer already cut into
pieces, so that a test upstream can split the same answer any way it likes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from .body import read_body
from .protocols import ROUTES
from .protocols.sse import encode_event

DEMO_MODEL = "canarygate-demo"
DEMO_BODY_LIMIT = 64 * 1024 * 1024  # the gateway in front has already applied its own limit


def _sse(payload: dict, name: str | None = None) -> bytes:
    return encode_event(json.dumps(payload), name)


def _usage_counts(prompt: str, texts: list[str]) -> tuple[int, int]:
    return len(prompt.split()), sum(len(t.split()) for t in texts)


# --- OpenAI chat completions ---


def chat_completion(model: str, texts: list[str], prompt: str = "") -> dict:
    p, c = _usage_counts(prompt, texts)
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop", "logprobs": None}
            for i, t in enumerate(texts)
        ],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }


def chat_events(model: str, pieces: list[list[str]], include_usage: bool = False, prompt: str = "") -> list[bytes]:
    """One chunk per piece, choices interleaved, a finish chunk per choice, usage, then [DONE]."""
    base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(choices: list, **extra) -> bytes:
        return _sse({**base, "choices": choices, **extra})

    events = [
        chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i in range(len(pieces))
    ]
    for step in range(max(len(p) for p in pieces)):
        for i, choice_pieces in enumerate(pieces):
            if step < len(choice_pieces):
                events.append(chunk([{"index": i, "delta": {"content": choice_pieces[step]}, "finish_reason": None}]))
    events += [chunk([{"index": i, "delta": {}, "finish_reason": "stop"}]) for i in range(len(pieces))]
    if include_usage:
        p, c = _usage_counts(prompt, ["".join(x) for x in pieces])
        events.append(chunk([], usage={"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}))
    return events + [b"data: [DONE]\n\n"]


# --- OpenAI legacy completions ---


def completion(model: str, texts: list[str], prompt: str = "") -> dict:
    p, c = _usage_counts(prompt, texts)
    return {
        "id": "cmpl-demo",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }


def completion_events(model: str, pieces: list[list[str]]) -> list[bytes]:
    base = {"id": "cmpl-demo", "object": "text_completion", "created": int(time.time()), "model": model}
    events = []
    for i, choice_pieces in enumerate(pieces):
        for piece in choice_pieces:
            events.append(_sse({**base, "choices": [{"index": i, "text": piece, "finish_reason": None}]}))
        events.append(_sse({**base, "choices": [{"index": i, "text": "", "finish_reason": "stop"}]}))
    return events + [b"data: [DONE]\n\n"]


# --- OpenAI Responses ---


def _message_item(text: str, status: str = "completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"id": "msg_demo", "type": "message", "status": status, "role": "assistant", "content": content}


def response(model: str, text: str, prompt: str = "", status: str = "completed") -> dict:
    p, c = _usage_counts(prompt, [text])
    return {
        "id": "resp_demo",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [_message_item(text)] if status == "completed" else [],
        "usage": {
            "input_tokens": p,
            "output_tokens": c,
            "total_tokens": p + c,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
    }


def response_events(model: str, pieces: list[str], prompt: str = "") -> list[bytes]:
    text = "".join(pieces)
    where = {"item_id": "msg_demo", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    payloads = [
        {"type": "response.created", "response": response(model, "", prompt, status="in_progress")},
        {"type": "response.in_progress", "response": response(model, "", prompt, status="in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": _message_item("", "in_progress")},
        {"type": "response.content_part.added", **where, "part": part},
        *({"type": "response.output_text.delta", **where, "delta": p, "logprobs": []} for p in pieces),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": _message_item(text)},
        {"type": "response.completed", "response": response(model, text, prompt)},
    ]
    return [_sse({**p, "sequence_number": n}, p["type"]) for n, p in enumerate(payloads)]


# --- Anthropic Messages ---


def message(model: str, blocks: list[tuple[str, str]], prompt: str = "") -> dict:
    """`blocks` are (type, text) with type text, thinking or tool_use (text is then the JSON input)."""
    p, c = _usage_counts(prompt, [t for _, t in blocks])
    return {
        "id": "msg_demo",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [_block(kind, text, i) for i, (kind, text) in enumerate(blocks)],
        "stop_reason": "tool_use" if any(k == "tool_use" for k, _ in blocks) else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": p, "output_tokens": c},
    }


def _block(kind: str, text: str, index: int) -> dict:
    if kind == "thinking":
        return {"type": "thinking", "thinking": text, "signature": "c2lnbmVkLWRlbW8="}
    if kind == "tool_use":
        return {"type": "tool_use", "id": f"toolu_demo{index}", "name": "lookup", "input": json.loads(text or "{}")}
    return {"type": "text", "text": text}


_DELTAS = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
           "tool_use": ("input_json_delta", "partial_json")}  # fmt: skip


def message_events(model: str, blocks: list[tuple[str, list[str]]], prompt: str = "") -> list[bytes]:
    whole = message(model, [(kind, "".join(pieces)) for kind, pieces in blocks], prompt)
    start = {**whole, "content": [], "stop_reason": None, "usage": {**whole["usage"], "output_tokens": 1}}
    events = [_sse({"type": "message_start", "message": start}, "message_start"), _sse({"type": "ping"}, "ping")]
    for index, (kind, pieces) in enumerate(blocks):
        opening = _block(kind, "", index)
        if kind == "thinking":
            opening["signature"] = ""
        events.append(
            _sse({"type": "content_block_start", "index": index, "content_block": opening}, "content_block_start")
        )
        delta_type, field = _DELTAS[kind]
        for piece in pieces:
            delta = {"type": "content_block_delta", "index": index, "delta": {"type": delta_type, field: piece}}
            events.append(_sse(delta, "content_block_delta"))
        if kind == "thinking":
            signature = {"type": "signature_delta", "signature": whole["content"][index]["signature"]}
            events.append(
                _sse({"type": "content_block_delta", "index": index, "delta": signature}, "content_block_delta")
            )
        events.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": whole["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": whole["usage"]["output_tokens"]},
    }
    events.append(_sse(end, "message_delta"))
    return events + [_sse({"type": "message_stop"}, "message_stop")]


# --- OpenAI embeddings and models ---


def embeddings(model: str, inputs: list[str]) -> dict:
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.sha256(text.encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [(b - 128) / 128 for b in digest[:16]]})
    tokens = sum(len(t.split()) for t in inputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models(names: list[str]) -> dict:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "canarygate"} for n in names],
    }


# --- the demo model itself ---


def demo_answer(prompt: str, variant: int = 0) -> str:
    asked = " ".join(prompt.split())[:160] or "nothing"
    lead = ["Hello", "Hi there", "Greetings"][variant % 3]
    return (
        f"{lead} from the canarygate demo model. You asked: \u201c{asked}\u201d. This answer passed through "
        "the gateway, which checked your key, admitted the request and recorded the exchange. Point "
        "`canarygate serve --upstream URL` at a real model API to get real answers."
    )


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + words[-1:]


class DemoModel:
    """ASGI app: the demo model API. `delay` spaces streamed events so that streaming is visible."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, None, None, DEMO_BODY_LIMIT)
        request = json.loads(body) if body else {}
        status, answer = self._answer(scope["method"], scope["path"], request)
        if isinstance(answer, list):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            for event in answer:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = json.dumps(answer).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": payload})

    def _answer(self, method: str, path: str, request: dict[str, Any]) -> tuple[int, Any]:
        dialect = ROUTES.get(path)
        if dialect is None:
            return 404, {"error": {"message": f"demo model has no route {path}", "type": "invalid_request_error"}}
        prompt = dialect.prompt_text(request)
        model = request.get("model") or DEMO_MODEL
        stream = bool(request.get("stream"))
        n = request.get("n") if isinstance(request.get("n"), int) and 0 < request.get("n") <= 8 else 1
        texts = [demo_answer(prompt, i) for i in range(n)]
        if path == "/v1/chat/completions":
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            if stream:
                return 200, chat_events(model, [_words(t) for t in texts], include_usage, prompt)
            return 200, chat_completion(model, texts, prompt)
        if path == "/v1/completions":
            return 200, completion_events(model, [_words(t) for t in texts]) if stream else completion(
                model, texts, prompt
            )
        if path == "/v1/responses":
            return 200, response_events(model, _words(texts[0]), prompt) if stream else response(
                model, texts[0], prompt
            )
        if path == "/v1/messages":
            if stream:
                return 200, message_events(model, [("text", _words(texts[0]))], prompt)
            return 200, message(model, [("text", texts[0])], prompt)
        if path == "/v1/embeddings":
            given = request.get("input")
            return 200, embeddings(model, given if isinstance(given, list) else [str(given)])
        return 200, models([DEMO_MODEL])
