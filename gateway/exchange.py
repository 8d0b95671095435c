"""The vocabulary every stage shares: one exchange (request and its answer), who made it, and errors.

Stages read and annotate an `Exchange`; they never import each other. An error is a value
(`GatewayError`) with a protocol-neutral `kind`; each API module renders it in its own shape.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ErrorKind(Enum):
    """What went wrong, independent of which API's error shape will carry it."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    RATE_LIMITED = "rate_limited"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_AUTH = "upstream_auth"
    UPSTREAM_OVERLOADED = "upstream_overloaded"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_FAILED = "upstream_failed"
    UNAVAILABLE = "unavailable"  # the gateway itself cannot decide (its limit storage is down, fail-closed)
    INTERNAL = "internal"


STATUS_OF = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.PERMISSION: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.UPSTREAM_UNAVAILABLE: 502,
    ErrorKind.UPSTREAM_AUTH: 502,
    ErrorKind.UPSTREAM_FAILED: 502,
    ErrorKind.UPSTREAM_OVERLOADED: 503,
    ErrorKind.UPSTREAM_TIMEOUT: 504,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}


class GatewayError(Exception):
    """An error the client sees, in its API's shape. `message` must never carry secrets."""

    def __init__(self, kind: ErrorKind, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS_OF[self.kind]


class Outcome(Enum):
    """How an exchange ended; recorded with it."""

    COMPLETED = "completed"
    REJECTED = "rejected"
    CLIENT_CANCELLED = "client_cancelled"
    UPSTREAM_FAILED = "upstream_failed"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Quota:
    """One limit in force for the caller, as the rate-limit headers tell it."""

    unit: str  # "requests", "tokens" or "concurrent"
    limit: int
    remaining: int
    reset_s: float  # until the budget is full again
    window_s: int  # the period the limit is counted over (0 for concurrency)


@dataclass(frozen=True, slots=True)
class Identity:
    """A registered caller. The key itself is never held here, only who it belongs to."""

    name: str
    tier: str
    tenant: str | None = None
    pinned: bool = False  # an operator fixed the tier: the risk engine does not move it
    tier_set: float = 0.0  # when its tier was last set by an operator (or it was registered): see LimitAdmitter
    registered: float = 0.0  # when its key was issued: a name revoked and registered anew is a new caller
    tier_chosen: bool = False  # its registry tier is not the default: an operator chose it, at registration or since


@dataclass(slots=True)
class Exchange:
    """One request through the gateway, annotated by each stage as it passes."""

    id: str
    method: str
    path: str
    api: str  # "openai" or "anthropic": whose error shape the client gets
    route: str | None  # a key of the route table, or None for unknown routes and passthrough
    client_ip: str
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    admitted: bool = False
    request_body: bytes = b""  # as received (after decompression)
    request: dict[str, Any] | None = None  # the parsed JSON body
    model: str | None = None
    stream: bool = False
    prompt_text: str = ""  # the text of the prompt (messages, system, input), for the marks
    question: str = ""  # the caller's latest message (Dialect.question), for what the risk engine asks of it
    structured: bool = False  # the request asks for structured output (JSON mode, a schema): never rewritten
    cited: bool = False  # the answer may cite sources by offsets into its text (Dialect.cites_by_offset): not marked
    free_ending: bool = True  # nothing follows the answer's prose (Dialect.free_ending): a canary may
    prompt_tokens: int = 0  # estimated at admission, from the request's body
    requested_output: int | None = 0  # the output token limit the request set; None: none, on a route that generates
    choices: int = 1  # answers the upstream writes (n, best_of), each up to the output limit
    output_cap: int | None = None  # set by admission: the output limit the upstream request must carry
    quotas: tuple[Quota, ...] = ()  # set by admission: the limits in force, for the response headers
    strip_usage: bool = False  # the gateway asked the upstream for usage the client did not ask for
    tokens_used: int | None = None  # prompt plus completion, as the upstream reported them
    status: int = 0
    outcome: Outcome | None = None
    error: str | None = None  # an ErrorKind value, or a short reason for upstream failures
    upstream_status: int | None = None
    first_byte_at: float | None = None  # perf_counter when the first response byte was sent
    events: int = 0
    usage: dict[str, Any] | None = None
    delivered: list[bytes] = field(default_factory=list)  # the answer's bytes as sent to the client
    marks: list[dict[str, Any]] = field(default_factory=list)  # watermark schemes applied (scheme, epoch, ...)
    canaries: list[dict[str, Any]] = field(default_factory=list)  # canaries served, with their context
    canary_claimed: bool = False  # a part of the answer is to carry its one canary (placed, or not, at its end)

    @property
    def tier(self) -> str | None:
        return self.identity.tier if self.identity else None

    def answer(self) -> bytes:
        """Everything delivered so far, as one bytes object (joined once, then kept joined)."""
        if len(self.delivered) > 1:
            self.delivered[:] = [b"".join(self.delivered)]
        return self.delivered[0] if self.delivered else b""

    @property
    def client_group(self) -> str:
        """The client address as limits count it: IPv4 addresses alone, IPv6 by /64 (one subscriber's block)."""
        return address_group(self.client_ip)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def address_group(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))
