"""The evidence log on disk: segments of records, the Merkle tree level by level, an index, checkpoints.

Layout of a log directory:
- `segment-NNNNNN.log`: a header (magic, first entry index, key epoch), then records
  `u32 leaf length | u32 sealed length | u32 CRC-32 | leaf | sealed` (sealed: see entry.seal_record), the
  CRC taken over both lengths and the body (so a run of zeros left by a crash never reads as a record).
  New segments start as a temporary file that is renamed into place, with the directory fsynced.
- `tree/level-K.bin`: the hashes of every complete, aligned subtree of 2**K leaves, 32 bytes each, in
  order (level 0 holds the leaf hashes). Any inclusion or consistency proof is a few reads, no rebuild.
- `index.bin`: per entry, u32 segment number and u64 offset of its record.
- `checkpoints.log`: every signed checkpoint note, each as `u32 length | note`.
- `cosignatures.log`: checkpoints as witnesses cosigned them (the note plus their signature lines), framed
  the same way.

Only segments are the source of truth: on open, a torn last record (and a torn last checkpoint frame) is
cut off, and the tree and index are brought back in line with the segments: cut where they lead,
recomputed where they lag or disagree. The tree and index are fsynced before a checkpoint is signed.
This module is synchronous and single-writer; `log.py` drives it from one thread.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..files import durable_dirs, pwrite_all, write_all, write_atomically
from . import merkle

log = logging.getLogger("canarygate.evidence")

MAGIC = b"CGEVLOG2"  # version 2: each sealed part names its key (tenants.py); version 1 segments stay readable
MAGIC_V1 = b"CGEVLOG1"
SEGMENT_HEADER = struct.Struct(">8sQI")  # magic, first entry index, key epoch
RECORD_HEADER = struct.Struct(">III")  # leaf length, sealed length, crc32
INDEX_ENTRY = struct.Struct(">IQ")  # segment number, offset
HASH = 32


class CorruptLog(Exception):
    """The log's files contradict each other in a way a crash cannot explain."""


def record_crc(leaf_len: int, sealed_len: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(struct.pack(">II", leaf_len, sealed_len)))


def frames(data: bytes) -> list[bytes]:
    """The complete `u32 length | bytes` frames of a file of notes; a torn last frame is left out, and so is a
    run of zeros (a file grown by a crash whose data never reached the disk): no frame is empty. Notes are
    text, so a last frame holding a NUL byte was torn the same way (its length reached the disk, not all of
    its text); one before it is left for verification to refuse."""
    frames, offset = [], 0
    while offset + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        if length == 0 or offset + 4 + length > len(data):
            break
        frames.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if frames and b"\x00" in frames[-1]:
        frames.pop()
    return frames


def _cut_torn_frame(fd: int) -> None:
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    complete = sum(4 + len(frame) for frame in frames(data))
    if complete != len(data):
        os.ftruncate(fd, complete)
        os.fsync(fd)


def segment_paths(directory: Path) -> list[Path]:
    """The log's segments in order: named as the store names them, not an operator's copy beside them
    ("segment-000000.bak.log")."""
    return sorted(path for path in directory.glob("segment-*.log") if _SEGMENT_NAME.fullmatch(path.name))


_SEGMENT_NAME = re.compile(r"segment-\d{6,}\.log")


def read_entry(directory: Path, index: int) -> tuple[bytes, bytes, int, int]:
    """(leaf, sealed, segment number, offset in it) of entry `index`, found through the index; read-only."""
    raw = b""
    if index >= 0:
        with open(directory / "index.bin", "rb") as f:
            raw = os.pread(f.fileno(), INDEX_ENTRY.size, index * INDEX_ENTRY.size)
    if len(raw) != INDEX_ENTRY.size:
        raise IndexError(f"no entry {index}")
    number, offset = INDEX_ENTRY.unpack(raw)
    path = directory / f"segment-{number:06d}.log"
    with open(path, "rb") as f:
        f.seek(offset)
        leaf_len, sealed_len, crc = RECORD_HEADER.unpack(f.read(RECORD_HEADER.size))
        body = f.read(leaf_len + sealed_len)
    if record_crc(leaf_len, sealed_len, body) != crc:
        raise CorruptLog(f"entry {index} in {path.name} is damaged")
    return body[:leaf_len], body[leaf_len:], number, offset


class Segment:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.number = int(path.stem.split("-")[1])
        with open(path, "rb") as f:
            magic, self.first, self.key_epoch = SEGMENT_HEADER.unpack(f.read(SEGMENT_HEADER.size))
        self.version = 2 if magic == MAGIC else 1
        if magic not in (MAGIC, MAGIC_V1):
            raise CorruptLog(f"{path.name}: not an evidence segment")

    def records(self) -> Iterator[tuple[int, bytes, bytes, bool]]:
        """(offset, leaf, sealed, intact) for each record; the last may be torn (intact False)."""
        data = self.path.read_bytes()
        offset = SEGMENT_HEADER.size
        while offset < len(data):
            end, intact = _record_at(data, offset)
            if not intact:
                yield offset, b"", b"", False
                return
            leaf_end = offset + RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, offset)[0]
            yield offset, data[offset + RECORD_HEADER.size : leaf_end], data[leaf_end:end], True
            offset = end

    def intact_after(self, offset: int) -> int:
        """How many intact records follow the damaged one at `offset`: the first is searched for at every later
        byte (the damage may be in the lengths its header gives), the rest read by their lengths."""
        data, count = self.path.read_bytes(), 0
        start = next((at for at in range(offset + 1, len(data)) if _record_at(data, at)[1]), None)
        while start is not None and start < len(data):
            start, intact = _record_at(data, start)
            count += intact
        return count


def _record_at(data: bytes, offset: int) -> tuple[int | None, bool]:
    """(where the record at `offset` ends, None where its header cannot say; whether it is intact)."""
    if offset + RECORD_HEADER.size > len(data):
        return None, False
    leaf_len, sealed_len, crc = RECORD_HEADER.unpack_from(data, offset)
    start = offset + RECORD_HEADER.size
    end = start + leaf_len + sealed_len
    if end > len(data) or leaf_len == 0:
        return None, False
    return end, record_crc(leaf_len, sealed_len, data[start:end]) == crc


class LogStore:
    def __init__(self, directory: Path, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.size = 0
        self._levels: list[int] = []  # fds of tree/level-K.bin
        self._frontier: dict[int, bytes] = {}  # level -> left node still waiting for its right sibling
        self._segment_fd: int | None = None
        self._segment: Segment | None = None
        self._segment_end = 0
        self._index_fd: int | None = None
        self._checkpoint_fd: int | None = None
        self._cosigned_fd: int | None = None

    # --- opening and recovery ---

    def open(self, key_epoch: int, trusted: tuple[int, bytes] | None = None) -> None:
        """Open for appending. `trusted` is the (size, root) of the latest verified checkpoint: the stored
        tree is kept up to it if it still gives that root, and recomputed from the segments after it."""
        durable_dirs(self.dir / "tree")
        os.chmod(self.dir, 0o700)
        segments = self.segments()
        for before, after in zip(segments, segments[1:], strict=False):
            if after.first < before.first:
                raise CorruptLog(f"{after.path.name} starts at entry {after.first}, before {before.path.name}")
        records = self._count_and_cut(segments[-1], trusted[0] if trusted else 0) if segments else 0
        self._index_fd = os.open(self.dir / "index.bin", os.O_RDWR | os.O_CREAT, 0o600)
        self._checkpoint_fd = os.open(self.dir / "checkpoints.log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._cosigned_fd = os.open(self.dir / "cosignatures.log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        for fd in (self._checkpoint_fd, self._cosigned_fd):  # a frame after a torn one would be swallowed by it
            _cut_torn_frame(fd)
        for level in range(max(records, 1).bit_length()):
            self._level_fd(level)
        self._resync(records, trusted)
        if not segments:
            self._new_segment(key_epoch)
        else:
            self._segment = segments[-1]
            self._segment_fd = os.open(self._segment.path, os.O_WRONLY | os.O_APPEND)
            self._segment_end = os.fstat(self._segment_fd).st_size
            if self._segment.key_epoch != key_epoch or self._segment.version != 2:
                self._new_segment(key_epoch)

    @staticmethod
    def _count_and_cut(last: Segment, covered: int) -> int:
        """Entries in the log: those before the last segment, plus its intact records. A torn write at the
        end (a crash mid-batch) is cut off; rolled segments are never written again, so only the last
        segment is read. Checkpoints are signed only over entries on disk, so damage to an entry the latest
        one covers (`covered` entries) is no torn write: the log stops there, and nothing is cut."""
        count = last.first
        for offset, _, _, intact in last.records():
            if not intact:
                following = last.intact_after(offset)
                if count < covered or following:
                    why = f"{following} intact entries follow it"
                    if count < covered:
                        why = f"covered by the latest checkpoint ({covered} entries)"
                    raise CorruptLog(
                        f"{last.path.name}: entry {count} (byte {offset}) is damaged but {why}, which no crash "
                        "explains; nothing was cut: restore the file from a copy, or move the log aside"
                    )
                log.warning("%s: cut a torn record at byte %d (entry %d), as a crash leaves", last.path, offset, count)
                with open(last.path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                break
            count += 1
        return count

    def segments(self) -> list[Segment]:
        return [Segment(p) for p in segment_paths(self.dir)]

    def _level_fd(self, level: int) -> int:
        while len(self._levels) <= level:
            path = self.dir / "tree" / f"level-{len(self._levels)}.bin"
            self._levels.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        return self._levels[level]

    def _resync(self, records: int, trusted: tuple[int, bytes] | None) -> None:
        """Make the tree and index describe exactly the first `records` entries.

        What the last checkpoint vouches for is kept if the stored tree still gives its root; everything
        after it is recomputed from the segments (a crash can leave the tree and index behind, ahead, or,
        after a power loss, the right size with the wrong bytes)."""
        keep = 0
        if trusted is not None and trusted[0] <= records:
            try:
                if self.root(trusted[0]) == trusted[1]:
                    keep = trusted[0]
            except (CorruptLog, IndexError):
                keep = 0
        # never past what every file holds: cutting is safe, extending with zeros is not
        keep = min(keep, os.fstat(self._index_fd).st_size // INDEX_ENTRY.size)
        for level, fd in enumerate(self._levels):
            keep = min(keep, ((os.fstat(fd).st_size // HASH + 1) << level) - 1)
        for level, fd in enumerate(self._levels):
            os.ftruncate(fd, (keep >> level) * HASH)
        os.ftruncate(self._index_fd, keep * INDEX_ENTRY.size)
        self.size = keep
        self._frontier = {
            level: self.subtree(level, (keep >> level) - 1) for level in range(len(self._levels)) if (keep >> level) & 1
        }
        if keep < records:
            self._add_leaves([(merkle.leaf_hash(leaf), n, at) for n, at, leaf, _ in self._records_from(keep)])

    def _records_from(self, start: int) -> Iterator[tuple[int, int, bytes, bytes]]:
        """(segment number, offset, leaf, sealed) of every intact entry from index `start` on."""
        segments = self.segments()
        first = max((i for i, s in enumerate(segments) if s.first <= start), default=0)
        for segment in segments[first:]:
            index = segment.first
            for offset, leaf, sealed, intact in segment.records():
                if not intact:
                    return
                if index >= start:
                    yield segment.number, offset, leaf, sealed
                index += 1

    # --- appending ---

    def _new_segment(self, key_epoch: int) -> None:
        if self._segment_fd is not None:
            os.close(self._segment_fd)
        number = self._segment.number + 1 if self._segment else 0
        path = self.dir / f"segment-{number:06d}.log"
        write_atomically(path, SEGMENT_HEADER.pack(MAGIC, self.size, key_epoch))
        self._segment = Segment(path)
        self._segment_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._segment_end = SEGMENT_HEADER.size

    @property
    def segment(self) -> Segment:
        return self._segment

    def needs_roll(self, key_epoch: int) -> bool:
        """Whether the next batch needs a new segment: the current one is full or under another key epoch."""
        return self._segment.key_epoch != key_epoch or self._segment_end >= self.segment_bytes

    def roll_if_needed(self, key_epoch: int) -> None:
        """Start a new segment if `needs_roll`; called before a batch is sealed (each segment has its own key)."""
        if self.needs_roll(key_epoch):
            self._new_segment(key_epoch)

    def append(self, records: list[tuple[bytes, bytes]], sync: bool = True) -> int:
        """Write records (leaf, sealed) to the current segment, fsync it, then extend the tree."""
        chunks, offsets, offset = [], [], self._segment_end
        for leaf, sealed in records:
            body = leaf + sealed
            chunks.append(RECORD_HEADER.pack(len(leaf), len(sealed), record_crc(len(leaf), len(sealed), body)) + body)
            offsets.append(offset)
            offset += len(chunks[-1])
        try:
            write_all(self._segment_fd, b"".join(chunks))
        except OSError:
            os.ftruncate(self._segment_fd, self._segment_end)  # leave no half batch behind
            raise
        if sync:
            os.fsync(self._segment_fd)
        self._segment_end = offset
        number = self._segment.number
        self._add_leaves([(merkle.leaf_hash(leaf), number, at) for (leaf, _), at in zip(records, offsets, strict=True)])
        return self.size

    def _add_leaves(self, leaves: list[tuple[bytes, int, int]]) -> None:
        """Extend the index and every tree level by (leaf hash, segment, offset) entries.

        New index entries and new nodes of each level are contiguous, so each file gets one write per batch."""
        first = self.size
        index_bytes = bytearray()
        new_nodes: dict[int, bytearray] = {}
        for leaf_hash, segment, offset in leaves:
            index = self.size
            index_bytes += INDEX_ENTRY.pack(segment, offset)
            node, level = leaf_hash, 0
            while True:
                new_nodes.setdefault(level, bytearray()).extend(node)
                if not (index >> level) & 1:
                    self._frontier[level] = node
                    break
                node = merkle.node_hash(self._frontier.pop(level), node)
                level += 1
            self.size += 1
        pwrite_all(self._index_fd, index_bytes, first * INDEX_ENTRY.size)
        for level, data in new_nodes.items():  # the new nodes are the last ones of their level
            first_node = (self.size >> level) - len(data) // HASH
            pwrite_all(self._level_fd(level), data, first_node * HASH)

    def sync(self) -> None:
        """Make every record written so far durable (the tree and index are rebuilt from segments if lost)."""
        os.fsync(self._segment_fd)

    # --- reading ---

    def subtree(self, level: int, index: int) -> bytes:
        data = os.pread(self._levels[level], HASH, index * HASH)
        if len(data) != HASH:
            raise CorruptLog(f"tree level {level} has no node {index}")
        return data

    def root(self, size: int | None = None) -> bytes:
        return merkle.range_hash(self.subtree, 0, self.size if size is None else size)

    # --- checkpoints ---

    def add_checkpoint(self, note: str) -> None:
        """Keep a signed checkpoint, once the tree and index it summarises are on disk too."""
        for fd in (self._index_fd, *self._levels):
            os.fsync(fd)
        data = note.encode()
        write_all(self._checkpoint_fd, struct.pack(">I", len(data)) + data)
        os.fsync(self._checkpoint_fd)
        write_atomically(self.dir / "checkpoint", data)

    def add_cosigned(self, note: str) -> None:
        """Keep a checkpoint with a witness's cosignature (`cosignatures.log`, frames like checkpoints)."""
        data = note.encode()
        end = os.fstat(self._cosigned_fd).st_size
        try:
            write_all(self._cosigned_fd, struct.pack(">I", len(data)) + data)
            os.fsync(self._cosigned_fd)
        except OSError:
            os.ftruncate(self._cosigned_fd, end)  # no torn frame: the witness retries, and its frame must be read
            raise

    def checkpoints(self) -> list[str]:
        return [note.decode() for note in frames((self.dir / "checkpoints.log").read_bytes())]

    def close(self) -> None:
        for fd in [self._segment_fd, self._index_fd, self._checkpoint_fd, self._cosigned_fd, *self._levels]:
            if fd is not None:
                os.close(fd)
        self._levels, self._segment_fd, self._index_fd = [], None, None
        self._checkpoint_fd = self._cosigned_fd = None
