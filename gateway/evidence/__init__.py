"""The evidence log: what the gateway served, to whom and when, in a form a third party can check.

merkle.py and note.py are pure (RFC 6962 trees, C2SP signed notes); entry.py defines entries and their
sealing; store.py keeps them on disk; log.py appends and checkpoints; recorder.py is the record stage;
reader.py serves the CLI (verify, prove, open, show, export).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ..config import Settings
from ..files import durable_dirs, write_atomically
from .keys import Keys, init_keys
from .log import EvidenceLog
from .note import NoteKey
from .recorder import EvidenceRecorder
from .witnessing import Witness

log = logging.getLogger("canarygate.evidence")


def keys_dir(settings: Settings) -> Path:
    return settings.state_dir / "keys"


def logs_dir(settings: Settings) -> Path:
    return settings.state_dir / "evidence"


def origin_of(settings: Settings) -> str:
    """The log's name: `[evidence] origin`, or else the one chosen at first start (from the hostname) and
    kept in the state folder, so that a container with a new hostname still continues its own log."""
    if settings.evidence.origin:
        return settings.evidence.origin
    path = logs_dir(settings) / "origin-name"
    if not path.exists():
        durable_dirs(logs_dir(settings))
        write_atomically(path, (settings.evidence.default_origin() + "\n").encode())
    return path.read_text().strip()


def slot_origin(origin: str, slot: int) -> str:
    return origin if slot == 0 else f"{origin}/w{slot}"


def claim_slot(directory: Path) -> int:
    """A log of its own for this process: the lowest slot whose lock no live process holds, or the one it
    holds already (a host that starts the app again reopens its log).

    Each gateway worker is one writer; slots keep their numbers across restarts, so each worker's log
    (and origin) carries on where the previous holder of the slot stopped. A lock stays held for the life of
    the process; a worker forked from it claims its own (its copy of the lock is its parent's)."""
    held = _claimed.get((directory, os.getpid()))
    if held is not None:
        return held
    durable_dirs(directory)
    slot = 0
    while True:
        fd = os.open(directory / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            slot += 1
            continue
        _claimed[directory, os.getpid()] = slot
        return slot


def slots(directory: Path) -> list[int]:
    """The numbers of the logs in `directory`, one per worker slot (not an operator's copy: "0.bak")."""
    return sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit() and p.is_dir())


_claimed: dict[tuple[Path, int], int] = {}  # (logs folder, process id) -> the slot that process holds


def open_recorder(settings: Settings) -> EvidenceRecorder:
    origin = origin_of(settings)
    created = init_keys(keys_dir(settings), origin)
    if created:
        log.warning("created keys %s in %s", ", ".join(created), keys_dir(settings))
    evidence = settings.evidence
    keys = Keys.load(keys_dir(settings))

    def open_log() -> EvidenceLog:
        slot = claim_slot(logs_dir(settings))
        return EvidenceLog(
            logs_dir(settings) / str(slot),
            keys,
            slot_origin(origin, slot),
            batch_interval=evidence.batch_interval_ms / 1000,
            checkpoint_every=evidence.checkpoint_every,
            checkpoint_interval=evidence.checkpoint_interval,
            segment_bytes=evidence.segment_bytes,
            witnesses=tuple(Witness(w.url, NoteKey.parse(w.vkey)) for w in evidence.witnesses),
        )

    return EvidenceRecorder(
        open_log,
        evidence.durability,
        evidence.unauthenticated_records,
        keys.address_key if evidence.client_addresses == "hashed" else None,
        evidence.retention_days,
    )
