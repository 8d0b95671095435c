"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification. Pure functions: no I/O, no clock.

Leaves hash as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left || right). Proofs are
built from `subtree(level, index)`, a function returning the hash of the complete, aligned subtree of
2**level leaves starting at leaf index * 2**level, so that a stored tree (see `store.py`) answers them
without a rebuild. Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()
Subtree = Callable[[int, int], bytes]


class ProofError(ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


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


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raises ProofError unless `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `root`."""
    if index >= size or index < 0:
        raise ProofError(f"leaf index {index} is beyond the tree size {size}")
    _check_hash(leaf)
    _check_hash(root)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        _check_hash(p)
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Raises ProofError unless `proof` shows the tree (size1, root1) is a prefix of (size2, root2)."""
    if size2 < size1:
        raise ProofError(f"size1 {size1} is greater than size2 {size2}")
    if size1 == 0:  # every tree extends the empty one: such a proof proves nothing, so none is accepted
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("trees of equal size need an empty proof")
        if root1 != root2:
            raise ProofError("trees of equal size have different roots")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    _check_hash(root1)
    _check_hash(root2)
    for p in proof:
        _check_hash(p)
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root")


def _check_hash(value: bytes) -> None:
    if len(value) != 32:
        raise ProofError(f"a proof hash has {len(value)} bytes, not 32")


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
