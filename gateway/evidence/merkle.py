"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification. Pure functions: no I/O, no clock.

Leaves hash as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left || right). Proofs are
built from `subtree(level, index)`, a function returning the hash of the complete, aligned subtree of
2**level leaves starting at leaf index * 2**level, so that a stored tree (see `store.py`) answers them
without a rebuild. Hashing and verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2) live in the standalone
`verifier.py`, which every evidence bundle carries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from .verifier import ProofError, leaf_hash, node_hash, verify_consistency, verify_inclusion

__all__ = [
    "CompactRange",
    "ProofError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
Subtree = Callable[[int, int], bytes]


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves (a reference implementation; stored trees use `range_hash`)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = _split(len(leaf_hashes))
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(subtree: Subtree, start: int, end: int) -> bytes:
    """MTH of leaves [start, end), where start is aligned to the range's first split (as in every proof)."""
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and start % n == 0:  # a complete aligned subtree: stored
        level = n.bit_length() - 1
        return subtree(level, start >> level)
    k = _split(n)
    return node_hash(range_hash(subtree, start, start + k), range_hash(subtree, start + k, end))


def inclusion_proof(subtree: Subtree, index: int, size: int) -> list[bytes]:
    """The audit path for leaf `index` in the tree of `size` leaves (RFC 9162 2.1.3.1), leaf to root."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    return _path(subtree, index, 0, size)


def _path(subtree: Subtree, index: int, start: int, end: int) -> list[bytes]:
    n = end - start
    if n == 1:
        return []
    k = _split(n)
    if index < start + k:
        return _path(subtree, index, start, start + k) + [range_hash(subtree, start + k, end)]
    return _path(subtree, index, start + k, end) + [range_hash(subtree, start, start + k)]


def consistency_proof(subtree: Subtree, size1: int, size2: int) -> list[bytes]:
    """The proof that the tree of size1 is a prefix of the tree of size2 (RFC 9162 2.1.4.1)."""
    if not 0 <= size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to {size2}")
    if size1 == 0 or size1 == size2:
        return []
    return _subproof(subtree, size1, 0, size2, True)


def _subproof(subtree: Subtree, m: int, start: int, end: int, complete: bool) -> list[bytes]:
    n = end - start
    if m == n:
        return [] if complete else [range_hash(subtree, start, end)]
    k = _split(n)
    if m <= k:
        return _subproof(subtree, m, start, start + k, complete) + [range_hash(subtree, start + k, end)]
    return _subproof(subtree, m - k, start + k, end, False) + [range_hash(subtree, start, start + k)]


class CompactRange:
    """The right edge of a growing tree: appends leaf hashes and gives the root at any size, in O(log n)."""

    def __init__(self) -> None:
        self.size = 0
        self._nodes: dict[int, bytes] = {}  # level -> the complete subtree still missing its right sibling

    def append(self, leaf: bytes) -> None:
        node, level = leaf, 0
        while (self.size >> level) & 1:
            node = node_hash(self._nodes.pop(level), node)
            level += 1
        self._nodes[level] = node
        self.size += 1

    def root(self) -> bytes:
        root = None
        for level in sorted(self._nodes):
            root = self._nodes[level] if root is None else node_hash(self._nodes[level], root)
        return root or EMPTY_ROOT
