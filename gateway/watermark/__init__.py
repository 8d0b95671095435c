"""The keyed lexical watermark: word sets, sites, the scheme and its keys, the marking stage, detection.

`open_watermark` builds the transform stage for the gateway's keys: the current epoch's vetted key.
"""

from __future__ import annotations

from ..config import Settings
from ..evidence import keys_dir, origin_of
from ..evidence.keys import Keys, init_keys
from .detect import detect
from .mark import LexicalWatermark
from .scheme import LexicalKey, detector_digest, epoch_key
from .wordsets import default_sets


def open_watermark(settings: Settings) -> LexicalWatermark:
    init_keys(keys_dir(settings), origin_of(settings))
    keys = Keys.load(keys_dir(settings))
    return LexicalWatermark(epoch_key(keys.watermark, keys.current_epoch, default_sets()))


def epoch_keys(keys: Keys) -> list[LexicalKey]:
    """Every epoch's key, oldest first: what a detection tests."""
    sets = default_sets()
    return [epoch_key(keys.watermark, epoch, sets) for epoch in sorted(keys.masters)]


__all__ = [
    "LexicalKey",
    "LexicalWatermark",
    "default_sets",
    "detect",
    "detector_digest",
    "epoch_keys",
    "open_watermark",
]
