"""canarygate inside a model server: ASGI middleware running the same pipeline with no network hop.

Fail closed: every request goes through identify, admit, forward, transform and record (where "forward"
calls the wrapped app in-process), except those to the few public paths a model server serves to anyone
(health checks, its metrics, its docs: `PUBLIC_PATHS`, or the host's own list), which reach the wrapped app
untouched. So a model route the gateway does not know (a server's own /generate) gets the API's 404 unless
it is listed in `[upstream] passthrough`, and is then guarded like the API; it is never open by accident.
A websocket cannot be marked or recorded: one to a guarded path is refused (403). The pipeline's resources
open and close with the host server's lifespan, which the middleware runs itself for an app that has none.

    app = CanarygateMiddleware(model_server_app, settings=config.load("canarygate.toml"))
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from . import config
from .app import build_pipeline
from .pipeline import under_prefixes
from .stages import Transform
from .upstream import HOST_SCOPE, ASGIUpstream

PUBLIC_PATHS = (
    "/health",
    "/healthz",
    "/ready",
    "/readyz",
    "/live",
    "/livez",
    "/ping",
    "/version",
    "/metrics",
    "/docs",
    "/redoc",
    "/openapi.json",
)


class CanarygateMiddleware:
    def __init__(
        self,
        app,
        settings: config.Settings | None = None,
        transform: Transform | None = None,
        public_paths: Sequence[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        settings = settings or config.load()
        self.pipeline = build_pipeline(
            settings, upstream=ASGIUpstream(app, settings.upstream.read_timeout), transform=transform
        )
        self._public = tuple(public_paths)
        self._started = False
        self._starting = asyncio.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] not in ("http", "websocket") or under_prefixes(_below_root(scope)["path"], self._public):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accepting: the client gets a 403
        else:
            if not self._started:  # a host that runs no lifespan: open on first use
                await self._start()
            token = HOST_SCOPE.set(scope)  # what the wrapped app would have seen of the connection
            try:
                await self.pipeline(_below_root(scope), receive, send)
            finally:
                HOST_SCOPE.reset(token)

    async def _lifespan(self, scope, receive, send) -> None:
        """The host's lifespan, passed to the app, with the pipeline opened at startup and closed at shutdown;
        for an app that does not speak it (it fails or returns before answering the startup), answered alone."""
        seen = []  # the lifespan messages the app read and sent

        async def reading():
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "lifespan.startup" and not self._started:
                await self._start()
            return message

        async def answering(message):
            seen.append(message["type"])
            if message["type"] == "lifespan.shutdown.complete":
                await self._close()
            await send(message)

        try:
            await self.app(scope, reading, answering)
        except Exception:
            if any(kind.startswith("lifespan.startup.") for kind in seen):  # it speaks lifespan: its failure
                raise
        if not any(kind.startswith("lifespan.startup.") for kind in seen):  # it failed, or returned, unanswered
            await self._lifespan_alone(receive, send, startup_read="lifespan.startup" in seen)

    async def _lifespan_alone(self, receive, send, startup_read: bool) -> None:
        if not startup_read:
            await receive()
        try:
            await self._start()
        except Exception as e:
            await send({"type": "lifespan.startup.failed", "message": f"canarygate: {type(e).__name__}: {e}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # the shutdown: the only message after the startup
        await self._close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        async with self._starting:  # concurrent first requests start it once; a failed start is retried
            if not self._started:
                await self.pipeline.start()
                self._started = True

    async def __aenter__(self) -> CanarygateMiddleware:
        """Opened by the host's own lifespan: where no lifespan message reaches the middleware (mounted under
        Starlette's `Mount`, which passes none on), it would open at the first request and never close, and the
        log's last entries would wait for a checkpoint until the next start."""
        await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._close()

    async def _close(self) -> None:
        """Closed, it can start again: a host's tests run one app's lifespan once per test client."""
        self._started = False
        self._starting = asyncio.Lock()  # the next start may be in another loop, to which this one is not bound
        await self.pipeline.close()


def _below_root(scope) -> dict:
    """The request as seen below the host's mount point: servers put root_path in front of `path` (as
    uvicorn does), and the wrapped app, called again in-process, expects paths relative to itself."""
    root = scope.get("root_path", "")
    if not root or not scope["path"].startswith(root):
        return scope
    raw = scope.get("raw_path") or scope["path"].encode()
    raw = raw[len(root.encode()) :] if raw.startswith(root.encode()) else scope["path"][len(root) :].encode()
    return {**scope, "path": scope["path"][len(root) :] or "/", "raw_path": raw or b"/", "root_path": ""}
