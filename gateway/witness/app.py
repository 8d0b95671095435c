"""The witness's HTTP interface: `POST /add-checkpoint` (C2SP tlog-witness) and `GET /checkpoint?origin=`,
the latest cosigned checkpoint of a log, for monitors comparing what witnesses saw."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..evidence.note import NoteKey
from ..evidence.witnessing import BadRequest, parse_add_checkpoint
from .state import WitnessState

MAX_BODY = 64 * 1024


def _text(body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(body, status, headers={"content-type": content_type})


def witness_app(directory: Path, logs: list[NoteKey]) -> Starlette:
    holder: dict[str, WitnessState] = {}

    @asynccontextmanager
    async def lifespan(app):
        holder["state"] = WitnessState(directory, logs)
        try:
            yield
        finally:
            holder.pop("state").close()

    async def add_checkpoint(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
            return _text("request too large\n", 413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _text("request too large\n", 413)
        try:
            old, proof, note = parse_add_checkpoint(body)
        except BadRequest as e:
            return _text(f"{e}\n", 400)
        answer = await holder["state"].add(old, proof, note)
        return _text(answer.body, answer.status, answer.content_type)

    async def checkpoint(request: Request) -> Response:
        note = holder["state"].latest(request.query_params.get("origin", ""))
        return _text(note, 200) if note else _text("no checkpoint for this log\n", 404)

    async def healthz(request: Request) -> Response:
        return _text("ok\n")

    routes = [
        Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
        Route("/checkpoint", checkpoint),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
