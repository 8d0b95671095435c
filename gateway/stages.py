"""The small interfaces the pipeline composes: identify, admit, forward, transform, record.

Each stage is one object with a few methods, called in a fixed order by `gateway.pipeline`. A stage
depends only on these interfaces and on `gateway.exchange`, never on another stage, so that each can be
replaced (limits, watermarks, the evidence log) or tested alone with a fake exchange.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from .exchange import Exchange, Identity


class Identifier(Protocol):
    def identify(self, exchange: Exchange, credential: str | None) -> Identity:
        """Who is calling; raises GatewayError(AUTHENTICATION) for a missing, unknown or revoked key."""

    def current(self, name: str) -> Identity | None:
        """The identity registered under `name` now (as an operator last set its tier and pin), or None."""


class Admitter(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> str | None:
        """None when admission decides normally, else its state ("degraded: ..." still serves)."""

    async def admit(self, exchange: Exchange) -> None:
        """Let the exchange through or raise GatewayError (RATE_LIMITED, ...). May delay it. Called with no
        identity for a request whose key was refused, to limit such requests per client address."""

    async def release(self, exchange: Exchange) -> None:
        """The exchange has ended, whatever its outcome (its usage is known): return what admission held."""

    async def set_tier(self, identity: Identity, tier: str | None) -> None:
        """Override an identity's tier where every worker and replica reads it (None: its registry tier)."""

    async def tier_override(self, identity: Identity) -> str | None:
        """The identity's tier override in force now (set_tier's), or None."""


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError when the upstream fails mid-body."""

    async def read(self, limit: int) -> bytes:
        """The whole body; raises UpstreamError when it exceeds `limit` bytes."""

    def close(self) -> None:
        """Abandon the response: the upstream sees the request cancelled if it is still running."""

    def release(self) -> None:
        """The body was fully read; the connection may be reused."""


class Upstream(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> str | None:
        """None when the upstream can be reached, else why not."""

    async def send(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Forward a request; raises UpstreamError (refused, timed out). Never follows redirects."""


class TextRewriter(Protocol):
    """Rewrites one part's text (a choice, a content block) as it streams."""

    def feed(self, text: str) -> str:
        """Take the next piece; return the text now ready to deliver (may hold some back)."""

    def flush(self) -> str:
        """The part is complete: return everything still held back."""

    def whole(self, text: str) -> str:
        """A whole part at once (a non-streamed answer): exactly what feed(text) + flush() would give."""

    @property
    def holding(self) -> bool:
        """Whether text is held back right now."""


Commitment = tuple[dict, dict[str, bytes]]
"""What a stage commits to before using it (a key epoch, a data file, a detector version): public fields
for the evidence log entry, and secret fields kept only as salted commitments (disclosed on demand)."""


class Transform(Protocol):
    def commitments(self) -> list[Commitment]:
        """What the marks depend on, to be committed to in the evidence log before the first answer."""

    def applies(self, exchange: Exchange) -> bool:
        """Whether this exchange's answer is to be rewritten at all (if not, bytes pass untouched)."""

    def rewriter(self, exchange: Exchange, part: tuple) -> TextRewriter | None:
        """A rewriter for one text part of the answer, or None to leave that part alone."""


class RequestMark(Protocol):
    """A mark the upstream applies as it samples (the sampling-bias mark): the transform stage's request side."""

    def commitments(self) -> list[Commitment]:
        """What the mark depends on, to be committed to in the evidence log before the first answer."""

    def applies(self, exchange: Exchange, dialect) -> bool:
        """Whether the exchange's request takes the mark (its log-probabilities are then hidden too)."""

    def request(self, exchange: Exchange) -> dict | None:
        """For an exchange the mark applies to: the upstream request asking for it (None if it has no room)."""

    def is_refusal(self, exchange: Exchange, body: bytes) -> bool:
        """Whether the upstream's 400 (`body`) to the marked request refused the mark itself."""

    def withdraw(self, exchange: Exchange) -> None:
        """The request went upstream without the mark: the exchange claims none."""

    def note_refusal(self, exchange: Exchange) -> None:
        """The upstream refused the mark and accepted the request without it: remember that the model refuses it."""


class Recorder(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> str | None:
        """None when records can be written, else why not."""

    async def commit(self, commitments: list[Commitment]) -> None:
        """Record commitments, durably, before the gateway serves (each as its own entry)."""

    async def decision(self, identity: Identity, doc: dict) -> None:
        """Record a risk decision (a tier change and the signals behind it)."""

    async def begin(self, exchange: Exchange) -> None:
        """The exchange was admitted (forwarding waits for this) or rejected: keep its start."""

    async def end(self, exchange: Exchange) -> None:
        """The exchange has ended, whatever its outcome; its last byte waits for this."""
