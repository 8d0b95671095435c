"""The evidence log on disk: segments of records, the Merkle tree level by level, an index, checkpoints.

Layout of a log directory:
- `segment-NNNNNN.log`: a header (magic, first entry index, key epoch), then records
  `u32 leaf length | u32 sealed length | u32 CRC-32 | leaf | sealed`. New segments start as a temporary
  file that is renamed into place, with the directory fsynced.
- `tree/level-K.bin`: the hashes of every complete, aligned subtree of 2**K leaves, 32 bytes each, in
  order (level 0 holds the leaf hashes). Any inclusion or consistency proof is a few reads, no rebuild.
- `index.bin`: per entry, u32 segment number and u64 offset of its record.
- `checkpoints.log`: every signed checkpoint note, each as `u32 length | note`.

Only segments are the source of truth: on open, a torn last record is cut off and the tree and index are
brought back in line with the segments (recomputed where they lag, cut where they lead).
This module is synchronous and single-writer; `log.py` drives it from one thread.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from . import merkle

MAGIC = b"CGEVLOG1"
SEGMENT_HEADER = struct.Struct(">8sQI")  # magic, first entry index, key epoch
RECORD_HEADER = struct.Struct(">III")  # leaf length, sealed length, crc32
INDEX_ENTRY = struct.Struct(">IQ")  # segment number, offset
HASH = 32


class CorruptLog(Exception):
    """The log's files contradict each other in a way a crash cannot explain."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Segment:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.number = int(path.stem.split("-")[1])
        with open(path, "rb") as f:
            magic, self.first, self.key_epoch = SEGMENT_HEADER.unpack(f.read(SEGMENT_HEADER.size))
        if magic != MAGIC:
            raise CorruptLog(f"{path.name}: not an evidence segment")

    def records(self) -> Iterator[tuple[int, bytes, bytes, bool]]:
        """(offset, leaf, sealed, intact) for each record; the last may be torn (intact False)."""
        data = self.path.read_bytes()
        offset = SEGMENT_HEADER.size
        while offset < len(data):
            if offset + RECORD_HEADER.size > len(data):
                yield offset, b"", b"", False
                return
            leaf_len, sealed_len, crc = RECORD_HEADER.unpack_from(data, offset)
            start = offset + RECORD_HEADER.size
            end = start + leaf_len + sealed_len
            body = data[start:end]
            if end > len(data) or zlib.crc32(body) != crc:
                yield offset, b"", b"", False
                return
            yield offset, body[:leaf_len], body[leaf_len:], True
            offset = end


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

    # --- opening and recovery ---

    def open(self, key_epoch: int) -> None:
        (self.dir / "tree").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        segments = self.segments()
        records = 0
        for position, segment in enumerate(segments):
            if segment.first != records:
                raise CorruptLog(f"{segment.path.name} starts at entry {segment.first}, expected {records}")
            for offset, _, _, intact in segment.records():
                if not intact:
                    if position != len(segments) - 1:
                        raise CorruptLog(f"{segment.path.name}: damaged record at byte {offset}")
                    with open(segment.path, "r+b") as f:  # a torn write at the end: cut it off
                        f.truncate(offset)
                        os.fsync(f.fileno())
                    break
                records += 1
        self._index_fd = os.open(self.dir / "index.bin", os.O_RDWR | os.O_CREAT, 0o600)
        self._checkpoint_fd = os.open(self.dir / "checkpoints.log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._open_levels()
        self._resync(records)
        if not segments:
            self._new_segment(key_epoch)
        else:
            self._segment = segments[-1]
            self._segment_fd = os.open(self._segment.path, os.O_WRONLY | os.O_APPEND)
            self._segment_end = os.fstat(self._segment_fd).st_size
            if self._segment.key_epoch != key_epoch:
                self._new_segment(key_epoch)

    def segments(self) -> list[Segment]:
        return [Segment(p) for p in sorted(self.dir.glob("segment-*.log"))]

    def _open_levels(self) -> None:
        level = 0
        while (self.dir / "tree" / f"level-{level}.bin").exists() or level == 0:
            self._level_fd(level)
            level += 1

    def _level_fd(self, level: int) -> int:
        while len(self._levels) <= level:
            path = self.dir / "tree" / f"level-{len(self._levels)}.bin"
            self._levels.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        return self._levels[level]

    def _resync(self, records: int) -> None:
        """Make the tree and index describe exactly the first `records` entries."""
        hashed = min(os.fstat(self._levels[0]).st_size // HASH, os.fstat(self._index_fd).st_size // INDEX_ENTRY.size)
        keep = min(hashed, records)
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
        index = 0
        for segment in self.segments():
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

    def roll_if_needed(self, key_epoch: int) -> None:
        """Start a new segment when the current one is full or sealed under another key epoch.

        Called before a batch is sealed, since each segment has its own data key."""
        if self._segment.key_epoch != key_epoch or self._segment_end >= self.segment_bytes:
            self._new_segment(key_epoch)

    def append(self, records: list[tuple[bytes, bytes]], sync: bool = True) -> int:
        """Write records (leaf, sealed) to the current segment, fsync it, then extend the tree."""
        chunks, offsets, offset = [], [], self._segment_end
        for leaf, sealed in records:
            body = leaf + sealed
            chunks.append(RECORD_HEADER.pack(len(leaf), len(sealed), zlib.crc32(body)) + body)
            offsets.append(offset)
            offset += len(chunks[-1])
        os.write(self._segment_fd, b"".join(chunks))
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
        os.pwrite(self._index_fd, index_bytes, first * INDEX_ENTRY.size)
        for level, data in new_nodes.items():  # the new nodes are the last ones of their level
            first_node = (self.size >> level) - len(data) // HASH
            os.pwrite(self._level_fd(level), data, first_node * HASH)

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

    def read(self, index: int) -> tuple[bytes, bytes, int]:
        """(leaf, sealed, segment number) of entry `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"no entry {index}; the log holds {self.size}")
        number, offset = INDEX_ENTRY.unpack(os.pread(self._index_fd, INDEX_ENTRY.size, index * INDEX_ENTRY.size))
        path = self.dir / f"segment-{number:06d}.log"
        with open(path, "rb") as f:
            f.seek(offset)
            leaf_len, sealed_len, crc = RECORD_HEADER.unpack(f.read(RECORD_HEADER.size))
            body = f.read(leaf_len + sealed_len)
        if zlib.crc32(body) != crc:
            raise CorruptLog(f"entry {index} in {path.name} is damaged")
        return body[:leaf_len], body[leaf_len:], number

    def key_epoch_of(self, segment: int) -> int:
        return Segment(self.dir / f"segment-{segment:06d}.log").key_epoch

    # --- checkpoints ---

    def add_checkpoint(self, note: str) -> None:
        data = note.encode()
        os.write(self._checkpoint_fd, struct.pack(">I", len(data)) + data)
        os.fsync(self._checkpoint_fd)
        write_atomically(self.dir / "checkpoint", data)

    def checkpoints(self) -> list[str]:
        data = (self.dir / "checkpoints.log").read_bytes()
        notes, offset = [], 0
        while offset + 4 <= len(data):
            (length,) = struct.unpack_from(">I", data, offset)
            notes.append(data[offset + 4 : offset + 4 + length].decode())
            offset += 4 + length
        return notes

    def close(self) -> None:
        for fd in [self._segment_fd, self._index_fd, self._checkpoint_fd, *self._levels]:
            if fd is not None:
                os.close(fd)
        self._levels, self._segment_fd, self._index_fd, self._checkpoint_fd = [], None, None, None
