"""A fake model API (the one edge we do not own), speaking each API's real wire format.

It answers with `text` cut by `splitter`, records every request it receives, notices when a client
goes away mid-stream, and can be told to misbehave (status codes, redirects, hangs, dying mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from gateway import demo
from gateway.body import read_body
from gateway.protocols import ROUTES

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


def words(text: str) -> list[str]:
    out, current = [], ""
    for ch in text:
        current += ch
        if ch == " ":
            out.append(current)
            current = ""
    return out + ([current] if current else [])


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Behaviour:
    text: str = DEFAULT_TEXT
    splitter: object = words
    blocks: list[tuple[str, str]] | None = None  # Anthropic content blocks, (type, text)
    status: int | None = None  # answer this status with `error_body` instead
    # or a function of the request body, for an upstream that echoes the request in its errors
    error_body: object = field(default_factory=lambda: {"error": {"message": "upstream says no", "type": "x"}})
    headers: list[tuple[str, str]] = field(default_factory=list)
    hang: float = 0.0  # sleep before answering
    event_delay: float = 0.0
    die_after_events: int | None = None  # close the connection abruptly after this many events
    after_events: str | None = None  # "hang": keep the body open after the last event; "die": then fail
    stream_type: str = "text/event-stream"  # the Content-Type of a streamed answer
    answer_type: str | None = "application/json"  # of a whole answer (None: no Content-Type)
    refuse_logit_bias: bool = False  # answer 400 (`refusal`) to requests that carry logit_bias, as reasoning models do
    refusal: dict = field(default_factory=lambda: {"error": {"message": "Unsupported parameter: 'logit_bias' is not "
        "supported with this model.", "type": "invalid_request_error", "param": "logit_bias"}})  # fmt: skip
    patch: object = None  # rewrites the bytes of each whole answer and each event before they are sent


class FakeUpstream:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests: list[Received] = []
        self.cancelled = threading.Event()
        self.hung_up = threading.Event()  # the gateway closed a body kept open after the last event ("hang")
        self.completed_streams = 0

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()
        self.cancelled.clear()
        self.hung_up.clear()
        self.completed_streams = 0

    def texts(self, n: int) -> list[str]:
        b = self.behaviour
        return [b.text if i == 0 else f"{b.text} Choice {i} says more." for i in range(n)]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        body = await read_body(receive, None, None, 1 << 30)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(scope["method"], scope["path"], scope["query_string"].decode(), headers, body))
        b = self.behaviour
        if b.hang:
            try:
                await asyncio.sleep(b.hang)
            except asyncio.CancelledError:  # the gateway stopped waiting and cancelled this request
                self.cancelled.set()
                raise
        if b.status is not None:
            await self._json(send, b.status, b.error_body(body) if callable(b.error_body) else b.error_body, b.headers)
            return
        if b.refuse_logit_bias and b'"logit_bias"' in body:
            await self._json(send, 400, b.refusal, b.headers)
            return
        if scope["path"] not in ROUTES:  # a path the gateway passes through untouched
            await self._json(send, 200, {"echo": scope["path"], "body": body.decode("latin-1")}, b.headers)
            return
        request = json.loads(body) if body else {}
        answer = self._answer(scope["path"], request)
        if isinstance(answer, list):
            await self._stream(receive, send, answer)
        else:
            await self._json(send, 200, answer, b.headers)

    def _answer(self, path: str, request: dict):
        b = self.behaviour
        dialect = ROUTES[path]
        prompt = dialect.prompt_text(request)
        model = request.get("model", "fake-model")
        stream = bool(request.get("stream"))
        texts = self.texts(request.get("n", 1))
        if path == "/v1/chat/completions":
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            pieces = [b.splitter(t) for t in texts]
            return demo.chat_events(model, pieces, usage, prompt) if stream else demo.chat_completion(model, texts)
        if path == "/v1/completions":
            pieces = [b.splitter(t) for t in texts]
            return demo.completion_events(model, pieces) if stream else demo.completion(model, texts)
        if path == "/v1/responses":
            return demo.response_events(model, b.splitter(texts[0])) if stream else demo.response(model, texts[0])
        if path == "/v1/messages":
            blocks = b.blocks or [("text", texts[0])]
            if stream:
                return demo.message_events(model, [(k, b.splitter(t)) for k, t in blocks], prompt)
            return demo.message(model, blocks, prompt)
        if path == "/v1/embeddings":
            given = request.get("input")
            return demo.embeddings(model, given if isinstance(given, list) else [given])
        return demo.models(["fake-model"])

    async def _json(self, send, status: int, payload, headers) -> None:
        label = self.behaviour.answer_type if status == 200 else "application/json"
        out = [(b"content-type", label.encode())] if label else []
        out += [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": out})
        body = json.dumps(payload).encode()
        if self.behaviour.patch is not None and status == 200:
            body = self.behaviour.patch(body)
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive, send, events: list[bytes]) -> None:
        b = self.behaviour
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b.stream_type.encode())]}
        )
        gone = asyncio.ensure_future(receive())
        for i, event in enumerate(events):
            if b.die_after_events is not None and i == b.die_after_events:
                gone.cancel()
                raise RuntimeError("fake upstream dies mid-stream")
            if b.patch is not None:
                event = b.patch(event)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if b.event_delay:
                await asyncio.wait({gone}, timeout=b.event_delay)
            if gone.done() and gone.result()["type"] == "http.disconnect":
                self.cancelled.set()
                return
        if b.after_events == "hang":  # until the gateway hangs up
            await asyncio.wait({gone}, timeout=30)
            if gone.done():
                self.hung_up.set()
            return
        gone.cancel()
        if b.after_events == "die":
            raise RuntimeError("fake upstream dies after its last event")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.completed_streams += 1
