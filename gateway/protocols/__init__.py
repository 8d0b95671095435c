"""The route table: which (method, path) belongs to which API dialect, in one place."""

from __future__ import annotations

from collections.abc import Iterable

from . import anthropic, openai
from .base import Api, Dialect, RequestFacts, Slot, SlotKind

ROUTES: dict[str, Dialect] = {
    "/v1/chat/completions": openai.ChatCompletions(),
    "/v1/completions": openai.Completions(),
    "/v1/responses": openai.Responses(),
    "/v1/embeddings": openai.Embeddings(),
    "/v1/models": openai.Models(),
    "/v1/messages": anthropic.Messages(),
}


def api_for(path: str, headers: Iterable[tuple[bytes, bytes]]) -> Api:
    """Whose conventions apply: the route's own API, else Anthropic's when the client sends its version header."""
    dialect = ROUTES.get(path)
    if dialect is not None and dialect.api is not None:
        return dialect.api
    if path.startswith("/v1/messages"):
        return anthropic.API
    for name, _ in headers:
        if name == b"anthropic-version":
            return anthropic.API
    return openai.API


__all__ = ["ROUTES", "Api", "Dialect", "RequestFacts", "Slot", "SlotKind", "api_for"]
