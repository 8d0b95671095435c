"""Per-identity canaries: the phrase space and each identity's phrases (phrases.py), the stage that serves
them (transform.py), and attribution of a suspect's text to the identities whose canaries it carries
(detect.py)."""

from __future__ import annotations

from ..config import Settings
from ..stages import Transform
from .detect import Attribution, attribute
from .phrases import Canary, canaries_of, canary_key
from .transform import CanaryTransform


def with_canaries(inner: Transform, settings: Settings, watermark_master: bytes, epoch: int) -> Transform:
    """The transform stage with canaries around `inner`, as `[canaries]` asks (or `inner` when off)."""
    options = settings.canaries
    if not options.enabled:
        return inner
    return CanaryTransform(
        inner,
        canary_key(watermark_master),
        epoch,
        options.count,
        dict(options.density),
        frozenset(options.identities),
        frozenset(options.tenants),
    )


__all__ = ["Attribution", "Canary", "CanaryTransform", "attribute", "canaries_of", "canary_key", "with_canaries"]
