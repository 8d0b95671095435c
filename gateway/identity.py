"""Identities: the registry of gateway-issued API keys, and the identify stage that checks them.

A key looks like `cg_<key id>_<secret>`. The registry stores the key id and a SHA-256 of the whole key
(keys are 256-bit random, so a fast hash is safe; no password-style stretching is needed) and never the
key. Lookup goes by key id; the hash is compared with `hmac.compare_digest`, in constant time.

The registry is one JSON file, replaced atomically by the CLI. Every worker checks it (one stat) on every
lookup and re-reads it when it changed, so a revocation or a tier change reaches all workers on their next
request, without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .exchange import ErrorKind, Exchange, GatewayError, Identity
from .files import locked, write_atomically

log = logging.getLogger("canarygate.identity")

FILE_NAME = "identities.json"
DEFAULT_TIER = "normal"
_STORED = ("key_id", "key_hash", "tier", "created", "tenant", "revoked", "pin", "tier_set")  # a record's fields
_REVOKED = "#revoked-"  # joins a revoked record's name and key id in the file ("#" is in no name)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


class IdentityError(Exception):
    """A registry operation that cannot be done (duplicate name, unknown name, bad name)."""


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    key_id: str
    key_hash: str
    tier: str
    created: float
    tenant: str | None = None
    revoked: float | None = None
    pin: str | None = None  # an operator's note: the tier is theirs, the risk engine leaves it alone
    tier_set: float = 0.0  # when an operator last set the tier (0: never since it was added)

    def identity(self) -> Identity:
        pinned = self.pin is not None
        return Identity(self.name, self.tier, self.tenant, pinned, self.tier_set or self.created, self.created,
                        self.tier != DEFAULT_TIER)  # fmt: skip


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Registry:
    """The identities file: read by workers, changed by the CLI (under a file lock, atomically)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._records: dict[str, Record] = {}  # by key id
        self._seen: tuple | None = None

    # --- reading (workers) ---

    def lookup(self, key: str) -> Record | None:
        prefix, _, rest = key.partition("_")
        key_id, _, _ = rest.partition("_")
        if prefix != "cg":
            return None
        self._refresh()
        record = self._records.get(key_id)
        if record is None or record.revoked is not None:
            return None
        return record if hmac.compare_digest(record.key_hash, _hash(key)) else None

    def live(self, name: str) -> Record | None:
        """The record registered under `name` now (re-read if the file changed), or None."""
        self._refresh()
        return next((r for r in self._records.values() if r.name == name and r.revoked is None), None)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._records, self._seen = {}, None
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._records = {r.key_id: r for r in self._read().values()}
            except IdentityError as e:  # a file edited in place, half saved: serve on with what was read last
                log.error("%s; keeping the identities read before it", e)
            # seen once read, or found invalid (read again when it changes); any other failure to read it
            # (too many open files) leaves it unseen, so that the next request reads it again
            self._seen = seen

    def _read(self) -> dict[str, Record]:
        try:
            raw = json.loads(self.path.read_bytes())
            # a revoked key is kept under "name#revoked-<key id>" (the name is free again); its record keeps the
            # name it was served under, which is what its canaries and the evidence were made for
            stored = raw.get("identities", {})
            return {key: Record(name=key.partition(_REVOKED)[0], **fields) for key, fields in stored.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, not UTF-8, not the records' shape
            raise IdentityError(f"{self.path} is not a valid identities file ({type(e).__name__})") from None

    # --- changing (CLI) ---

    def all(self) -> list[Record]:
        return sorted(self._read().values(), key=lambda r: r.created)

    def named(self, name: str) -> list[Record]:
        """Every record of `name`, oldest first: its revoked holders, then the live one if any."""
        return [record for record in self.all() if record.name == name]

    def add(self, name: str, tier: str = DEFAULT_TIER, tenant: str | None = None) -> str:
        """Register `name`; returns its new key, which is shown once and never stored."""
        if not name or not set(name) <= _NAME_CHARS or len(name) > 128:
            raise IdentityError(f"invalid name {name!r}: use letters, digits and . _ @ - (at most 128)")
        if tenant is not None and (not tenant or not tenant.isprintable() or len(tenant) > 128):
            raise IdentityError(f"invalid tenant {tenant!r}: printable characters, no line breaks (at most 128)")
        key_id = secrets.token_hex(6)
        key = f"cg_{key_id}_{secrets.token_urlsafe(32)}"
        with self._locked() as records:
            if name in records:
                raise IdentityError(f"identity {name!r} exists; revoke it first or choose another name")
            records[name] = Record(name, key_id, _hash(key), tier, time.time(), tenant)
        return key

    def set_tier(self, name: str, tier: str, pin: str | None = None) -> None:
        """Set `name`'s tier; with `pin` (the operator's reason), the risk engine no longer moves it; without, a
        pin is cleared (a change of tier alone passes the record's own pin)."""
        with self._locked() as records:
            record = _live(records, name)
            records[name] = replace(record, tier=tier, pin=pin, tier_set=time.time())

    def move(self, name: str, tier: str) -> Record:
        """Set `name`'s tier, keeping its pin as it is when written (`tier set`: a pin stays, `risk unpin` lifts
        it); read under the lock, so that a pin set meanwhile is not written over. Returns the record."""
        with self._locked() as records:
            records[name] = replace(_live(records, name), tier=tier, tier_set=time.time())
            return records[name]

    def unpin(self, name: str) -> Record:
        """Lift `name`'s pin, keeping its tier as it is when written (one set meanwhile is not undone)."""
        with self._locked() as records:
            records[name] = replace(_live(records, name), pin=None, tier_set=time.time())
            return records[name]

    def get(self, name: str) -> Record:
        return _live(self._read(), name)

    def revoke(self, name: str) -> None:
        with self._locked() as records:
            record = _live(records, name)
            records.pop(name)
            # The name is freed for reuse; the revoked key stays listed so its id is never looked up again.
            records[f"{name}{_REVOKED}{record.key_id}"] = Record(
                name,
                record.key_id,
                record.key_hash,
                record.tier,
                record.created,
                record.tenant,
                time.time(),
                record.pin,
                record.tier_set,
            )

    @contextlib.contextmanager
    def _locked(self):
        with locked(self.path.parent, self.path.with_suffix(".lock").name):
            records = self._read()
            yield records
            self._write(records)

    def _write(self, records: dict[str, Record]) -> None:
        doc = {
            "version": 1,
            "identities": {key: {f: getattr(r, f) for f in _STORED} for key, r in records.items()},
        }
        # atomically, the rename fsynced too: a key `identities add` printed must work after a power loss
        write_atomically(self.path, json.dumps(doc, indent=1).encode())


class KeyIdentifier:
    """The identify stage: a gateway-issued key, from `Authorization: Bearer` or `x-api-key`."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def identify(self, exchange: Exchange, credential: str | None) -> Identity:
        if not credential:
            raise GatewayError(ErrorKind.AUTHENTICATION, "missing API key: send the key the gateway issued you")
        record = self._registry.lookup(credential)
        if record is None:
            raise GatewayError(ErrorKind.AUTHENTICATION, "invalid API key")
        return record.identity()

    def current(self, name: str) -> Identity | None:
        record = self._registry.live(name)
        return None if record is None else record.identity()


def _live(records: dict[str, Record], name: str) -> Record:
    """The identity now registered under `name`; a revoked one's stored key ("name#revoked-id") is none: a
    tier set on it would reach the live identity of that name in admission, not the registry."""
    record = None if _REVOKED in name else records.get(name)
    if record is None:
        if any(r.name == name for r in records.values()):
            raise IdentityError(f"{name!r} is revoked; `canarygate identities add {name}` registers the name anew")
        raise IdentityError(f"no identity named {name!r}; `canarygate identities list` shows them")
    return record
