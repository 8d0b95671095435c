"""canarygate inside a model server: ASGI middleware running the same pipeline with no network hop.

The API namespace (/v1/...) and configured passthrough prefixes go through identify, admit, forward,
transform and record, where "forward" calls the wrapped app in-process; an unknown /v1/ path gets the API's
404. Every other path (a health check, docs) reaches the wrapped app untouched. The pipeline's resources
open and close with the host server's lifespan.

    app = CanarygateMiddleware(model_server_app, settings=config.load("canarygate.toml"))
"""

from __future__ import annotations

import asyncio

from . import config
from .app import build_pipeline
from .stages import Transform
from .upstream import ASGIUpstream


class CanarygateMiddleware:
    def __init__(self, app, settings: config.Settings | None = None, transform: Transform | None = None) -> None:
        self.app = app
        settings = settings or config.load()
        self.pipeline = build_pipeline(
            settings, upstream=ASGIUpstream(app, settings.upstream.read_timeout), transform=transform
        )
        self._started = False
        self._starting = asyncio.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.pipeline.handles(_below_root(scope)["path"]):
            if not self._started:  # a host that runs no lifespan: open on first use
                await self._start()
            await self.pipeline(_below_root(scope), receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_receive(self, receive):
        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.startup" and not self._started:
                await self._start()
            return message

        return wrapped

    async def _start(self) -> None:
        async with self._starting:  # concurrent first requests start it once; a failed start is retried
            if not self._started:
                await self.pipeline.start()
                self._started = True

    def _lifespan_send(self, send):
        async def wrapped(message):
            if message["type"] == "lifespan.shutdown.complete":
                await self.pipeline.close()
            await send(message)

        return wrapped


def _below_root(scope) -> dict:
    """The request as seen below the host's mount point: servers put root_path in front of `path` (as
    uvicorn does), and the wrapped app, called again in-process, expects paths relative to itself."""
    root = scope.get("root_path", "")
    if not root or not scope["path"].startswith(root):
        return scope
    raw = scope.get("raw_path") or scope["path"].encode()
    raw = raw[len(root.encode()) :] if raw.startswith(root.encode()) else scope["path"][len(root) :].encode()
    return {**scope, "path": scope["path"][len(root) :] or "/", "raw_path": raw or b"/", "root_path": ""}
