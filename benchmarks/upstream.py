"""A static model API for benchmarks: fixed real answers, as fast as plain asyncio with uvloop allows.

HTTP/1.1 keep-alive on a raw asyncio protocol (no framework), so that it costs the benchmark as little
as possible. A request whose body contains `"stream": true` gets the answer as OpenAI chat chunks (one
word per event, with the space before it, as OpenAI's tokens come: a proxy that must see a word end
before it decides waits for the next event); any other request gets the whole answer. Events follow
each other at once, except for the model `bench-slow` (`--event-delay` seconds apart, for timing
streams) and `bench-hold` (one second apart, to hold streams open).

    python -m benchmarks.upstream --port 9000 --answers answers.json [--event-delay 0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from gateway import demo


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return words[:1] + [" " + w for w in words[1:]]


class Answers:
    """The prepared responses: whole JSON bodies and SSE event lists, cycled through per request."""

    def __init__(self, texts: list[str]) -> None:
        self.whole = [
            self._http(200, "application/json", json.dumps(demo.chat_completion("bench", [t])).encode()) for t in texts
        ]
        self.streams = [demo.chat_events("bench", [_words(t)], include_usage=True) for t in texts]
        self.count = 0

    @staticmethod
    def _http(status: int, content_type: str, body: bytes) -> bytes:
        head = f"HTTP/1.1 {status} OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        return head.encode() + body

    def next(self) -> int:
        self.count += 1
        return self.count % len(self.whole)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers, delay: float) -> None:
        self.answers = answers
        self.delay = delay
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            index = self.answers.next()
            if b'"stream": true' in body or b'"stream":true' in body:
                if b'"bench-slow"' in body:  # always the same answer, so that event counts compare
                    asyncio.ensure_future(self._stream(self.answers.streams[0], self.delay))
                else:
                    delay = 1.0 if b'"bench-hold"' in body else 0.0
                    asyncio.ensure_future(self._stream(self.answers.streams[index], delay))
            else:
                self.transport.write(self.answers.whole[index])

    async def _stream(self, events: list[bytes], delay: float) -> None:
        self.transport.write(STREAM_HEAD)
        for event in events:
            if self.transport.is_closing():
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            if delay:
                await asyncio.sleep(delay)
        self.transport.write(b"0\r\n\r\n")


def load_answers(path: str) -> list[str]:
    with open(path) as f:
        return json.load(f)


async def serve(port: int, answers_path: str, delay: float) -> None:
    answers = Answers(load_answers(answers_path))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(answers, delay), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", required=True, help="JSON list of answer texts")
    parser.add_argument("--event-delay", type=float, default=0.005, help="seconds between events of bench-slow")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.answers, args.event_delay))


if __name__ == "__main__":
    main()
