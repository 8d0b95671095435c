"""Reading an evidence log for the CLI: verify it, prove an entry, open a field, list and export entries.

Reading never changes a log (a live gateway may be writing it): a torn last record is reported, not cut.
`verify` trusts nothing but the segments and the public key: it recomputes every leaf hash and root from
the segments, checks every checkpoint's signature, the consistency of successive checkpoints, the stored
tree (which proofs are served from) against the recomputed one, and (with the keys) that every sealed
opening decrypts and matches its commitment.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag

from . import entry, merkle, note, verifier
from .keys import Keys
from .store import HASH, INDEX_ENTRY, CorruptLog, Segment, frames, read_entry, segment_paths
from .tenants import DAY, REFERENCE, Erased, MissingKey, TenantKeys, tenant_id


class VerifyError(Exception):
    """The first thing found wrong, naming the entry or checkpoint."""


@dataclass
class Entry:
    index: int
    leaf: bytes
    sealed: bytes
    segment: int
    offset: int  # of its record in the segment

    @functools.cached_property
    def public(self) -> dict:
        """The leaf as JSON, read once: verifying an entry reads it in three places."""
        try:
            public = json.loads(self.leaf)
        except ValueError:
            public = None
        if not isinstance(public, dict):  # its CRC holds: written so, or forged with one
            raise VerifyError(f"entry {self.index}: its leaf is not a JSON object")
        return public


@dataclass
class VerifyReport:
    origin: str
    entries: int
    checkpoints: int
    covered: int  # entries under the latest checkpoint
    opened: int = 0
    erased: int = 0  # entries whose contents were erased (tenant key shredded or past retention)
    warnings: list[str] = field(default_factory=list)


class LogReader:
    def __init__(self, directory: Path, keys: Keys | None = None) -> None:
        self.dir = Path(directory)
        self.keys = keys

    def entries(self, strict: bool = True) -> Iterator[Entry]:
        """Every intact entry in order; raises VerifyError at damage (not strict: a torn end just ends it,
        as when a live gateway is halfway through a write)."""
        index = 0
        segments = segment_paths(self.dir)
        for position, path in enumerate(segments):
            try:
                segment = Segment(path)
            except (CorruptLog, struct.error) as e:
                raise VerifyError(f"{path.name}: bad segment header ({e})") from None
            if segment.first != index:
                raise VerifyError(
                    f"entry {index}: {path.name} starts at entry {segment.first} (entries missing or repeated)"
                )
            for offset, leaf, sealed, intact in segment.records():
                if not intact:
                    if not strict and position == len(segments) - 1:
                        return
                    where = "torn last record" if position == len(segments) - 1 else "damaged record"
                    raise VerifyError(f"entry {index}: {where} in {path.name} at byte {offset}")
                yield Entry(index, leaf, sealed, segment.number, offset)
                index += 1

    def cosigned(self) -> list[str]:
        """Checkpoints as witnesses cosigned them, oldest first (a torn last frame is left out)."""
        path = self.dir / "cosignatures.log"
        return [n.decode("utf-8", "replace") for n in frames(path.read_bytes())] if path.exists() else []

    def checkpoints(self) -> list[str]:
        path = self.dir / "checkpoints.log"
        data = path.read_bytes() if path.exists() else b""
        notes = frames(data)
        if sum(4 + len(n) for n in notes) != len(data):
            raise VerifyError("checkpoints.log is truncated")
        return [n.decode("utf-8", "replace") for n in notes]

    def verifiers(self, vkeys: list[str] | None) -> list[note.NoteKey]:
        if vkeys:
            return [note.NoteKey.parse(v) for v in vkeys]
        if self.keys is None:
            raise VerifyError("no public key: pass --vkey or run where the keys are")
        return self.keys.verifiers(self.origin())

    def origin(self) -> str:
        try:
            return (self.dir / "origin").read_text().strip()
        except OSError:
            raise VerifyError(f"{self.dir} is not an evidence log (no origin file)") from None
        except UnicodeDecodeError:
            raise VerifyError(f"{self.dir}/origin is damaged (not UTF-8)") from None

    def verify(self, vkeys: list[str] | None = None, gossip: Sequence[tuple[str, str]] = ()) -> VerifyReport:
        """Check the log; `gossip`: (where from, note) of checkpoints seen elsewhere (a witness's latest), each
        of which must be one this log's entries give: signed by its key, of a size it has, with its root."""
        verifiers = self.verifiers(vkeys)
        checkpoints = [self._open_checkpoint(i, n, verifiers) for i, n in enumerate(self.checkpoints())]
        wanted = {c.size: c for c in checkpoints}
        tree = merkle.CompactRange()
        leaves: list[bytes] = []
        places: list[tuple[int, int]] = []  # (segment, offset) of each entry, as the index should say
        opened = erased = 0
        tenants: dict[str, str] = {}  # exchange id -> its tenant, from its begin entry, for its end entry's
        for item in self.entries():
            self._check_entry(item)
            if self.keys is not None:
                if self._check_openings(item, tenants):
                    opened += 1
                else:
                    erased += 1
            leaves.append(merkle.leaf_hash(item.leaf))
            places.append((item.segment, item.offset))
            tree.append(leaves[-1])
            checkpoint = wanted.get(tree.size)
            if checkpoint is not None and tree.root() != checkpoint.root:
                raise VerifyError(
                    f"checkpoint at size {checkpoint.size}: root does not match entries 0-"
                    f"{tree.size - 1} (an entry was changed, removed, added or moved)"
                )
        subtree = _memory_subtree(leaves)
        self._check_checkpoint_chain(checkpoints, leaves, subtree)
        self._check_other_signed_checkpoints(verifiers, leaves, subtree, gossip)
        self._check_stored_tree(leaves)
        self._check_stored_index(places)
        report = VerifyReport(
            checkpoints[-1].origin if checkpoints else self.origin(),
            len(leaves),
            len(checkpoints),
            checkpoints[-1].size if checkpoints else 0,
            opened,
            erased,
        )
        if report.entries and not checkpoints:
            raise VerifyError(
                f"no signed checkpoint: nothing vouches for entries 0-{report.entries - 1} (a new log signs its "
                "first after checkpoint_every entries or checkpoint_interval seconds, and at shutdown; a log whose "
                "checkpoints were removed looks the same)"
            )
        if report.covered < report.entries:
            report.warnings.append(f"entries {report.covered}-{report.entries - 1} are not yet under a checkpoint")
        return report

    def _open_checkpoint(self, position: int, text: str, verifiers: list[note.NoteKey]) -> note.Checkpoint:
        try:
            return note.open_checkpoint(text, verifiers)
        except note.NoteError:
            pass
        raise VerifyError(f"checkpoint {position}: signature does not verify with the log's public key")

    def _check_entry(self, item: Entry) -> None:
        public = item.public
        if entry.canonical(public) != item.leaf or public.get("v") != entry.SCHEMA_VERSION:
            raise VerifyError(f"entry {item.index}: not a canonical version-{entry.SCHEMA_VERSION} entry")

    def _check_openings(self, item: Entry, tenants: dict[str, str]) -> bool:
        """Whether the entry's sealed fields open and match their commitments (False: erased)."""
        public = item.public
        kind, exchange = public.get("kind"), public.get("id")
        if kind == "begin" and "tenant" in public:  # the gateway's begin entries say whose the exchange is
            tenants[exchange] = public["tenant"] or ""
        try:
            self.open_all(item, tenants.pop(exchange, None) if kind == "end" else None)
        except Erased:
            return False
        except VerifyError:
            raise
        except Exception:
            raise VerifyError(
                f"entry {item.index}: sealed values do not decrypt for this entry (moved, changed "
                "or under an unknown key)"
            ) from None
        return True

    def _check_checkpoint_chain(self, checkpoints: list[note.Checkpoint], leaves: list[bytes], subtree) -> None:
        previous = None
        for position, checkpoint in enumerate(checkpoints):
            if checkpoint.size > len(leaves):
                raise VerifyError(
                    f"checkpoint {position}: covers {checkpoint.size} entries but the log holds "
                    f"{len(leaves)} (entries were removed or the log truncated)"
                )
            if checkpoint.root != merkle.range_hash(subtree, 0, checkpoint.size):
                raise VerifyError(f"checkpoint {position}: root does not match the entries")
            if previous is not None:
                if checkpoint.size < previous.size:
                    raise VerifyError(f"checkpoint {position}: tree shrank from {previous.size} to {checkpoint.size}")
                proof = merkle.consistency_proof(subtree, previous.size, checkpoint.size)
                try:
                    merkle.verify_consistency(previous.size, checkpoint.size, previous.root, checkpoint.root, proof)
                except merkle.ProofError as e:
                    raise VerifyError(
                        f"checkpoint {position}: not consistent with checkpoint {position - 1}: {e}"
                    ) from None
            previous = checkpoint

    def _check_other_signed_checkpoints(self, verifiers, leaves: list[bytes], subtree, gossip=()) -> None:
        """The log's signature on a checkpoint kept elsewhere in the folder (the latest, as served; those the
        witnesses cosigned) vouches for the entries too: cutting the segments and checkpoints.log back to an
        earlier checkpoint passed verification while these still held the larger log. So does one seen
        elsewhere (`gossip`: (where from, note)), which must also be signed by this log."""
        path = self.dir / "checkpoint"
        kept = [("checkpoint", path.read_text("utf-8", "replace"))] if path.exists() else []
        kept += [("cosignatures.log", text) for text in self.cosigned()]
        for where, text in kept:
            with contextlib.suppress(note.NoteError):  # not signed by this log's keys: it vouches for nothing here
                _check_given(where, note.open_checkpoint(text, verifiers), leaves, subtree)
        for where, text in gossip:
            try:
                signed = note.open_checkpoint(text, verifiers)
            except note.NoteError as e:
                raise VerifyError(f"{where}: not a checkpoint of this log ({e})") from None
            _check_given(where, signed, leaves, subtree)

    def _check_stored_tree(self, leaves: list[bytes]) -> None:
        """The stored tree and index, which proofs are served from, must agree with the entries."""
        level0 = self.dir / "tree" / "level-0.bin"
        stored = level0.read_bytes() if level0.exists() else b""
        for index, leaf in enumerate(leaves[: len(stored) // HASH]):
            if stored[index * HASH : (index + 1) * HASH] != leaf:
                raise VerifyError(f"entry {index}: stored tree hash differs from the entry's hash")
        level, nodes = 1, leaves
        while len(nodes) > 1:
            nodes = [merkle.node_hash(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
            path = self.dir / "tree" / f"level-{level}.bin"
            data = path.read_bytes() if path.exists() else b""
            for i in range(min(len(nodes), len(data) // HASH)):
                if data[i * HASH : (i + 1) * HASH] != nodes[i]:
                    raise VerifyError(f"stored tree level {level} node {i} differs from the entries")
            level += 1

    def _check_stored_index(self, places: list[tuple[int, int]]) -> None:
        """The index, which `prove`, `open` and `export` find entries through, must point at each entry's
        record (entries it does not reach yet, written after it, are rebuilt at the gateway's next start)."""
        path = self.dir / "index.bin"
        stored = path.read_bytes() if path.exists() else b""
        for index, place in enumerate(places[: len(stored) // INDEX_ENTRY.size]):
            if INDEX_ENTRY.unpack_from(stored, index * INDEX_ENTRY.size) != place:
                raise VerifyError(f"entry {index}: the stored index points elsewhere than its record")

    # --- single entries ---

    def get(self, index: int) -> Entry:
        try:
            return Entry(index, *read_entry(self.dir, index))
        except (IndexError, CorruptLog) as e:
            raise VerifyError(str(e)) from None
        except struct.error:  # the index or a segment's header points past what the file holds
            raise VerifyError(f"entry {index}: the index or its segment is damaged; run `log verify`") from None

    def open_all(self, item: Entry, tenant: str | None = None) -> dict:
        """Every sealed field of the entry, each checked against its commitment in the leaf (a sealed part
        copied from another log's entry of the same index and tenant key would open too); raises Erased when
        its tenant's key was shredded or expired. `tenant`: whose entry it is, where the entry itself does
        not say (an end entry's is its begin's)."""
        openings = self._unsealed(item, tenant)
        try:
            verifier.check_openings(item.public, openings)
        except verifier.VerificationError as e:
            raise VerifyError(f"entry {item.index}: {e}") from None
        return openings

    def _unsealed(self, item: Entry, tenant: str | None) -> dict:
        try:
            return self._unseal(item, tenant)
        except (InvalidTag, ValueError):  # AES-GCM refused it, or a key file is not a key
            raise VerifyError(
                f"entry {item.index}: its sealed part does not open (a damaged record, or a key that is not the "
                "one it was sealed with)"
            ) from None

    def _unseal(self, item: Entry, tenant: str | None) -> dict:
        if self.keys is None:
            raise VerifyError("the keys are needed to open sealed values")
        segment = Segment(self.dir / f"segment-{item.segment:06d}.log")
        log_key = entry.data_key(self.keys.masters[segment.key_epoch], self.origin(), item.segment)
        identity = item.public.get("identity")
        if segment.version == 1:
            return entry.Sealer(log_key).unseal(item.index, identity, item.sealed)
        reference, sealed, context = entry.split_sealed(item.sealed)
        if reference:
            _check_sealed_by(item, reference, tenant)
        try:
            key = TenantKeys(self.keys.directory).load(reference) if reference else log_key
        except MissingKey as e:
            raise VerifyError(f"entry {item.index}: its sealed part {e} (it was replaced)") from None
        return entry.Sealer(key).unseal(item.index, identity, sealed, context)

    def open_field(self, index: int, name: str) -> dict:
        item = self.get(index)
        openings = self.open_all(item)
        if name not in openings:
            raise VerifyError(f"entry {index} has no field {name!r}; it has {', '.join(sorted(openings))}")
        salt, value = base64.b64decode(openings[name]["salt"]), base64.b64decode(openings[name]["value"])
        return {
            "leaf_index": index,
            "field": name,
            "value": _text_or_base64(value),
            "value_base64": openings[name]["value"],
            "salt": openings[name]["salt"],
            "commitment": entry.commitment(salt, value),
        }

    def prove(self, index: int, checkpoint_note: str | None = None) -> dict:
        """Inclusion proof of entry `index` under `checkpoint_note` (default: the latest checkpoint)."""
        if checkpoint_note is None:
            notes = self.checkpoints()
            if not notes:
                raise VerifyError("no checkpoint yet: wait for one (every few seconds) or stop the gateway")
            checkpoint_note = notes[-1]
        checkpoint = note.Checkpoint.parse(checkpoint_note.split("\n\n")[0] + "\n")
        if index >= checkpoint.size:
            try:
                self.get(index)
            except VerifyError:
                raise VerifyError(f"the log has no entry {index}") from None
            raise VerifyError(f"entry {index} is not under the latest checkpoint (size {checkpoint.size}) yet")
        item = self.get(index)
        proof = merkle.inclusion_proof(self.stored_subtree, index, checkpoint.size)
        b64 = base64.b64encode
        return {
            "leaf_index": index,
            "tree_size": checkpoint.size,
            "leaf": b64(item.leaf).decode(),
            "leaf_hash": b64(merkle.leaf_hash(item.leaf)).decode(),
            "proof": [b64(p).decode() for p in proof],
            "checkpoint": checkpoint_note,
        }

    def stored_subtree(self, level: int, index: int) -> bytes:
        try:
            with open(self.dir / "tree" / f"level-{level}.bin", "rb") as f:
                data = os.pread(f.fileno(), HASH, index * HASH)
        except FileNotFoundError:  # the gateway rebuilds the stored tree from the segments when it opens the log
            raise VerifyError(f"stored tree level {level} is missing; start the gateway once to rebuild it") from None
        if len(data) != HASH:
            raise VerifyError(f"stored tree level {level} has no node {index} yet; try again in a moment")
        return data


def _check_sealed_by(item: Entry, reference: str, tenant: str | None) -> None:
    """The tenant key a sealed part names must be one that sealed entries like this one: well formed, of the
    entry's tenant (where it is known) and of the day it was written. The sealed part lies outside the tree,
    so that erasing a key erases the contents and leaves every proof intact; without this check, replacing it
    with one that names a key that does not exist would pass for an erasure. A key of the right tenant and day
    that is missing reads as erased only where a shred or retention recorded deleting it (TenantKeys.load)."""
    public = item.public
    if public.get("kind") == "commitment":  # the gateway's own entries: under the log's key, never erased
        raise VerifyError(f"entry {item.index}: a commitment's sealed part names a tenant key (it was replaced)")
    if not REFERENCE.fullmatch(reference):
        raise VerifyError(f"entry {item.index}: its sealed part names no tenant key ({reference[:40]!r})")
    if "tenant" in public or public.get("kind") == "summary":
        tenant = public.get("tenant") or ""
    named, day_and_key = reference.split("/")
    day = int(day_and_key.split("-")[0])
    if tenant is not None and named != tenant_id(tenant):
        raise VerifyError(f"entry {item.index}: sealed under another tenant's key (its sealed part was replaced)")
    written = _day_of(public.get("time"))
    # sealed when written, a moment after (or before, by a clock stepped back across midnight)
    if written is not None and day not in (written - 1, written, written + 1):
        raise VerifyError(f"entry {item.index}: sealed under a key of day {day}, not of its own ({written})")


def _day_of(time_text: object) -> int | None:
    """The day number (as tenant keys count days) of an entry's ISO time, or None."""
    try:
        return int(datetime.datetime.fromisoformat(str(time_text)).timestamp() // DAY)  # entries' times end in Z
    except ValueError:
        return None


def _check_given(where: str, signed: note.Checkpoint, leaves: list[bytes], subtree) -> None:
    """A checkpoint the log signed must be one its entries give."""
    if signed.size and (signed.size > len(leaves) or signed.root != merkle.range_hash(subtree, 0, signed.size)):
        raise VerifyError(
            f"{where}: the log signed a checkpoint of {signed.size} entries that the {len(leaves)} entries here do "
            "not give (entries were removed or changed, the log rolled back, or it showed another tree elsewhere: "
            "a fork)"
        )


def _memory_subtree(leaves: list[bytes]):
    cache: dict[tuple[int, int], bytes] = {}

    def subtree(level: int, index: int) -> bytes:
        if level == 0:
            return leaves[index]
        key = (level, index)
        if key not in cache:
            cache[key] = merkle.node_hash(subtree(level - 1, 2 * index), subtree(level - 1, 2 * index + 1))
        return cache[key]

    return subtree


def _text_or_base64(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def verify_proof(bundle: dict, vkey: str) -> None:
    """What a third party runs on `log prove` output with the public key alone."""
    verifier.verify_inclusion_proof(bundle, [note.NoteKey.parse(vkey)])


def commitments(readers: list[LogReader]) -> list[dict]:
    """Every commitment entry in the logs, oldest first per log: its public fields, log, index, and whether
    a checkpoint covers it yet."""
    found = []
    for reader in readers:
        notes = reader.checkpoints()
        covered = note.Checkpoint.parse(verifier.split_note(notes[-1])[0]).size if notes else 0
        for item in reader.entries(strict=False):
            public = item.public
            if public.get("kind") == "commitment":
                found.append(
                    {**public, "log": reader.origin(), "index": item.index, "checkpointed": item.index < covered}
                )
    return found
