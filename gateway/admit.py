"""The admit stage that admits everything: the benchmark's admit-off variant, for the per-stage budget."""

from __future__ import annotations

from .exchange import Exchange, Identity


class AllowAll:
    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def ready(self) -> str | None:
        return None

    async def admit(self, exchange: Exchange) -> None:
        """Every request is admitted."""

    async def release(self, exchange: Exchange) -> None:
        """Nothing was held."""

    async def set_tier(self, identity: Identity, tier: str | None) -> None:
        """No limits: tiers change nothing."""

    async def tier_override(self, identity: Identity) -> str | None:
        return None
