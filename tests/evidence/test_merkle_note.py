"""Merkle proofs against transparency-dev's RFC 6962 vectors, and signed notes against the Go reference."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from gateway.evidence import merkle, note

VECTORS = Path(__file__).resolve().parent.parent / "data" / "rfc6962"


def _vectors(kind: str):
    files = sorted((VECTORS / kind).rglob("*.json"))
    assert len(files) > 50
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(VECTORS))) for f in files]


def _b64(values):
    return [base64.b64decode(v) for v in values or []]


def _b(value):
    return base64.b64decode(value) if value else b""


@pytest.mark.parametrize("v", _vectors("inclusion"))
def test_inclusion_vectors(v):
    args = (v["leafIdx"], v["treeSize"], _b(v["leafHash"]), _b64(v["proof"]), _b(v["root"]))
    if v["wantErr"]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("v", _vectors("consistency"))
def test_consistency_vectors(v):
    args = (v["size1"], v["size2"], _b(v["root1"]), _b(v["root2"]), _b64(v["proof"]))
    if v["wantErr"]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def _tree(n: int):
    leaves = [merkle.leaf_hash(f"entry {i}".encode()) for i in range(n)]

    def subtree(level: int, index: int) -> bytes:
        return merkle.root_of(leaves[index << level : (index + 1) << level])

    return leaves, subtree


@given(st.integers(min_value=1, max_value=70), st.data())
def test_generated_proofs_verify_and_mutations_do_not(size, data):
    leaves, subtree = _tree(size)
    root = merkle.root_of(leaves)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = merkle.inclusion_proof(subtree, index, size)
    merkle.verify_inclusion(index, size, leaves[index], proof, root)
    if proof:
        bad = list(proof)
        bad[0] = bytes([bad[0][0] ^ 1]) + bad[0][1:]
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(index, size, leaves[index], bad, root)
    size1 = data.draw(st.integers(min_value=1, max_value=size))
    root1 = merkle.root_of(leaves[:size1])
    consistency = merkle.consistency_proof(subtree, size1, size)
    merkle.verify_consistency(size1, size, root1, root, consistency)
    if size1 < size:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(size1, size, merkle.leaf_hash(b"forged"), root, consistency)


# The example from golang.org/x/mod/sumdb/note's documentation (public reference data).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_go_sumdb_note_example_is_reproduced_byte_for_byte():
    signer = note.Signer.parse(GO_SKEY)
    assert signer.skey() == GO_SKEY
    assert signer.verifier.vkey() == GO_VKEY
    assert note.sign_note(GO_TEXT, signer) == GO_NOTE
    assert note.open_note(GO_NOTE, note.NoteKey.parse(GO_VKEY)) == GO_TEXT


def independent_verify(note_text: str, vkey: str) -> tuple[str, int, bytes]:
    """A verifier written from the C2SP specs alone, on `cryptography`: returns (origin, size, root)."""
    import hashlib

    name, key_hex, key_b64 = vkey.split("+", 2)
    public = base64.b64decode(key_b64)[1:]
    assert hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4].hex() == key_hex
    body, signatures = note_text.split("\n\n", 1)
    for line in signatures.splitlines():
        dash, signer_name, blob = line.split(" ")
        raw = base64.b64decode(blob)
        if dash == "\u2014" and signer_name == name and raw[:4].hex() == key_hex:
            Ed25519PublicKey.from_public_bytes(public).verify(raw[4:], (body + "\n").encode())
            origin, size, root = body.split("\n")
            return origin, int(size), base64.b64decode(root)
    raise AssertionError("no signature by the key")


def test_checkpoints_verify_independently_and_reject_tampering():
    signer = note.Signer("canarygate.test/log", bytes(range(32)))
    checkpoint = note.Checkpoint("canarygate.test/log", 42, bytes(32))
    signed = note.sign_checkpoint(checkpoint, signer)
    assert independent_verify(signed, signer.verifier.vkey()) == ("canarygate.test/log", 42, bytes(32))
    assert note.open_checkpoint(signed, [signer.verifier]) == checkpoint
    with pytest.raises(note.NoteError):
        note.open_checkpoint(signed.replace("\n42\n", "\n43\n"), [signer.verifier])
    other = note.Signer("canarygate.test/log", bytes(32))
    with pytest.raises(note.NoteError):
        note.open_checkpoint(signed, [other.verifier])
