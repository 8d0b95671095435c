"""An exported bundle, checked the way an outside expert would: the shipped verify.py, in a fresh virtual
environment holding only `cryptography` (and what pip installs with it), against a gateway whose
checkpoints two real witness processes cosigned."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from gateway.evidence import note
from gateway.evidence.keys import Keys
from gateway.evidence.verifier import split_note
from gateway.watermark import epoch_keys
from gateway.watermark.mark import LexicalWatermark
from gateway.witness import init_witness
from tests.evidence.test_cli_log import BODY
from tests.test_cli import Running, cli
from tests.watermark.test_detect import SAMPLE

ORIGIN = "canarygate.test/bundle"


def _only_cryptography(folder: Path) -> Path:
    """A virtual environment without pip, holding exactly the files of `cryptography` and its dependencies."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    wanted, seen = ["cryptography"], set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def served(tmp_path_factory, fake_upstream):
    """A gateway with two witnesses served a few exchanges and stopped; returns the folder and keys."""
    tmp = tmp_path_factory.mktemp("bundle")
    fake_upstream.reset()
    assert cli(tmp, "init").returncode == 0
    toml = (tmp / "canarygate.toml").read_text().replace('origin = ""', f'origin = "{ORIGIN}"')
    (tmp / "canarygate.toml").write_text(toml)
    assert cli(tmp, "keys", "init").returncode == 0
    log_key = cli(tmp, "keys", "public").stdout.split()[-1]
    witnesses = [init_witness(tmp / name, f"witness.test/{name}").verifier.vkey() for name in ("w1", "w2")]
    running = [Running(tmp, "witness", "serve", "--dir", str(tmp / n), "--log", log_key) for n in ("w1", "w2")]
    listed = ", ".join(f'{{url = "{w.url}", vkey = "{k}"}}' for w, k in zip(running, witnesses, strict=True))
    toml = toml.replace("witnesses = []", f"witnesses = [{listed}]")
    (tmp / "canarygate.toml").write_text(toml.replace("checkpoint_interval = 10.0", "checkpoint_interval = 0.3"))
    key = cli(tmp, "identities", "add", "mallory").stdout.split()[-1]
    with running[0], running[1]:
        with Running(tmp, "serve", "--upstream", fake_upstream.url) as gw, httpx.Client(base_url=gw.url) as http:
            for round_ in range(2):  # two rounds, a checkpoint after each
                for _ in range(2):
                    assert http.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
                time.sleep(0.8 * (1 - round_))
        export = cli(tmp, "log", "export", "bundle", "--reveal", "prompt", "--disclose-epoch", "0")
    assert export.returncode == 0 and "note:" not in export.stdout, export.stdout + export.stderr
    python = _only_cryptography(tmp / "fresh")
    return tmp, python, log_key, witnesses


def _verify(served, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    tmp, python, log_key, witnesses = served
    trust = ["--log-key", log_key] + [arg for w in witnesses for arg in ("--witness", w)]
    return subprocess.run(
        [str(python), str(bundle / "verify.py"), str(bundle), *trust, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=bundle,
    )


def test_the_fresh_environment_has_cryptography_and_not_canarygate(served):
    tmp, python = served[0], served[1]

    def imports(module: str) -> bool:
        return subprocess.run([str(python), "-c", f"import {module}"], cwd=tmp, capture_output=True).returncode == 0

    assert imports("cryptography.hazmat.primitives.asymmetric.ed25519")
    assert not any(imports(module) for module in ("gateway", "httpx", "starlette", "numpy"))


def test_the_standalone_verifier_accepts_the_exported_bundle(served):
    tmp = served[0]
    result = _verify(served, tmp / "bundle", "--json")
    assert result.returncode == 0, result.stderr
    (log,) = json.loads(result.stdout)["logs"]
    assert set(log["cosigned_by"]) == {"witness.test/w1", "witness.test/w2"}
    assert log["entries"] == log["tree_size"] >= 11  # 3 commitments, 4 exchanges of two entries each
    subjects = {c["subject"]: c for c in log["commitments"]}
    assert set(subjects) == {"watermark-key", "word-sets", "detector"}
    assert subjects["watermark-key"]["opened"] == ["watermark_key"] and subjects["watermark-key"]["epoch"] == 0
    assert "cosigned by witness.test/w1, witness.test/w2: OK" in _verify(served, tmp / "bundle").stdout
    bundled_keys = subprocess.run([str(served[1]), "verify.py"], cwd=tmp / "bundle", capture_output=True, text=True)
    assert bundled_keys.returncode == 0 and "came from the bundle itself" in bundled_keys.stdout


def _flip_a_byte(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[5])
    leaf = bytearray(base64.b64decode(row["leaf"]))
    leaf[len(leaf) // 2] ^= 0x01
    row["leaf"] = base64.b64encode(bytes(leaf)).decode()
    lines[5] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def _swap_checkpoints(bundle: Path) -> None:
    path = bundle / "log-0" / "checkpoints.json"
    notes = json.loads(path.read_text())
    assert len(notes) >= 2
    notes[-1], notes[-2] = notes[-2], notes[-1]
    path.write_text(json.dumps(notes))


def _drop_a_cosignature(bundle: Path) -> None:
    path = bundle / "log-0" / "checkpoints.json"
    notes = json.loads(path.read_text())
    notes[-1] = "".join(line for line in notes[-1].splitlines(keepends=True) if "witness.test/w2" not in line)
    path.write_text(json.dumps(notes))


def _open_to_another_key(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (row,) = [r for r in rows if "watermark_key" in r.get("openings", {})]
    row["openings"]["watermark_key"]["value"] = base64.b64encode(bytes(32)).decode()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _commit_another_epoch(bundle: Path) -> None:
    """The disclosed epoch's commitment entry once more, as epoch 1's and with its key left unopened."""
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (row,) = [r for r in rows if "watermark_key" in r.get("openings", {})]
    public = json.loads(base64.b64decode(row["leaf"]))
    other = {**row, "leaf": base64.b64encode(json.dumps({**public, "epoch": 1}).encode()).decode(), "openings": {}}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, other]))


def _move_the_start_of_a_prompt_into_its_salt(bundle: Path) -> None:
    """sha256(salt || value) cannot tell salt+value[:k] || value[k:] apart: the salt's length must."""
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (row, *_) = [r for r in rows if "prompt" in r.get("openings", {})]
    opened = row["openings"]["prompt"]
    salt, value = base64.b64decode(opened["salt"]), base64.b64decode(opened["value"])
    opened["salt"], opened["value"] = (base64.b64encode(x).decode() for x in (salt + value[:9], value[9:]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _openings_as_a_list(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4]["openings"] = []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _index_as_a_float(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4]["leaf_index"] = float(rows[4]["leaf_index"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _nest_too_deep(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    path.write_text("[" * 100_000 + "\n" + path.read_text())


def _list_an_entry_twice(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5] + lines[4:]))


def _alter_a_leaf_hash(bundle: Path) -> None:
    path = bundle / "log-0" / "entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert "leaf_hash" in rows[4]
    rows[4]["leaf_hash"] = base64.b64encode(bytes(32)).decode()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _copy_the_log_into_a_second_folder(bundle: Path) -> None:
    shutil.copytree(bundle / "log-0", bundle / "log-1")


def _checkpoint_as_a_number(bundle: Path) -> None:
    (bundle / "log-0" / "checkpoints.json").write_text("[1]")


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (_flip_a_byte, "inclusion proof does not lead to the root"),
        # JSON of the wrong shape is a rejection with a reason, not a traceback
        (_openings_as_a_list, "line 5: malformed bundle (AttributeError"),
        (_index_as_a_float, "line 5: 4.0 is not an integer index or size"),
        (_nest_too_deep, "line 1: malformed bundle (RecursionError"),
        (_checkpoint_as_a_number, "malformed bundle (AttributeError"),
        (_list_an_entry_twice, "line 6: entries must be listed once each"),
        (_alter_a_leaf_hash, "line 5: its leaf_hash is not the hash of its leaf"),
        (_copy_the_log_into_a_second_folder, "one log in two folders"),
        (_swap_checkpoints, "is for other sizes"),  # which proof depends on how many checkpoints the run made
        (_drop_a_cosignature, "missing: witness.test/w2"),
        (_open_to_another_key, "'watermark_key' does not match its commitment"),
        (_move_the_start_of_a_prompt_into_its_salt, "has a salt of 41 bytes, not 32"),
    ],
)
def test_the_standalone_verifier_rejects_tampering(served, tmp_path, tamper, reason):
    bundle = tmp_path / "bundle"
    shutil.copytree(served[0] / "bundle", bundle)
    tamper(bundle)
    result = _verify(served, bundle)
    assert result.returncode == 1 and "REJECTED" in result.stderr and reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bundle_without_its_witness_list_is_no_quiet_pass(served, tmp_path):
    """Dropping the list leaves no witness to ask for: the verifier says that the bundle chose that."""
    bundle = tmp_path / "bundle"
    shutil.copytree(served[0] / "bundle", bundle)
    (bundle / "witnesses").unlink()
    result = subprocess.run(
        [str(served[1]), "verify.py", ".", "--log-key", served[2]], cwd=bundle, capture_output=True, text=True
    )
    assert result.returncode == 0 and "cosigned by no witness" in result.stdout
    assert "the witness keys came from the bundle itself" in result.stdout


def test_a_quorum_below_every_witness_accepts_a_missing_cosignature(served, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(served[0] / "bundle", bundle)
    _drop_a_cosignature(bundle)
    assert _verify(served, bundle, "--quorum", "1").returncode == 0


def test_gossip_is_compared_or_refused_never_passed_over(served, tmp_path):
    """A witness's checkpoint of a size the bundle has no checkpoint of cannot be compared with it: a fork
    shown to that witness would hide there (a split view grows on both sides, so sizes rarely meet)."""
    bundle = served[0] / "bundle"
    notes = json.loads((bundle / "log-0" / "checkpoints.json").read_text())
    last = note.Checkpoint.parse(split_note(notes[-1])[0])
    signer = note.Signer(ORIGIN, Keys.load(served[0] / ".canarygate" / "keys").signer.seed)
    sizes = {note.Checkpoint.parse(split_note(n)[0]).size for n in notes}
    between = next(size for size in range(1, last.size) if size not in sizes)
    cases = {
        "bundled": (notes[-1], 0, "OK"),
        "fork": (note.sign_checkpoint(note.Checkpoint(ORIGIN, last.size, bytes(32)), signer), 1, "(a fork)"),
        "newer": (note.sign_checkpoint(note.Checkpoint(ORIGIN, last.size + 5, bytes(32)), signer), 1, "export a later"),
        "skipped": (note.sign_checkpoint(note.Checkpoint(ORIGIN, between, bytes(32)), signer), 1, "skip that size"),
        "other log": (note.sign_checkpoint(note.Checkpoint("elsewhere.test/log", 3, bytes(32)), signer), 1, "not in"),
    }
    for name, (text, code, said) in cases.items():
        (tmp_path / f"{name}.note").write_text(text)
        result = _verify(served, bundle, "--gossip", str(tmp_path / f"{name}.note"))
        assert result.returncode == code and said in result.stdout + result.stderr, (name, result.stdout, result.stderr)


def test_an_expert_detects_with_the_key_disclosed_in_the_bundle(served, tmp_path):
    """Without the gateway's keys: the disclosed epoch key, checked against its commitment, drives the test."""
    gateway_keys = epoch_keys(Keys.load(served[0] / ".canarygate" / "keys"))
    mark = LexicalWatermark(gateway_keys[0])
    rows = [{"text": mark.mark(r["output"], r["instruction"]), "prompt": r["instruction"]} for r in SAMPLE[:12]]
    (tmp_path / "suspect.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = str(served[0] / "bundle")
    result = cli(tmp_path, "detect", "suspect.jsonl", "--bundle", bundle, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schemes"]["lexical-v1"]["p_value"] < 1e-6
    assert doc["schemes"]["lexical-v1"]["key"] == gateway_keys[0].fingerprint
    assert all(found is not None for found in doc["commitments"].values()), doc["commitments"]

    alone = doc["schemes"]["lexical-v1"]["raw_p_value"]
    assert doc["schemes"]["lexical-v1"]["p_value"] == alone  # one epoch committed, one disclosed
    # the bundle is not checked here: its commitments are given as its word (a forged one's read the same)
    text = cli(tmp_path, "detect", "suspect.jsonl", "--bundle", bundle).stdout
    assert "committed at" in text and all(
        "run the bundle's verify.py" in line for line in text.splitlines() if "committed at" in line
    )

    more = tmp_path / "more"  # a bundle with a second epoch's key committed to, not disclosed
    shutil.copytree(bundle, more)
    _commit_another_epoch(more)
    again = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--bundle", str(more), "--json").stdout)
    assert again["schemes"]["lexical-v1"]["p_value"] == pytest.approx(2 * alone)  # Holm over both epochs

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    _open_to_another_key(tampered)
    refused = cli(tmp_path, "detect", "suspect.jsonl", "--bundle", str(tampered))
    assert refused.returncode == 2 and "does not match its commitment" in refused.stderr
    leaf_a_list = json.dumps({"leaf": base64.b64encode(b"[1]").decode(), "leaf_index": 0})
    for garbage in ("garbage", leaf_a_list):  # a damaged bundle: an error, no traceback
        (tampered / "log-0" / "entries.jsonl").write_text(garbage + "\n")
        damaged = cli(tmp_path, "detect", "suspect.jsonl", "--bundle", str(tampered))
        assert damaged.returncode == 2 and "not a bundle's log" in damaged.stderr, damaged.stderr
    missing = cli(tmp_path, "detect", "suspect.jsonl", "--bundle", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such bundle folder" in missing.stderr
