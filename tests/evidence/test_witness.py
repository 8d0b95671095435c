"""The C2SP witness protocol on both sides: real witness processes, real logs, a fork, a restart."""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.evidence import keys, merkle, note
from gateway.evidence.reader import LogReader, VerifyError
from gateway.evidence.verifier import cosigners, forks, split_note
from gateway.evidence.witnessing import Witness, add_checkpoint_body
from gateway.witness import init_witness, witness_app
from tests.evidence.test_log import ORIGIN, write_entries
from tests.test_cli import CANARYGATE, Running, cli


@pytest.fixture
def log_key(tmp_path):
    keys.init_keys(tmp_path / "keys", ORIGIN)
    return keys.Keys.load(tmp_path / "keys").verifiers(ORIGIN)[0]


def _witness(tmp_path, name: str, log_key):
    vkey = init_witness(tmp_path / name, f"witness.test/{name}").verifier
    return vkey, Running(tmp_path, "witness", "serve", "--dir", str(tmp_path / name), "--log", log_key.vkey())


def _write(tmp_path, folder: str, count: int, start: int = 0, witnesses=()):
    return write_entries(
        tmp_path / folder, tmp_path / "keys", count, start, checkpoint_every=40, witnesses=tuple(witnesses)
    )


def test_a_log_gets_every_checkpoint_cosigned_by_each_witness(tmp_path, log_key):
    k1, w1 = _witness(tmp_path, "w1", log_key)
    k2, w2 = _witness(tmp_path, "w2", log_key)
    with w1, w2:
        written = _write(tmp_path, "log", 100, witnesses=[Witness(w1.url, k1), Witness(w2.url, k2)])
        assert written.witnesses.cosigned == {"witness.test/w1": 100, "witness.test/w2": 100}
        latest = httpx.get(w1.url + "/checkpoint", params={"origin": ORIGIN}).text
    assert note.open_checkpoint(latest, [log_key]).size == 100 and set(cosigners(latest, [k1])) == {k1.name}
    cosigned = LogReader(tmp_path / "log").cosigned()
    last = [n for n in cosigned if split_note(n)[0].split("\n")[1] == "100"]
    assert {name for n in last for name in cosigners(n, [k1, k2])} == {k1.name, k2.name}


def test_a_forked_log_is_caught(tmp_path, log_key):
    """Two trees of one size, each shown to one witness: both cosign (neither saw the other), `witness
    check` proves the fork from the log's own signatures, and the honest log's next checkpoint is refused."""
    k1, w1 = _witness(tmp_path, "w1", log_key)
    k2, w2 = _witness(tmp_path, "w2", log_key)
    with w1, w2:
        honest = _write(tmp_path, "honest", 100, witnesses=[Witness(w1.url, k1)])
        forked = _write(tmp_path, "forked", 100, witnesses=[Witness(w2.url, k2)])  # same key, other entries
        assert honest.witnesses.cosigned[k1.name] == forked.witnesses.cosigned[k2.name] == 100
        check = subprocess.run(
            [CANARYGATE, "witness", "check", "--log", log_key.vkey(), w1.url, w2.url], capture_output=True, text=True
        )
        assert check.returncode == 1 and "FORK" in check.stdout, check.stdout + check.stderr
        assert forks([httpx.get(w.url + "/checkpoint", params={"origin": ORIGIN}).text for w in (w1, w2)], [log_key])

        grown = _write(tmp_path, "honest", 20, start=100, witnesses=[Witness(w1.url, k1), Witness(w2.url, k2)])
        assert grown.witnesses.cosigned == {k1.name: 120, k2.name: 0}
        # on reopening, the last checkpoint (size 100, other root): 409; then the next one's proof: 422
        assert ["does not extend" in c for c in grown.witnesses.conflicts] == [True, False]
        assert "saw another tree" in grown.witnesses.conflicts[1]
    assert list((tmp_path / "w2" / "conflicts").iterdir())  # the witness kept the log's signed contradiction


def test_a_fork_shown_at_two_sizes_is_no_all_clear_and_the_log_proves_it(tmp_path, log_key):
    """Each branch of a split view grows: the witnesses hold different sizes, which `witness check` cannot
    compare alone (exit 2, not 0); the honest log, given the other witness's checkpoint, shows the fork."""
    k1, w1 = _witness(tmp_path, "w1", log_key)
    k2, w2 = _witness(tmp_path, "w2", log_key)
    with w1, w2:
        _write(tmp_path, "honest", 100, witnesses=[Witness(w1.url, k1)])
        _write(tmp_path, "forked", 120, witnesses=[Witness(w2.url, k2)])  # same key, other entries
        check = subprocess.run(
            [CANARYGATE, "witness", "check", "--log", log_key.vkey(), "--save", str(tmp_path / "seen"), w1.url, w2.url],
            capture_output=True,
            text=True,
        )
    assert check.returncode == 2 and "not compared" in check.stdout and "FORK" not in check.stdout, check.stdout
    seen = sorted((tmp_path / "seen").iterdir())
    honest = LogReader(tmp_path / "honest", keys.Keys.load(tmp_path / "keys"))
    assert honest.verify(gossip=[(str(seen[0]), seen[0].read_text())]).entries == 100  # its own witness's
    with pytest.raises(VerifyError, match="a fork"):
        honest.verify(gossip=[(str(seen[1]), seen[1].read_text())])
    stranger = note.sign_checkpoint(note.Checkpoint(ORIGIN, 1, bytes(32)), note.Signer(ORIGIN, bytes(32)))
    with pytest.raises(VerifyError, match="not a checkpoint of this log"):
        honest.verify(gossip=[("stranger", stranger)])


def test_a_restarted_witness_keeps_its_state(tmp_path, log_key):
    k1, w1 = _witness(tmp_path, "w1", log_key)
    w1.__enter__()
    try:
        _write(tmp_path, "log", 100, witnesses=[Witness(w1.url, k1)])
    finally:
        w1.proc.send_signal(signal.SIGKILL)  # no chance to save anything more
        w1.proc.wait()
    _, again = _witness(tmp_path, "w1", log_key)
    with again:
        latest = LogReader(tmp_path / "log").checkpoints()[-1]
        stale = httpx.post(again.url + "/add-checkpoint", content=add_checkpoint_body(0, [], latest))
        assert (stale.status_code, stale.text, stale.headers["content-type"]) == (409, "100\n", "text/x.tlog.size")
        grown = _write(tmp_path, "log", 30, start=100, witnesses=[Witness(again.url, k1)])
        assert grown.witnesses.cosigned[k1.name] == 130 and not grown.witnesses.conflicts


def test_protocol_refusals(tmp_path, log_key):
    _write(tmp_path, "log", 100)
    reader = LogReader(tmp_path / "log")
    notes = reader.checkpoints()
    last = note.Checkpoint.parse(split_note(notes[-1])[0])
    first = note.Checkpoint.parse(split_note(notes[0])[0])
    init_witness(tmp_path / "w", "witness.test/w")
    stranger = note.Signer("other.test/log", bytes(32))
    forged = note.sign_checkpoint(last, note.Signer(ORIGIN, bytes(32)))
    with TestClient(witness_app(tmp_path / "w", [log_key])) as client:

        def post(old, proof, text):
            return client.post("/add-checkpoint", content=add_checkpoint_body(old, proof, text))

        assert (
            post(0, [], note.sign_checkpoint(note.Checkpoint("other.test/log", 1, bytes(32)), stranger)).status_code
            == 404
        )
        assert post(0, [], forged).status_code == 403
        assert post(last.size + 1, [], notes[-1]).status_code == 400
        assert post(0, [bytes(32)], notes[0]).status_code == 400
        assert client.post("/add-checkpoint", content=b"old 01\n\n" + notes[0].encode()).status_code == 400
        assert post(1, [bytes(32)] * 64, notes[-1]).status_code == 400
        assert post(0, [], notes[0]).status_code == 200  # first sight: accepted as it is
        assert post(0, [], notes[-1]).text == f"{first.size}\n"  # 409: the witness holds another size
        wrong = [bytes(32)] * 3
        assert post(first.size, wrong, notes[-1]).status_code == 422
        subtree = reader.stored_subtree
        proof = merkle.consistency_proof(subtree, first.size, last.size)
        answer = post(first.size, proof, notes[-1])
        assert answer.status_code == 200 and answer.text.startswith("\u2014 witness.test/w ")
        assert post(first.size, proof, notes[-1]).status_code == 409  # replaying an old step rolls nothing back
        assert post(last.size, [bytes(32)], notes[-1]).status_code == 400  # equal sizes take no proof
        assert not list((tmp_path / "w" / "conflicts").iterdir())  # bad proofs prove nothing: none kept
        assert note.open_checkpoint(client.get("/checkpoint", params={"origin": ORIGIN}).text, [log_key]) == last


def test_a_second_witness_process_cannot_share_a_state_folder(tmp_path, log_key):
    init_witness(tmp_path / "w", "witness.test/w")
    first, second = (TestClient(witness_app(tmp_path / "w", [log_key])) for _ in range(2))
    with first, pytest.raises(RuntimeError, match="another witness"), second:
        pass


def test_cosignatures_follow_the_c2sp_format(tmp_path):
    """The signed message and key id of tlog-cosignature v1, checked against the spec's own construction."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signer = note.Signer("witness.test/w", bytes(range(32)), note.ALG_COSIGNATURE_V1)
    checkpoint = note.sign_checkpoint(note.Checkpoint(ORIGIN, 7, bytes(32)), note.Signer(ORIGIN, bytes(32)))
    line = note.cosign(checkpoint, signer, 1679315147)
    name, blob = line.removeprefix("\u2014 ").split()
    raw = base64.b64decode(blob)
    public = signer.verifier.public
    assert raw[:4] == hashlib.sha256(b"witness.test/w\n\x04" + public).digest()[:4]
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + split_note(checkpoint)[0].encode()
    Ed25519PublicKey.from_public_bytes(public).verify(raw[12:], message)
    assert cosigners(checkpoint + line, [signer.verifier]) == {"witness.test/w": 1679315147}
    tampered = checkpoint.replace("\n7\n", "\n8\n") + line
    with pytest.raises(note.NoteError):
        cosigners(tampered, [signer.verifier])


def test_witness_client_runs_in_the_background(tmp_path, log_key):
    """A witness that is down delays nothing: the log writes and checkpoints, and says what failed."""
    down = Witness("http://127.0.0.1:9", note.Signer("witness.test/down", bytes(32), note.ALG_COSIGNATURE_V1).verifier)
    written = _write(tmp_path, "log", 60, witnesses=[down])
    assert written.witnesses.cosigned == {"witness.test/down": 0}
    assert LogReader(tmp_path / "log", keys.Keys.load(tmp_path / "keys")).verify().covered == 60


def test_a_witness_that_saw_an_empty_tree_accepts_its_growth(tmp_path):
    signer = note.Signer("empty.test/log", bytes(range(32)))
    empty = note.sign_checkpoint(note.Checkpoint("empty.test/log", 0, hashlib.sha256(b"").digest()), signer)
    grown = note.sign_checkpoint(note.Checkpoint("empty.test/log", 5, bytes(32)), signer)
    init_witness(tmp_path / "w", "witness.test/w")
    with TestClient(witness_app(tmp_path / "w", [signer.verifier])) as client:
        assert client.post("/add-checkpoint", content=add_checkpoint_body(0, [], empty)).status_code == 200
        assert client.post("/add-checkpoint", content=add_checkpoint_body(0, [], grown)).status_code == 200


def test_a_witness_answer_cannot_plant_lines_that_break_other_cosignatures(tmp_path):
    """The log keeps only the witness's own verified line, whatever else the answer holds."""
    import asyncio

    from gateway.evidence.witnessing import Witnesses

    log_signer = note.Signer(ORIGIN, bytes(32))
    checkpoint = note.Checkpoint(ORIGIN, 3, bytes(32))
    signed = note.sign_checkpoint(checkpoint, log_signer)
    mine = note.Signer("witness.test/mine", bytes(range(32)), note.ALG_COSIGNATURE_V1)
    other = note.Signer("witness.test/other", bytes(range(1, 33)), note.ALG_COSIGNATURE_V1)
    line = note.cosign(signed, other, 5)
    forged = line[:-14] + "A" * 12 + "=\n"  # the other witness's name and key id, a signature that fails
    kept = []

    async def run():
        async def keep(text):
            kept.append(text)

        witnesses = Witnesses([Witness("http://127.0.0.1:9", mine.verifier)], lambda a, b: [], keep)
        await witnesses._accept(witnesses._witnesses[0], signed, checkpoint, forged + note.cosign(signed, mine, 7))
        await witnesses.close(0)

    asyncio.run(run())
    assert cosigners(kept[0], [mine.verifier, other.verifier]) == {"witness.test/mine": 7}


def test_a_submitter_cannot_plant_lines_in_what_the_witness_serves(tmp_path):
    """The witness keeps the log's valid signature and its own cosignature, nothing else a submitter sent; the
    checkpoint it holds, sent again, gets the cosignature it holds (no new write)."""
    log_signer = note.Signer(ORIGIN, bytes(32))
    signed = note.sign_checkpoint(note.Checkpoint(ORIGIN, 5, bytes(32)), log_signer)
    me = init_witness(tmp_path / "w", "witness.test/w").verifier
    planted = "\u2014 witness.test/w " + base64.b64encode(me.key_id + bytes(72)).decode() + "\n"
    junk = "\u2014 junk " + base64.b64encode(bytes(40)).decode() + "\n"
    with TestClient(witness_app(tmp_path / "w", [log_signer.verifier])) as client:

        def served():
            return client.get("/checkpoint", params={"origin": ORIGIN}).text

        first = client.post("/add-checkpoint", content=add_checkpoint_body(0, [], signed + junk + planted))
        assert first.status_code == 200
        assert served() == signed + first.text and set(cosigners(served(), [me])) == {me.name}
        held = (tmp_path / "w" / "logs").iterdir().__next__()
        written = held.stat().st_mtime_ns
        again = client.post("/add-checkpoint", content=add_checkpoint_body(5, [], signed + planted))
        assert (again.status_code, again.text) == (200, first.text)
        assert served() == signed + first.text and held.stat().st_mtime_ns == written
        # the same tree with an extension line (C2SP allows them) is another text: cosigned afresh, over it
        extended = note.sign_note(note.Checkpoint(ORIGIN, 5, bytes(32)).text() + "extension\n", log_signer)
        third = client.post("/add-checkpoint", content=add_checkpoint_body(5, [], extended))
        assert third.status_code == 200 and set(cosigners(extended + third.text, [me])) == {me.name}


def test_an_old_size_of_many_digits_is_a_bad_request(tmp_path, log_key):
    init_witness(tmp_path / "w", "witness.test/w")
    with TestClient(witness_app(tmp_path / "w", [log_key]), raise_server_exceptions=False) as client:
        answer = client.post("/add-checkpoint", content=b"old " + b"9" * 5000 + b"\n\nx\n\n")
    assert answer.status_code == 400 and "decimal" in answer.text


def test_witness_check_reports_an_unreachable_witness_and_checks_the_others(tmp_path, log_key):
    k1, w1 = _witness(tmp_path, "w1", log_key)
    with w1:
        _write(tmp_path, "log", 50, witnesses=[Witness(w1.url, k1)])
        check = subprocess.run(
            [CANARYGATE, "witness", "check", "--log", log_key.vkey(), "http://127.0.0.1:9", w1.url],
            capture_output=True,
            text=True,
        )
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stderr
    assert "http://127.0.0.1:9: unreachable" in check.stdout and f"{w1.url}: size 50" in check.stdout
    nothing = subprocess.run(
        [CANARYGATE, "witness", "check", "--log", log_key.vkey(), "http://127.0.0.1:9"], capture_output=True, text=True
    )
    assert nothing.returncode == 2 and "nothing was checked" in nothing.stdout  # no all-clear


def test_a_failure_to_keep_a_cosignature_is_retried(tmp_path, monkeypatch):
    """A full disk while keeping one cosignature is a failed attempt like any other: the witness's task goes
    on: it tries again, and the next checkpoint is cosigned and kept too."""
    import asyncio

    from gateway.evidence import witnessing
    from gateway.evidence.witnessing import Witnesses

    log_signer = note.Signer(ORIGIN, bytes(32))
    mine = note.Signer("witness.test/mine", bytes(range(32)), note.ALG_COSIGNATURE_V1)
    monkeypatch.setattr(witnessing, "RETRY_SECONDS", 0.05)
    kept, full = [], [True]

    def cosigning(request):
        text = request.content.decode().partition("\n\n")[2]
        return httpx.Response(200, text=note.cosign(text, mine, 7))

    async def run():
        async def keep(text):
            if full.pop() if full else False:
                raise OSError(28, "No space left on device")
            kept.append(text)

        witnesses = Witnesses([Witness("http://witness.test", mine.verifier)], lambda a, b: [], keep)
        witnesses._client = httpx.AsyncClient(transport=httpx.MockTransport(cosigning))
        for size in (10, 20):
            checkpoint = note.Checkpoint(ORIGIN, size, bytes(32))
            witnesses.submit(note.sign_checkpoint(checkpoint, log_signer), checkpoint)
            for _ in range(100):  # flush does not wait for a witness whose last attempt failed
                await asyncio.sleep(0.02)
                if witnesses.cosigned[mine.name] == size:
                    break
        await witnesses.close(0)
        return witnesses.cosigned

    assert asyncio.run(run()) == {"witness.test/mine": 20}
    assert [split_note(k)[0].split("\n")[1] for k in kept] == ["10", "20"]  # 10 again, once the disk had room


def test_a_cosignature_torn_by_a_crash_is_cut_and_later_ones_are_read(tmp_path):
    """A crash mid-write leaves half a frame in cosignatures.log; reopening cuts it, as it cuts
    checkpoints.log's, so later frames are not read as part of it."""
    from gateway.evidence.store import LogStore

    log_signer = note.Signer(ORIGIN, bytes(32))
    mine = note.Signer("witness.test/mine", bytes(range(32)), note.ALG_COSIGNATURE_V1)

    def cosigned(size):
        signed = note.sign_checkpoint(note.Checkpoint(ORIGIN, size, bytes(32)), log_signer)
        return signed + note.cosign(signed, mine, 7)

    store = LogStore(tmp_path / "log")
    store.open(1)
    store.add_cosigned(cosigned(3))
    torn = cosigned(5).encode()
    with open(tmp_path / "log" / "cosignatures.log", "ab") as f:
        f.write(len(torn).to_bytes(4, "big") + torn[:20])
    store.close()
    store.open(1)
    for size in (8, 10):
        store.add_cosigned(cosigned(size))
    store.close()
    assert LogReader(tmp_path / "log").cosigned() == [cosigned(3), cosigned(8), cosigned(10)]


def test_two_witnesses_of_one_name_are_refused_in_the_config(tmp_path):
    """Cosignatures are told apart by the witness's name: a second witness of the same name would never be
    contacted, and its cosignatures would count for the first."""
    import tomllib

    from gateway import config

    vkeys = [note.Signer("witness.test/w", bytes([i]) * 32, note.ALG_COSIGNATURE_V1).verifier.vkey() for i in (1, 2)]
    listed = ", ".join(f'{{url = "http://127.0.0.1:{7000 + i}", vkey = "{v}"}}' for i, v in enumerate(vkeys))
    text = config.DEFAULT_TOML.replace("witnesses = []", f"witnesses = [{listed}]")
    with pytest.raises(config.ConfigError, match="two witnesses are named witness.test/w"):
        config.parse(tomllib.loads(text), "x")


def test_serving_without_a_witness_key_says_so_in_one_line(tmp_path):
    vkey = init_witness(tmp_path / "other", "witness.test/other").verifier.vkey()
    result = cli(tmp_path, "witness", "serve", "--dir", str(tmp_path / "missing"), "--log", vkey)
    assert result.returncode == 2 and "no witness key; run `canarygate witness init" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
