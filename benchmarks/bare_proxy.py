"""The baseline: the least a Python proxy can do, an aiohttp session forwarding on uvicorn.

No identity, limits, parsing, transforms or records: request in, same request upstream, bytes back as
they arrive. The gateway's throughput is quoted as a share of this one's, measured in the same run.

    BARE_UPSTREAM=http://127.0.0.1:9000 uvicorn benchmarks.bare_proxy:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os

import aiohttp

_DROP = {b"host", b"content-length", b"connection", b"authorization"}


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in _DROP]
        async with self.session.request(
            scope["method"], self.upstream + scope["path"], data=body, headers=headers
        ) as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(b"content-type", response.headers["content-type"].encode())],
                }
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


app = BareProxy(os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:9000"))
