"""The operator's endpoint: read and set an identity's tier on a running gateway.

    GET /admin/tiers/NAME            -> {"name": ..., "tier": ...}
    PUT /admin/tiers/NAME {"tier": "suspect"}

Both need `Authorization: Bearer <token>`, the token being the value of the environment variable that
`[server] admin_token_env` names; without it the endpoint does not exist (404). A change is written to the
identity registry (every worker on this host reads it on its next request) and to the limit storage (every
replica sharing it reads it on its next admission), the same two places `canarygate tier set` writes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from .exchange import Identity
from .identity import IdentityError, Registry

log = logging.getLogger("canarygate.admin")

PREFIX = "/admin/tiers/"


class TierAdmin:
    def __init__(self, registry: Registry, admitter, tiers, token: str) -> None:
        self._registry = registry
        self._admitter = admitter
        self._tiers = tiers
        self._token = token.encode()

    async def handle(self, scope, receive) -> tuple[int, dict]:
        if not self._authorised(scope["headers"]):
            client = scope.get("client") or ("unknown",)
            log.warning("admin: refused %s %s from %s: no valid token", scope["method"], scope["path"][:80], client[0])
            return 401, _error("send the admin token as Authorization: Bearer TOKEN")
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
        await asyncio.to_thread(self._registry.set_tier, name, tier, record.pin)  # a pin stays
        await self._admitter.set_tier(Identity(record.name, record.tier, record.tenant), tier)
        return 200, {"name": name, "tier": tier}

    def _authorised(self, headers) -> bool:
        for key, value in headers:
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)
        return False


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
