"""The evidence log through the CLI and real gateway processes: keys, verify, prove, open, export, crashes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import threading
import time

import httpx

from gateway.evidence.reader import verify_proof
from tests.test_cli import Running, cli

BODY = {"model": "m", "messages": [{"role": "user", "content": "evidence please"}]}


def _setup(tmp_path, fake_upstream, durability="batch"):
    fake_upstream.reset()
    assert cli(tmp_path, "init").returncode == 0
    toml = (tmp_path / "canarygate.toml").read_text()
    toml = toml.replace('durability = "batch"', f'durability = "{durability}"')
    toml = toml.replace('origin = ""', 'origin = "canarygate.test/cli"')
    (tmp_path / "canarygate.toml").write_text(toml.replace("checkpoint_interval = 10.0", "checkpoint_interval = 0.5"))
    return cli(tmp_path, "identities", "add", "mallory").stdout.strip().splitlines()[-1]


def test_keys_and_log_commands_end_to_end(tmp_path, fake_upstream):
    key = _setup(tmp_path, fake_upstream)
    keydir = tmp_path / ".canarygate" / "keys"
    assert sorted(p.name for p in keydir.glob("*.key")) == ["log-signing.key", "master-0.key", "watermark.key"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keydir.glob("*.key"))
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw, httpx.Client(base_url=gw.url) as http:
        for _ in range(5):
            assert http.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}).is_success
        assert http.post("/v1/chat/completions", json=BODY).status_code == 401
    assert "cg_" not in gw.output and "sk-" not in gw.output  # no secret in the logs

    vkey = cli(tmp_path, "keys", "public").stdout.strip().splitlines()[-1]
    assert vkey.startswith("canarygate.test/cli+")
    verified = cli(tmp_path, "log", "verify")
    # three commitments at start (watermark key, word sets, detector), then two entries per exchange
    assert verified.returncode == 0 and "15 entries" in verified.stdout, verified.stdout + verified.stderr
    assert cli(tmp_path, "log", "verify", "--vkey", vkey).returncode == 0
    latest = (tmp_path / ".canarygate" / "evidence" / "0" / "checkpoint").read_text()
    (tmp_path / "seen.note").write_text(latest)  # as a witness would serve it
    (tmp_path / "elsewhere.note").write_text(latest.replace("canarygate.test/cli", "elsewhere.test/log", 1))
    assert cli(tmp_path, "log", "verify", "--gossip", "seen.note").returncode == 0
    shutil.copytree(tmp_path / ".canarygate" / "evidence" / "0", tmp_path / ".canarygate" / "evidence" / "0.bak")
    assert "15 entries" in cli(tmp_path, "log", "verify").stdout  # an operator's copy is no log of its own
    shutil.rmtree(tmp_path / ".canarygate" / "evidence" / "0.bak")
    elsewhere = cli(tmp_path, "log", "verify", "--gossip", "elsewhere.note")
    assert elsewhere.returncode != 0 and "none of these logs" in elsewhere.stderr, elsewhere.stderr

    proof = json.loads(cli(tmp_path, "log", "prove", "5").stdout)
    verify_proof(proof, vkey)  # a third party with the public key alone
    leaf = json.loads(base64.b64decode(proof["leaf"]))
    assert leaf["kind"] == "begin" and leaf["identity"] == "mallory"
    beyond = cli(tmp_path, "log", "prove", "99999")  # no such entry: not one waiting for its checkpoint
    assert beyond.returncode != 0 and "no entry 99999" in beyond.stderr, beyond.stderr
    opened = json.loads(cli(tmp_path, "log", "open", "5", "prompt").stdout)
    assert json.loads(opened["value"]) == BODY and opened["commitment"] == leaf["commit"]["prompt"]
    assert "evidence please" not in (tmp_path / ".canarygate" / "evidence" / "0" / "segment-000000.log").read_text(
        "latin-1"
    )

    table = cli(tmp_path, "log", "show")  # as text: commitments have no id
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 15, table.stderr
    assert all(line.startswith("log 0 ") for line in table.stdout.splitlines())  # each log numbers from 0
    assert cli(tmp_path, "log", "search", "--since", "2000").returncode == 0
    shown = cli(tmp_path, "log", "show", "--identity", "mallory", "--json", "--reveal").stdout.splitlines()
    assert len(shown) == 10 and "evidence please" in shown[0]
    every = [json.loads(line) for line in cli(tmp_path, "log", "show", "--json", "--reveal").stdout.splitlines()]
    assert [row["kind"] for row in every if "revealed" not in row] == ["commitment"] * 3  # a key is no row to show
    export = cli(tmp_path, "log", "export", str(tmp_path / "bundle"), "--reveal", "prompt")
    assert export.returncode == 0, export.stderr
    again = cli(tmp_path, "log", "export", str(tmp_path / "bundle"), "--identity", "nobody")  # would keep the rest
    assert again.returncode == 2 and "not an empty folder" in again.stderr
    lines = (tmp_path / "bundle" / "log-0" / "entries.jsonl").read_text().splitlines()
    checkpoint = json.loads((tmp_path / "bundle" / "log-0" / "checkpoints.json").read_text())[-1]
    for line in lines:
        verify_proof({**json.loads(line), "checkpoint": checkpoint}, vkey)


def test_after_a_rotation_the_published_keys_verify_the_whole_history(tmp_path, fake_upstream):
    """Checkpoints signed before `keys rotate` stay under the retired key: `keys public` lists it too, and
    with every key it lists the log verifies; with the current key alone, the old checkpoints do not."""
    key = _setup(tmp_path, fake_upstream)
    for _ in range(2):  # a run, a rotation, another run
        with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw, httpx.Client(base_url=gw.url) as http:
            assert http.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}).is_success
        if not (tmp_path / ".canarygate" / "keys" / "master-1.key").exists():
            new = cli(tmp_path, "keys", "rotate").stdout.split()[-1]
    published = cli(tmp_path, "keys", "public").stdout.split()
    assert len(published) == 2 and published[-1] == new
    assert cli(tmp_path, "log", "verify", *(a for k in published for a in ("--vkey", k))).returncode == 0
    refused = cli(tmp_path, "log", "verify", "--vkey", new)
    assert refused.returncode != 0 and "signature does not verify" in refused.stdout + refused.stderr


def test_verify_fails_naming_the_entry_after_tampering(tmp_path, fake_upstream):
    key = _setup(tmp_path, fake_upstream)
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw, httpx.Client(base_url=gw.url) as http:
        for _ in range(3):
            http.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
    segment = tmp_path / ".canarygate" / "evidence" / "0" / "segment-000000.log"
    data = bytearray(segment.read_bytes())
    at = data.index(b'"kind":"end"')
    data[at + 9 : at + 12] = b"beg"  # an end entry now claims to be a begin
    segment.write_bytes(bytes(data))
    result = cli(tmp_path, "log", "verify")
    assert result.returncode == 2 and "entry 4" in result.stderr, result.stderr  # after 3 commitments, the first end


def test_sigkill_under_load_then_restart_verifies_and_continues(tmp_path, fake_upstream):
    key = _setup(tmp_path, fake_upstream)
    headers = {"authorization": f"Bearer {key}"}
    stop = threading.Event()
    served = []

    def load(url):
        with httpx.Client(base_url=url, timeout=5) as http:
            while not stop.is_set():
                try:
                    served.append(http.post("/v1/chat/completions", json=BODY, headers=headers).status_code)
                except httpx.TransportError:
                    return

    gw = Running(tmp_path, "serve", "--upstream", fake_upstream.url).__enter__()  # killed, never stopped
    threads = [threading.Thread(target=load, args=(gw.url,)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(gw.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(5)
    gw.proc.wait(5)
    assert len(served) > 20
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw, httpx.Client(base_url=gw.url) as http:
        assert http.post("/v1/chat/completions", json=BODY, headers=headers).is_success
    result = cli(tmp_path, "log", "verify")
    assert result.returncode == 0, result.stderr
    entries = int(result.stdout.split(": ")[1].split(" entries")[0])
    assert entries >= 2  # what was fsynced before the kill, and the new exchange


def test_a_damaged_key_file_is_named_not_taken_for_no_keys(tmp_path):
    assert cli(tmp_path, "init").returncode == 0
    (tmp_path / ".canarygate" / "keys" / "master-0.key").write_text("not base64!!\n")
    for command in (("log", "verify"), ("log", "open", "3", "prompt")):
        result = cli(tmp_path, *command)
        assert result.returncode == 2 and "master-0.key" in result.stderr, result.stderr
