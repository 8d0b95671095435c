"""A suspect endpoint that misbehaves on request: the edge we do not own, so a fake.

Each prompt names its misbehaviour with a word ("flaky", "malformed", "slow", ...); the endpoint counts
requests per prompt so tests can tell what was asked, and how often. Its completions route echoes
log-probabilities from a toy model that rates the words of `learned` higher than any other.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class MisbehavingSuspect:
    def __init__(self, learned: str = "") -> None:
        self.asked: Counter = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)  # when each prompt was asked
        self.learned = {w.strip(" .,!") for w in learned.lower().split()}
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                     Route("/v1/completions", self.completions, methods=["POST"])])  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    async def chat(self, request: Request) -> Response:
        prompt = (await request.json())["messages"][0]["content"]
        self.asked[prompt] += 1
        self.times[prompt].append(time.monotonic())
        n = self.asked[prompt]
        if "impatient" in prompt:
            return JSONResponse({"error": {"message": "much later"}}, 429, headers={"retry-after": "3600"})
        if "patient" in prompt and n == 1:
            return JSONResponse({"error": {"message": "later"}}, 429, headers={"retry-after-ms": "400"})
        if "garbled" in prompt:
            return Response(b"not gzip at all", headers={"content-encoding": "gzip"}, media_type="application/json")
        if "deep" in prompt:
            return Response(b"[" * 90_000 + b"]" * 90_000, media_type="application/json")
        if "flaky" in prompt and n == 1:
            return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"retry-after-ms": "50"})
        if "failing" in prompt and n <= 2:
            return JSONResponse({"error": {"message": "overloaded"}}, 503)
        if "malformed" in prompt and n == 1:
            return Response(b'{"choices": [{"mess', media_type="application/json")
        if "slow" in prompt and n == 1:
            await asyncio.sleep(5)
        if "endless" in prompt:
            return StreamingResponse(_forever(b"x" * 4096, 0), media_type="application/json")
        if "trickle" in prompt:
            return StreamingResponse(_forever(b" ", 0.05), media_type="application/json")
        if "huge" in prompt:
            return Response(b"[" + b"0," * 3_000_000 + b"0]", media_type="application/json")
        if "forbidden" in prompt:
            return JSONResponse({"error": {"message": "no"}}, 400)
        if "hang" in prompt:
            await asyncio.sleep(3600)
        text = f"An answer to: {prompt}"
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}]})  # fmt: skip

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        if not body.get("echo"):
            return JSONResponse({"error": {"message": "echo only"}}, 400)
        choices = [self._scored(i, text) for i, text in enumerate(body["prompt"])]
        return Response(json.dumps({"choices": choices}), media_type="application/json")  # NaN allowed, as some servers

    def _scored(self, index: int, text: str) -> dict:
        tokens, offsets, position = [], [], 0
        for piece in text.split(" "):
            tokens.append(piece if not tokens else " " + piece)
            offsets.append(position)
            position += len(tokens[-1])
        scores = [None] + [-0.1 if t.strip(" .,!\n").lower() in self.learned else -3.0 for t in tokens[1:]]
        if "broken" in self.learned:
            scores[-1] = float("nan")
        logprobs = {"tokens": tokens, "token_logprobs": scores, "text_offset": offsets, "top_logprobs": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length"}


async def _forever(chunk: bytes, pause: float):
    while True:
        yield chunk
        await asyncio.sleep(pause)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
