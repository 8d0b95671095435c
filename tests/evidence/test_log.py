"""The evidence log end to end on disk: appends, proofs a third party checks, openings, recovery, tampering."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest

from gateway.evidence import entry, keys, merkle
from gateway.evidence.log import EvidenceLog
from gateway.evidence.reader import LogReader, VerifyError, verify_proof
from gateway.evidence.store import INDEX_ENTRY, RECORD_HEADER, SEGMENT_HEADER, CorruptLog, record_crc

ORIGIN = "canarygate.test/log"


def write_entries(directory: Path, keydir: Path, count: int, start: int = 0, **options) -> EvidenceLog:
    keys.init_keys(keydir, ORIGIN)
    evidence = EvidenceLog(directory, keys.Keys.load(keydir), ORIGIN, **options)

    async def run():
        await evidence.start()
        indexes = []
        for batch in range(start, start + count, 50):  # several batches, so several checkpoints
            futures = []
            for i in range(batch, min(batch + 50, start + count)):
                commitments, openings = entry.commit({"prompt": f"prompt {i}".encode(), "client": b"192.0.2.1"})
                public = {"v": 1, "kind": "begin", "id": f"req_{i}", "identity": f"user{i % 3}", "commit": commitments}
                futures.append(evidence.append(entry.canonical(public), openings, f"user{i % 3}"))
            indexes += await asyncio.gather(*futures)
        assert indexes == list(range(start, start + count))
        await evidence.close()

    asyncio.run(run())
    return evidence


@pytest.fixture
def written(tmp_path):
    evidence = write_entries(tmp_path / "log", tmp_path / "keys", 300, checkpoint_every=64, segment_bytes=16 * 1024)
    return tmp_path / "log", keys.Keys.load(tmp_path / "keys"), evidence.verifier.vkey()


def test_written_log_verifies_proves_and_opens(written):
    directory, loaded, vkey = written
    reader = LogReader(directory, loaded)
    report = reader.verify()
    assert (report.entries, report.covered, report.opened) == (300, 300, 300)
    assert report.checkpoints >= 3 and len(list(directory.glob("segment-*.log"))) > 2
    for index in (0, 1, 63, 64, 150, 299):
        verify_proof(reader.prove(index), vkey)  # the public key alone
    opened = reader.open_field(150, "prompt")
    assert opened["value"] == "prompt 150"
    leaf = json.loads(base64.b64decode(reader.prove(150)["leaf"]))
    assert leaf["commit"]["prompt"] == opened["commitment"]
    assert "prompt 150" not in (directory / "segment-000000.log").read_text("latin-1")  # content is sealed
    forged = reader.prove(150)
    forged["leaf_index"] = 151
    with pytest.raises((merkle.ProofError, ValueError)):
        verify_proof(forged, vkey)


def test_key_files_are_private(written, tmp_path):
    for path in (tmp_path / "keys").glob("*.key"):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    assert oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"


def test_reopen_recovers_a_torn_tail_and_continues(written, tmp_path):
    directory, loaded, _ = written
    last = sorted(directory.glob("segment-*.log"))[-1]
    with open(last, "ab") as f:
        f.write(struct.pack(">III", 200, 10, 0) + b"half a record")  # the crash came mid-write
    os.truncate(directory / "tree" / "level-0.bin", 290 * 32)  # and the tree lags behind
    with pytest.raises(VerifyError, match="torn last record"):
        LogReader(directory, loaded).verify()
    write_entries(directory, tmp_path / "keys", 20, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    report = LogReader(directory, loaded).verify()
    assert (report.entries, report.covered) == (320, 320)


def test_reopen_after_a_power_loss_that_left_zeros(written, tmp_path):
    directory, loaded, _ = written
    with open(sorted(directory.glob("segment-*.log"))[-1], "ab") as f:
        f.write(bytes(120))  # the file grew but its data never reached the disk
    for name in ("checkpoints.log", "cosignatures.log"):  # and so did these
        with open(directory / name, "ab") as f:
            f.write(bytes(4096))
    write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    report = LogReader(directory, loaded).verify()
    assert (report.entries, report.covered) == (305, 305)


def test_a_damaged_record_under_a_checkpoint_stops_the_log_and_cuts_nothing(written, tmp_path):
    """Damage a crash cannot explain (entries the latest checkpoint covers): restarting once cut the segment
    there, losing every later entry, and went on writing new entries at the lost indexes."""
    directory, loaded, _ = written
    last = sorted(directory.glob("segment-*.log"))[-1]
    offset, length = _records(last)[2]
    _flip(last, offset + length // 2)
    before = last.read_bytes()
    with pytest.raises(CorruptLog, match="covered by the latest checkpoint"):
        write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    assert last.read_bytes() == before


def test_a_damaged_record_that_intact_ones_follow_is_no_torn_end_and_nothing_is_cut(written, tmp_path, caplog):
    """Past the latest checkpoint, but before records written (and acknowledged) after it: a restart cut the
    segment at the damage, dropping every later record without a word. A crash tears only the end."""
    directory, loaded, _ = written
    last = sorted(directory.glob("segment-*.log"))[-1]
    offset = _records(last)[-3][0]
    end = last.stat().st_size
    with open(last, "ab") as f:  # three more intact records, past what the checkpoint covers
        f.write(last.read_bytes()[offset:])
    _flip(last, end + 20)  # the first of them damaged
    before = last.read_bytes()
    with pytest.raises(CorruptLog, match="2 intact entries follow it"):
        write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    assert last.read_bytes() == before
    for length_byte in (end, end + 4):  # the damage in a length instead, which then leads past the end
        damaged = bytearray(before)
        damaged[end + 20] ^= 0x01
        damaged[length_byte] ^= 0x80
        last.write_bytes(bytes(damaged))
        with pytest.raises(CorruptLog, match="2 intact entries follow it"):
            write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
        assert last.read_bytes() == bytes(damaged)
    with open(last, "r+b") as f:  # the last of them torn, as a crash leaves it: cut, and said
        f.truncate(end)
        f.seek(end)
        f.write(before[end : end + 30])
    with caplog.at_level("WARNING", logger="canarygate.evidence"):
        write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    assert "cut a torn record at byte" in caplog.text
    assert LogReader(directory, loaded).verify().entries == 305


@pytest.mark.parametrize("leaf", [b"[]", b"not json"])
def test_a_leaf_that_is_no_json_object_is_named_not_a_traceback(written, leaf):
    directory, loaded, _ = written
    last = sorted(directory.glob("segment-*.log"))[-1]
    offset, length = _records(last)[-1]
    data = last.read_bytes()
    sealed = data[offset + RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, offset)[0] : offset + length]
    body = leaf + sealed  # its CRC made to match: forged, or written so
    record = RECORD_HEADER.pack(len(leaf), len(sealed), record_crc(len(leaf), len(sealed), body)) + body
    last.write_bytes(data[:offset] + record)
    with pytest.raises(VerifyError, match="its leaf is not a JSON object"):
        LogReader(directory, loaded).verify()


def test_a_copy_of_a_segment_beside_the_log_is_not_read_as_one(written):
    directory, loaded, _ = written
    first = sorted(directory.glob("segment-*.log"))[0]
    shutil.copyfile(first, directory / "segment-000000.bak.log")  # an operator's copy
    assert LogReader(directory, loaded).verify().entries == 300


def test_a_missing_stored_tree_is_named_and_rebuilt_when_the_log_opens(written, tmp_path):
    directory, loaded, vkey = written
    shutil.rmtree(directory / "tree")
    with pytest.raises(VerifyError, match="stored tree level 0 is missing"):
        LogReader(directory, loaded).prove(5)
    write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    verify_proof(LogReader(directory, loaded).prove(5), vkey)


def test_a_short_write_to_the_tree_leaves_no_hole(tmp_path, monkeypatch):
    """A filling disk may write fewer bytes than asked without an error: the next batch wrote past the hole,
    and the stored tree, which proofs are served from, stayed wrong for good."""
    real, short = os.pwrite, []

    def pwrite(fd, data, offset):
        if not short and len(data) > 32 and os.readlink(f"/proc/self/fd/{fd}").endswith("level-0.bin"):
            short.append(offset)
            return real(fd, bytes(data[: len(data) // 2]), offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    written = write_entries(tmp_path / "log", tmp_path / "keys", 120, checkpoint_every=64)
    loaded = keys.Keys.load(tmp_path / "keys")
    reader = LogReader(tmp_path / "log", loaded)
    assert short and reader.verify().entries == 120
    for index in (0, 60, 119):
        verify_proof(reader.prove(index), written.verifier.vkey())


@pytest.mark.parametrize("name", ["checkpoints.log", "cosignatures.log"])
def test_a_note_whose_length_reached_the_disk_but_not_all_its_text_is_cut(written, tmp_path, name):
    """A power loss mid-append can leave a frame's length and part of its text, the rest zeros: the gateway
    refused to start ('the latest checkpoint is signed by none of the log's keys')."""
    directory, loaded, _ = written
    last = LogReader(directory, loaded).checkpoints()[-1].encode()
    with open(directory / name, "ab") as f:
        f.write(struct.pack(">I", len(last)) + last[:30] + bytes(len(last) - 30))
    write_entries(directory, tmp_path / "keys", 5, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    report = LogReader(directory, loaded).verify()
    assert (report.entries, report.covered) == (305, 305)


def test_a_log_rolled_back_to_an_earlier_checkpoint_fails_while_the_folder_holds_a_later_one(written):
    """Segments and checkpoints.log cut back to the first checkpoint verified: the `checkpoint` file (the latest,
    as served) still held the log's signature on all 300 entries."""
    directory, loaded, _ = written
    first = LogReader(directory, loaded).checkpoints()[0].encode()
    size = int(first.split(b"\n")[1])
    (directory / "checkpoints.log").write_bytes(struct.pack(">I", len(first)) + first)
    for segment in sorted(directory.glob("segment-*.log")):
        start = SEGMENT_HEADER.unpack_from(segment.read_bytes())[1]
        if start >= size:
            segment.unlink()
        elif start + len(_records(segment)) > size:
            os.truncate(segment, _records(segment)[size - start][0])
    for stored in [directory / "index.bin", *(directory / "tree").glob("*.bin")]:
        stored.unlink()
    with pytest.raises(VerifyError, match="checkpoint: the log signed a checkpoint of 300 entries"):
        LogReader(directory, loaded).verify()


def _remove_checkpoints(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).unlink()
    for stored in [directory / "index.bin", *(directory / "tree").glob("*.bin")]:  # derived: rebuilt on open
        stored.unlink()


def test_a_log_stripped_of_every_checkpoint_fails_verify_and_warns_when_reopened(written, tmp_path, caplog):
    """With every checkpoint removed, the entries could have been rewritten with no key: verify said OK (with a
    note), and the gateway signed them at its next start without a word."""
    directory, loaded, _ = written
    _remove_checkpoints(directory, "checkpoints.log", "checkpoint", "cosignatures.log")
    with pytest.raises(VerifyError, match="no signed checkpoint: nothing vouches for entries 0-299"):
        LogReader(directory, loaded).verify()
    write_entries(directory, tmp_path / "keys", 1, start=300)
    assert "entries 0-299 are under no checkpoint" in caplog.text


def test_a_gateway_refuses_a_log_whose_checkpoints_log_was_removed(written, tmp_path):
    directory, _, _ = written
    _remove_checkpoints(directory, "checkpoints.log")
    with pytest.raises(RuntimeError, match="signed a checkpoint of 300 entries .* checkpoints.log ends at 0"):
        write_entries(directory, tmp_path / "keys", 1, start=300)


def test_rotation_keeps_old_entries_verifiable_and_readable(written, tmp_path):
    directory, _, _ = written
    keys.rotate(tmp_path / "keys")
    write_entries(directory, tmp_path / "keys", 10, start=300, checkpoint_every=64, segment_bytes=16 * 1024)
    reader = LogReader(directory, keys.Keys.load(tmp_path / "keys"))
    assert reader.verify().opened == 310
    assert reader.open_field(5, "prompt")["value"] == "prompt 5"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _records(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each record in a segment."""
    data, out, offset = path.read_bytes(), [], SEGMENT_HEADER.size
    while offset < len(data):
        a, b, _ = struct.unpack_from(">III", data, offset)
        out.append((offset, 12 + a + b))
        offset += 12 + a + b
    return out


def _swap_records(path: Path, i: int, j: int) -> None:
    data = path.read_bytes()
    records = _records(path)
    pieces = [data[o : o + n] for o, n in records]
    pieces[i], pieces[j] = pieces[j], pieces[i]
    path.write_bytes(data[: SEGMENT_HEADER.size] + b"".join(pieces))


def _drop_record(path: Path, i: int, duplicate: bool = False) -> None:
    data = path.read_bytes()
    pieces = [data[o : o + n] for o, n in _records(path)]
    if duplicate:
        pieces.insert(i, pieces[i])
        pieces.pop()
    else:
        pieces.pop(i)
    path.write_bytes(data[: SEGMENT_HEADER.size] + b"".join(pieces))


TAMPERING = {
    "flip a byte in a segment's header": lambda d: _flip(d / "segment-000001.log", 10),
    "flip a byte in an entry": lambda d: _flip(d / "segment-000001.log", 200),
    "flip a byte in a sealed value": lambda d: _flip(d / "segment-000000.log", -5),
    "flip a byte in the stored tree": lambda d: _flip(d / "tree" / "level-0.bin", 40),
    "flip a byte in a higher tree level": lambda d: _flip(d / "tree" / "level-3.bin", 3),
    "flip a byte in the checkpoints": lambda d: _flip(d / "checkpoints.log", 60),
    "delete an entry": lambda d: _drop_record(d / "segment-000001.log", 3),
    "duplicate an entry": lambda d: _drop_record(d / "segment-000001.log", 3, duplicate=True),
    "reorder two entries": lambda d: _swap_records(d / "segment-000001.log", 2, 5),
    "truncate the log": lambda d: [os.remove(p) for p in sorted(d.glob("segment-*.log"))[-1:]],
    "cut the last segment short": lambda d: os.truncate(sorted(d.glob("segment-*.log"))[-1], 500),
    "replace a checkpoint": lambda d: _replace_checkpoint(d),
    "point the index at another record": lambda d: _point_index(d, 2, 3),
}


def _point_index(directory: Path, index: int, other: int) -> None:
    """Make the index send entry `index` to the record of entry `other` (proofs would then fail)."""
    data = bytearray((directory / "index.bin").read_bytes())
    size = INDEX_ENTRY.size
    data[index * size : (index + 1) * size] = data[other * size : (other + 1) * size]
    (directory / "index.bin").write_bytes(bytes(data))


def _replace_checkpoint(directory: Path) -> None:
    """Swap the latest checkpoint for one signed by another key over a different tree."""
    from gateway.evidence import note

    data = (directory / "checkpoints.log").read_bytes()
    notes = LogReader(directory).checkpoints()
    fake = note.sign_checkpoint(note.Checkpoint(ORIGIN, 300, bytes(32)), note.Signer(ORIGIN, bytes(32))).encode()
    last = notes[-1].encode()
    (directory / "checkpoints.log").write_bytes(data[: len(data) - len(last) - 4] + struct.pack(">I", len(fake)) + fake)


@pytest.mark.parametrize("tamper", sorted(TAMPERING))
def test_tampering_is_detected(written, tamper):
    directory, loaded, vkey = written
    TAMPERING[tamper](directory)
    with pytest.raises(VerifyError):
        LogReader(directory, loaded).verify()


@pytest.mark.parametrize("tamper", ["reorder two entries", "delete an entry", "replace a checkpoint"])
def test_tampering_is_detected_with_the_public_key_alone(written, tamper):
    directory, _, vkey = written
    TAMPERING[tamper](directory)
    with pytest.raises(VerifyError):
        LogReader(directory).verify([vkey])


def test_verify_names_the_first_bad_entry(written):
    directory, loaded, _ = written
    _swap_records(directory / "segment-000001.log", 2, 5)
    with pytest.raises(VerifyError, match=r"entry \d+"):
        LogReader(directory, loaded).verify()


def test_copy_of_a_log_verifies_elsewhere(written, tmp_path):
    directory, _, vkey = written
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    assert LogReader(copy).verify([vkey]).entries == 300


def test_after_a_failed_write_every_entry_waiting_for_the_disk_is_told(tmp_path):
    """Fail-stop: the entry whose write failed gets the error, and one queued while it was being written gets
    an error too, instead of waiting for ever."""
    keys.init_keys(tmp_path / "keys", ORIGIN)
    evidence = EvidenceLog(tmp_path / "log", keys.Keys.load(tmp_path / "keys"), ORIGIN)
    writing, queued = threading.Event(), threading.Event()

    def failing_sync() -> None:
        writing.set()
        queued.wait(5)
        raise OSError("the disk is gone")

    def an_entry(i: int) -> tuple[bytes, bytes]:
        commitments, openings = entry.commit({"prompt": f"prompt {i}".encode()})
        return entry.canonical({"v": 1, "kind": "begin", "id": f"req_{i}", "commit": commitments}), openings

    async def run() -> list:
        await evidence.start()
        evidence.store.sync = failing_sync
        first = evidence.append(*an_entry(0), "user")
        await asyncio.to_thread(writing.wait, 5)  # the writer is waiting for the disk with the first entry
        second = evidence.append(*an_entry(1), "user")
        queued.set()
        outcomes = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
        await evidence.close()
        return outcomes

    first, second = asyncio.run(run())
    assert isinstance(first, OSError) and isinstance(second, RuntimeError) and "failed" in str(second)
    assert evidence.failure == "evidence log write failed: OSError"


def test_a_rotation_waits_for_the_key_folder_lock(tmp_path):
    """A worker starting (init_keys, under the folder's lock) never sees the moment a rotation is between
    signing keys: the rotation takes the same lock."""
    import fcntl

    keydir = tmp_path / "keys"
    keys.init_keys(keydir, ORIGIN)
    before = keys.Keys.load(keydir).signer
    with open(keydir / ".lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rotation = threading.Thread(target=keys.rotate, args=(keydir,))
        rotation.start()
        rotation.join(0.3)
        assert rotation.is_alive() and keys.Keys.load(keydir).signer == before
    rotation.join(5)
    assert keys.Keys.load(keydir).retired_signers == (before,)


def test_key_files_outside_the_naming_scheme_are_left_alone_and_bad_ones_are_named(tmp_path):
    keydir = tmp_path / "keys"
    keys.init_keys(keydir, ORIGIN)
    shutil.copy(keydir / "master-0.key", keydir / "master-backup.key")
    assert sorted(keys.Keys.load(keydir).masters) == [0]
    (keydir / "log-signing.key").write_text("PRIVATE+KEY+not+a+key\n")
    with pytest.raises(keys.KeysError, match="log-signing.key"):
        keys.Keys.load(keydir)


def test_a_wrong_key_or_a_damaged_index_is_a_clear_error_not_a_traceback(written, tmp_path):
    directory, _, _ = written
    keydir = tmp_path / "keys"
    (keydir / "master-0.key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")  # a key, not the one
    with pytest.raises(VerifyError, match="entry 7: its sealed part does not open"):
        LogReader(directory, keys.Keys.load(keydir)).open_field(7, "prompt")
    data = bytearray((directory / "index.bin").read_bytes())
    data[5 * INDEX_ENTRY.size : 6 * INDEX_ENTRY.size] = INDEX_ENTRY.pack(0, 10**9)  # past the segment's end
    (directory / "index.bin").write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="entry 5: the index or its segment is damaged"):
        LogReader(directory).get(5)
