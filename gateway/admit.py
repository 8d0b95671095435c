"""The admit stage until limits land: every identified caller is let through.

It keeps the interface the limits stage will fill (admit before forwarding, release when the exchange
ends), so the pipeline already calls both at the right moments.
"""

from __future__ import annotations

from .exchange import Exchange


class AllowAll:
    async def admit(self, exchange: Exchange) -> None:
        """Every request is admitted."""

    def release(self, exchange: Exchange) -> None:
        """Nothing was held."""
