"""Per-tenant data keys: what makes a tenant's prompts and answers erasable while the log stays verifiable.

Each tenant's sealed fields are encrypted under a key of that tenant and day, a random 32-byte file
`keys/tenants/<tenant id>/<day>-<key id>.key` (0600), made on first use by each writer process. Deleting a
tenant's folder (`canarygate log shred --tenant`) or a day's files (the retention setting) erases those
bodies for good: the leaves, with their salted commitments, stay in the tree, so every checkpoint, proof
and commitment still verifies; only the openings are gone. Requests without a tenant use the tenant id of
the empty name, under the same rules. The gateway's own entries (commitments) stay under the master key.

A tenant id is a hash of the tenant's name, so that the folder names do not list customers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from ..files import durable_dirs, write_atomically

DAY = 86400
REFERENCE = re.compile(r"[0-9a-f]{32}/[0-9]+-[0-9a-f]{8}")  # tenant id / day-key id


class Erased(Exception):
    """The key that sealed an entry was deleted: its contents are erased."""


class MissingKey(Exception):
    """The key a sealed part names is gone, and no erasure took it: the sealed part was replaced (or the key
    lost). Erasures leave a record (`erasures/`): a shred the day it ran, retention the first day it keeps,
    and `since`, the day this began (keys of days before it were erased, if gone, by a version that kept no
    record: they read as erased, as they did then)."""


def tenant_id(tenant: str) -> str:
    return hashlib.sha256(b"canarygate tenant\x00" + tenant.encode()).hexdigest()[:32]


class TenantKeys:
    def __init__(self, directory: Path) -> None:
        self.dir = directory / "tenants"
        self._current: dict[str, tuple[int, str, bytes]] = {}  # tenant -> (day, reference, key)
        self._records_begun = False

    def current(self, tenant: str) -> tuple[str, bytes]:
        """(reference, key) to seal today's entries of `tenant`, making a key if there is none or it was
        deleted (shredded) since: one stat per call, so a shred takes effect at the next batch. It may
        write a file (fsynced): call it off the event loop."""
        day = int(time.time() // DAY)
        self._begin_records(day)
        cached = self._current.get(tenant)
        if cached is not None and cached[0] == day and (self.dir / f"{cached[1]}.key").exists():
            return cached[1], cached[2]
        reference = f"{tenant_id(tenant)}/{day}-{secrets.token_hex(4)}"
        key = secrets.token_bytes(32)
        path = self.dir / f"{reference}.key"
        for attempt in range(2):
            durable_dirs(path.parent)
            try:
                write_atomically(path, key)
                break
            except FileNotFoundError:  # a shred removed the folder between the two: make it again, once
                if attempt:
                    raise
        self._current[tenant] = (day, reference, key)
        return reference, key

    def load(self, reference: str) -> bytes:
        path = self.dir / f"{reference}.key"
        if not REFERENCE.fullmatch(reference):
            raise MissingKey(f"names no tenant key ({reference[:40]!r})")
        if path.exists():
            return path.read_bytes()
        tenant, day_and_key = reference.split("/")
        day = int(day_and_key.split("-")[0])
        since = self._recorded("since")
        recorded = day <= self._recorded(tenant) or day < self._recorded("retention")
        # before records began: erased by a version that recorded nothing. Since then every shred and expiry is
        # recorded, so a key (or a whole tenant's folder) missing otherwise is tampering or loss, not erasure
        if recorded or since < 0 or day < since:
            raise Erased(f"erased: its tenant key {reference} was deleted (shredded, or past retention)")
        raise MissingKey(f"names tenant key {reference}, which no shred or retention deleted")

    def shred(self, tenant: str) -> int:
        """Delete every key of `tenant`; returns how many there were. The shred is recorded first (its day),
        so that entries under the keys it deletes read as erased, and a key missing otherwise as tampering."""
        folder = self.dir / tenant_id(tenant)
        count = len(list(folder.glob("*.key"))) if folder.exists() else 0
        self._begin_records(int(time.time() // DAY))
        self._record(tenant_id(tenant), int(time.time() // DAY))
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def expire(self, retention_days: int, now: float | None = None) -> int:
        """Delete the keys of days that ended more than `retention_days` ago; returns how many."""
        oldest_kept = int((time.time() if now is None else now) // DAY) - retention_days
        self._begin_records(int(time.time() // DAY))
        self._record("retention", oldest_kept)
        count = 0
        for path in self.dir.glob("*/*.key"):
            day = path.name.split("-")[0]
            if day.isdigit() and int(day) < oldest_kept:
                with contextlib.suppress(FileNotFoundError):  # another worker, or a shred, got there first
                    os.unlink(path)
                    count += 1
        return count

    def _begin_records(self, day: int) -> None:
        """Note the day erasures began to be recorded, once (a stat per call until then)."""
        if not self._records_begun:
            if self._recorded("since") < 0:
                self._record("since", day)
            self._records_begun = True

    def _recorded(self, name: str) -> int:
        """The day an erasure recorded under `name` reached (-1: none)."""
        path = self.dir / "erasures" / name
        return int(path.read_text()) if path.exists() else -1

    def _record(self, name: str, day: int) -> None:
        if day > self._recorded(name):
            durable_dirs(self.dir / "erasures")
            write_atomically(self.dir / "erasures" / name, str(day).encode())
