"""The operator's endpoint: read and set an identity's tier on a running gateway.

    GET /admin/tiers/NAME            -> {"name": ..., "tier": ...}
    PUT /admin/tiers/NAME {"tier": "suspect"}

Both need `Authorization: Bearer <token>`, the token being the value of the environment variable that
`[server] admin_token_env` names; without it the endpoint does not exist (404). A change is written to the
identity registry (every worker on this host reads it on its next request) and to the limit storage (every
replica sharing it reads it on its next admission), the same two places `canarygate tier set` writes.

An address refused GUESSES times within GUESS_WINDOW seconds gets 429 until its window ends, its token unread,
so that a weak token cannot be guessed at network speed. The count is per worker and per connection address:
behind a proxy all callers share one, and `canarygate tier set` on the host still works while it is locked.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time

from .exchange import Identity
from .identity import IdentityError, Registry
from .ratelimit.guard import StorageDown

log = logging.getLogger("canarygate.admin")

PREFIX = "/admin/tiers/"
GUESSES = 10
GUESS_WINDOW = 60.0
_ADDRESSES_KEPT = 4096  # addresses whose refusals are remembered; the oldest windows go first


class TierAdmin:
    def __init__(self, registry: Registry, admitter, tiers, token: str) -> None:
        self._registry = registry
        self._admitter = admitter
        self._tiers = tiers
        self._token = token.encode()
        self._refusals = Refusals()

    async def handle(self, scope, receive) -> tuple[int, dict, dict]:
        """The status, the JSON document and the headers of the answer."""
        address = (scope.get("client") or ("unknown",))[0]
        wait = self._refusals.locked_for(address, time.monotonic())
        if wait:
            return 429, _error("too many refused admin requests; retry later"), {"retry-after": str(math.ceil(wait))}
        if not self._authorised(scope["headers"]):
            self._refusals.note(address, time.monotonic())
            log.warning("admin: refused %s %s from %s: no valid token", scope["method"], scope["path"][:80], address)
            return 401, _error("send the admin token as Authorization: Bearer TOKEN"), {}
        return (*await self._act(scope, receive), {})

    async def _act(self, scope, receive) -> tuple[int, dict]:
        name = scope["path"][len(PREFIX) :]
        try:
            record = self._registry.get(name)
        except IdentityError as e:
            return 404, _error(str(e))
        if scope["method"] == "GET":
            return 200, {"name": name, "tier": record.tier}
        if scope["method"] != "PUT":
            return 405, _error("use GET or PUT")
        tier = await _tier_of(receive)
        if tier not in self._tiers:
            return 400, _error(f'send {{"tier": T}} with T one of {", ".join(self._tiers)}')
        # the limit storage first, as `tier set` does: where it cannot be written, the registry is left as it was
        try:
            await self._admitter.set_tier(Identity(record.name, record.tier, record.tenant), tier)
        except StorageDown as e:
            return 503, _error(f"{e}; the tier is unchanged, retry shortly")
        try:
            await asyncio.to_thread(self._registry.move, name, tier)  # a pin stays
        except IdentityError as e:  # revoked meanwhile
            return 404, _error(str(e))
        return 200, {"name": name, "tier": tier}

    def _authorised(self, headers) -> bool:
        for key, value in headers:
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)
        return False


class Refusals:
    """Refused requests per address, counted in fixed windows of GUESS_WINDOW seconds."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, refusals in it)

    def locked_for(self, address: str, now: float) -> float:
        """Seconds until `address` may try again; 0 if it may now."""
        start, count = self._windows.get(address, (now, 0))
        left = start + GUESS_WINDOW - now
        return left if count >= GUESSES and left > 0 else 0.0

    def note(self, address: str, now: float) -> None:
        start, count = self._windows.pop(address, (now, 0))
        if now - start >= GUESS_WINDOW:
            start, count = now, 0
        self._windows[address] = (start, count + 1)  # re-inserted: the dict's order is the order of last refusal
        while len(self._windows) > _ADDRESSES_KEPT:
            del self._windows[next(iter(self._windows))]


async def _tier_of(receive) -> str | None:
    body = b""
    while len(body) < 4096:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        tier = json.loads(body).get("tier")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None
    return tier if isinstance(tier, str) else None


def _error(message: str) -> dict:
    return {"error": {"message": message}}
