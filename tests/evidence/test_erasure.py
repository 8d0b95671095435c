"""Privacy and retention: a tenant's bodies erased by shredding its keys or by age, the log still verifying;
client addresses kept as keyed hashes unless configured otherwise."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import stat
import time
from pathlib import Path

import httpx
import pytest

from gateway import files
from gateway.evidence import entry, keys, store
from gateway.evidence.keys import address_hash
from gateway.evidence.log import EvidenceLog
from gateway.evidence.reader import LogReader, VerifyError
from gateway.evidence.tenants import DAY, TenantKeys, tenant_id
from tests.evidence.test_cli_log import BODY, _setup
from tests.test_cli import Running, cli

ORIGIN = "canarygate.test/erasure"


def _ask(url: str, key: str, text: str) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": text}]}
    with httpx.Client(base_url=url) as http:
        assert http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}).is_success


def _revealed(tmp_path, identity: str) -> list[dict]:
    shown = cli(tmp_path, "log", "show", "--identity", identity, "--json", "--reveal")
    return [row["revealed"] for row in map(json.loads, shown.stdout.splitlines())]


def test_shredding_a_tenant_erases_its_bodies_and_the_log_still_verifies(tmp_path, fake_upstream):
    _setup(tmp_path, fake_upstream)
    alice = cli(tmp_path, "identities", "add", "alice", "--tenant", "acme").stdout.split()[-1]
    bob = cli(tmp_path, "identities", "add", "bob", "--tenant", "globex").stdout.split()[-1]
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw:
        _ask(gw.url, alice, "acme secret one")
        _ask(gw.url, bob, "globex question")
        shredded = cli(tmp_path, "log", "shred", "--tenant", "acme")
        assert shredded.returncode == 0 and "deleted 1 keys" in shredded.stdout, shredded.stdout + shredded.stderr
        _ask(gw.url, alice, "acme after the shred")  # the running gateway makes a new key at its next batch
    tenant_keys = list((tmp_path / ".canarygate" / "keys" / "tenants").rglob("*.key"))
    assert tenant_keys and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tenant_keys)

    verified = cli(tmp_path, "log", "verify")
    assert verified.returncode == 0 and "2 erased" in verified.stdout, verified.stdout + verified.stderr
    first, _, second, _ = _revealed(tmp_path, "alice")
    assert "erased" in first and "acme secret one" not in json.dumps(first)
    assert "acme after the shred" in second["prompt"]
    assert "globex question" in _revealed(tmp_path, "bob")[0]["prompt"]
    begin = next(row for row in map(json.loads, cli(tmp_path, "log", "show", "--json").stdout.splitlines())
                 if row.get("identity") == "alice")  # fmt: skip
    refused = cli(tmp_path, "log", "open", str(begin["index"]), "prompt")
    assert refused.returncode == 2 and "erased" in refused.stderr


def _write(directory, keydir, tenant: str | None, count: int) -> None:
    keys.init_keys(keydir, ORIGIN)
    evidence = EvidenceLog(directory, keys.Keys.load(keydir), ORIGIN)

    async def run():
        await evidence.start()
        for i in range(count):
            commitments, openings = entry.commit({"prompt": f"prompt {i}".encode()})
            public = {"v": 1, "kind": "begin", "id": f"req_{i}", "identity": "u", "commit": commitments}
            await evidence.append(entry.canonical(public), openings, "u", tenant=tenant)
        await evidence.close()

    asyncio.run(run())


def test_retention_erases_by_age_and_keeps_the_logs_own_entries(tmp_path):
    _write(tmp_path / "log", tmp_path / "keys", "acme", 20)
    _write(tmp_path / "log", tmp_path / "keys", None, 5)  # the log's own (commitments): never expire
    tenant_keys = TenantKeys(tmp_path / "keys")
    assert tenant_keys.expire(retention_days=30) == 0  # today's key is kept
    reader = LogReader(tmp_path / "log", keys.Keys.load(tmp_path / "keys"))
    assert (reader.verify().opened, reader.verify().erased) == (25, 0)
    assert tenant_keys.expire(retention_days=30, now=time.time() + 31 * DAY) == 1
    report = reader.verify()
    assert (report.entries, report.opened, report.erased) == (25, 5, 20)


def test_client_addresses_are_keyed_hashes_unless_configured_plain(tmp_path, fake_upstream):
    key = _setup(tmp_path, fake_upstream)
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw:
        _ask(gw.url, key, "hashed")
    loaded = keys.Keys.load(tmp_path / ".canarygate" / "keys")
    (client,) = [r["client"] for r in _revealed(tmp_path, "mallory") if "client" in r]
    assert client == address_hash(loaded.address_key, "127.0.0.1") and "127.0.0.1" not in client

    toml = tmp_path / "canarygate.toml"
    toml.write_text(toml.read_text().replace('client_addresses = "hashed"', 'client_addresses = "plain"'))
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw:
        _ask(gw.url, key, "plain")
    assert [r["client"] for r in _revealed(tmp_path, "mallory") if "client" in r][-1] == "127.0.0.1"


def test_a_gateway_with_retention_expires_old_keys_when_it_starts(tmp_path, fake_upstream):
    _setup(tmp_path, fake_upstream)
    toml = tmp_path / "canarygate.toml"
    toml.write_text(toml.read_text().replace("retention_days = 0", "retention_days = 7"))
    old_day, today = int(time.time() // DAY) - 8, int(time.time() // DAY) - 7
    folder = tmp_path / ".canarygate" / "keys" / "tenants" / ("0" * 32)
    folder.mkdir(parents=True)
    (folder / f"{old_day}-00000000.key").write_bytes(bytes(32))
    (folder / f"{today}-00000000.key").write_bytes(bytes(32))
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url):
        pass
    assert sorted(p.name for p in folder.iterdir()) == [f"{today}-00000000.key"]


def test_shred_says_when_older_segments_keep_the_tenants_bodies(tmp_path, fake_upstream):
    """Segments of format 1 (before per-tenant keys) are sealed under the log key: shredding cannot reach
    them, and the command says so rather than claim an erasure it did not make."""
    from gateway.evidence.store import MAGIC, MAGIC_V1

    _setup(tmp_path, fake_upstream)
    alice = cli(tmp_path, "identities", "add", "alice", "--tenant", "acme").stdout.split()[-1]
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw:
        _ask(gw.url, alice, "before the upgrade")
    assert "written before per-tenant keys" not in cli(tmp_path, "log", "shred", "--tenant", "acme").stdout
    segment = next((tmp_path / ".canarygate" / "evidence" / "0").glob("segment-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data.replace(MAGIC, MAGIC_V1, 1))  # as a log written by the previous version
    assert "written before per-tenant keys" in cli(tmp_path, "log", "shred", "--tenant", "acme").stdout


def _sealed_parts_named(log: Path, references: dict[int, str]) -> None:
    """Rewrite entries' sealed parts to name other keys (their length kept, the record's CRC made anew), as
    someone with write access to the log could: the sealed part lies outside the tree."""
    path = next(log.glob("segment-*.log"))
    data = bytearray(path.read_bytes())
    for index, (offset, leaf, sealed, _) in enumerate(store.Segment(path).records()):
        if index in references:
            name = references[index].encode()
            forged = (bytes([len(name)]) + name + sealed[1:])[: len(sealed)]
            header = store.RECORD_HEADER.pack(
                len(leaf), len(forged), store.record_crc(len(leaf), len(forged), leaf + forged)
            )
            data[offset : offset + store.RECORD_HEADER.size + len(leaf) + len(forged)] = header + leaf + forged
    path.write_bytes(bytes(data))


def _commitment_and_tenant_entries(tmp_path) -> tuple[Path, keys.Keys, str]:
    """A log of one commitment (the log's own key) and two begin entries of tenant acme, written today."""
    keys.init_keys(tmp_path / "keys", ORIGIN)
    evidence = EvidenceLog(tmp_path / "log", keys.Keys.load(tmp_path / "keys"), ORIGIN)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    tenants = tmp_path / "keys" / "tenants"
    before = set(tenants.rglob("*.key"))

    async def run():
        await evidence.start()
        commitments, openings = entry.commit({"watermark_key": bytes(32)})
        public = {"v": 1, "kind": "commitment", "subject": "watermark-key", "time": now, "commit": commitments}
        await evidence.append(entry.canonical(public), openings, None, tenant=None)
        for i in range(2):
            commitments, openings = entry.commit({"prompt": f"acme prompt {i}".encode()})
            public = {"v": 1, "kind": "begin", "id": f"req_{i}", "identity": "u", "tenant": "acme", "time": now,
                      "commit": commitments}  # fmt: skip
            await evidence.append(entry.canonical(public), openings, "u", tenant="acme")
        await evidence.close()

    asyncio.run(run())
    (reference,) = [str(path.relative_to(tenants).with_suffix("")) for path in set(tenants.rglob("*.key")) - before]
    return tmp_path / "log", keys.Keys.load(tmp_path / "keys"), reference


TODAY = int(time.time() // DAY)


@pytest.mark.parametrize(
    "forged, reason",
    [
        ({0: f"{tenant_id('acme')}/{TODAY}-00000000"}, "a commitment's sealed part names a tenant key"),
        ({1: "x"}, "its sealed part names no tenant key"),
        ({1: f"{tenant_id('globex')}/{TODAY}-00000000"}, "sealed under another tenant's key"),
        ({1: f"{tenant_id('acme')}/{TODAY - 400}-00000000"}, f"sealed under a key of day {TODAY - 400}"),
    ],
    ids=["commitment", "malformed", "other tenant", "other day"],
)
def test_a_sealed_part_replaced_to_name_a_missing_key_is_no_erasure(tmp_path, forged, reason):
    """Erasure deletes keys; a sealed part rewritten to name a key that never sealed such an entry is tampering."""
    log, log_keys, _ = _commitment_and_tenant_entries(tmp_path)
    assert LogReader(log, log_keys).verify().opened == 3
    _sealed_parts_named(log, forged)
    with pytest.raises(VerifyError, match=re.escape(reason)):
        LogReader(log, log_keys).verify()


def test_a_missing_key_of_its_tenant_and_day_reads_as_erased_only_once_an_erasure_deleted_it(tmp_path):
    """A sealed part rewritten to name a key of the same tenant and day that does not exist is tampering while
    acme's keys stand; after acme is shredded (or its days expire) the same entry reads as erased."""
    log, log_keys, acme = _commitment_and_tenant_entries(tmp_path)
    _sealed_parts_named(log, {1: acme.replace(acme[-8:], "00000000")})
    with pytest.raises(VerifyError, match="which no shred or retention deleted"):
        LogReader(log, log_keys).verify()
    with pytest.raises(VerifyError, match="which no shred or retention deleted"):
        LogReader(log, log_keys).open_all(LogReader(log, log_keys).get(1))
    TenantKeys(tmp_path / "keys").shred("acme")
    report = LogReader(log, log_keys).verify()
    assert (report.opened, report.erased) == (1, 2)


def test_a_tenants_whole_key_folder_deleted_without_a_shred_is_no_erasure(tmp_path):
    """Deleting one key file was caught; deleting the tenant's whole folder read as an erasure and passed."""
    log, log_keys, acme = _commitment_and_tenant_entries(tmp_path)
    shutil.rmtree(tmp_path / "keys" / "tenants" / acme.split("/")[0])
    with pytest.raises(VerifyError, match="which no shred or retention deleted"):
        LogReader(log, log_keys).verify()


def test_a_tenants_first_key_has_its_folders_on_disk_before_it_is_used(tmp_path, monkeypatch):
    """The key sealing a tenant's first entry lives in folders made for it: each is fsynced into its parent
    (or a power loss could take the key of an acknowledged entry), and each is 0700, not only the last."""
    synced = []
    real = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    (tmp_path / "keys").mkdir(mode=0o700)
    reference, _ = TenantKeys(tmp_path / "keys").current("acme")
    tenants = tmp_path / "keys" / "tenants"
    assert {tmp_path / "keys", tenants} <= set(synced)  # each new folder's name is on disk in its parent
    for folder in (tenants, tenants / reference.split("/")[0], tenants / "erasures"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_key_missing_from_before_erasures_were_recorded_reads_as_erased(tmp_path):
    """A log written and erased by a version that kept no record: its missing keys read as erased, as then."""
    log, log_keys, acme = _commitment_and_tenant_entries(tmp_path)
    _sealed_parts_named(log, {1: acme.replace(acme[-8:], "00000000")})
    since = tmp_path / "keys" / "tenants" / "erasures" / "since"
    for before in (lambda: since.write_text(str(TODAY + 1)), since.unlink):  # records began later; or never
        before()
        assert LogReader(log, log_keys).verify().erased == 1


def test_retention_records_what_it_erased(tmp_path):
    log, log_keys, acme = _commitment_and_tenant_entries(tmp_path)
    TenantKeys(tmp_path / "keys").expire(0, now=time.time() + DAY)  # today's keys: past a retention of 0 days
    report = LogReader(log, log_keys).verify()
    assert (report.opened, report.erased) == (1, 2)


def test_a_sealed_part_copied_from_another_log_does_not_open_there(tmp_path):
    """Two workers' logs hold entries of one index, identity, tenant and day; the sealed part of one, copied
    into the other, decrypts, but what it opens is not what the leaf committed to."""
    log, log_keys, _ = _commitment_and_tenant_entries(tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    (other / "keys").symlink_to(tmp_path / "a" / "keys")
    second, _, _ = _commitment_and_tenant_entries(other)
    records = {path: list(store.Segment(next(path.glob("segment-*.log"))).records()) for path in (log, second)}
    _, leaf, _, _ = records[log][1]
    _, _, sealed, _ = records[second][1]
    path = next(log.glob("segment-*.log"))
    offset = records[log][1][0]
    data = bytearray(path.read_bytes())
    old_length = store.RECORD_HEADER.size + len(leaf) + len(records[log][1][2])
    header = store.RECORD_HEADER.pack(len(leaf), len(sealed), store.record_crc(len(leaf), len(sealed), leaf + sealed))
    data[offset : offset + old_length] = header + leaf + sealed
    path.write_bytes(bytes(data))
    reader = LogReader(log, log_keys)
    with pytest.raises(VerifyError, match="does not match its commitment"):
        reader.open_field(1, "prompt")


def test_a_shred_racing_the_making_of_a_key_does_not_stop_the_log(tmp_path, monkeypatch):
    """The shred removes the tenant's folder between the writer's mkdir and its write: the writer makes the
    folder again (the log would fail-stop for every tenant otherwise)."""
    from gateway.evidence import tenants

    made = TenantKeys(tmp_path)
    write = tenants.write_atomically
    raced = []

    def shred_first(path, data):
        if path.suffix == ".key" and not raced:
            raced.append(True)
            TenantKeys(tmp_path).shred("acme")
        write(path, data)

    monkeypatch.setattr(tenants, "write_atomically", shred_first)
    reference, key = made.current("acme")
    assert raced and made.load(reference) == key


def test_a_clock_stepped_back_across_midnight_leaves_the_log_verifiable(tmp_path, monkeypatch):
    """An entry stamped just after midnight, sealed after the clock stepped back a moment: a key of the day
    before its own."""
    from gateway.evidence import tenants
    from gateway.evidence.recorder import _iso

    keys.init_keys(tmp_path / "keys", ORIGIN)
    evidence = EvidenceLog(tmp_path / "log", keys.Keys.load(tmp_path / "keys"), ORIGIN)
    midnight = (time.time() // DAY) * DAY

    async def run():
        await evidence.start()
        commitments, openings = entry.commit({"prompt": b"just after midnight"})
        public = {"v": 1, "kind": "begin", "id": "req_0", "identity": "u", "tenant": "acme",
                  "time": _iso(midnight + 0.5), "commit": commitments}  # fmt: skip
        monkeypatch.setattr(tenants.time, "time", lambda: midnight - 1.0)
        await evidence.append(entry.canonical(public), openings, "u", tenant="acme")
        monkeypatch.undo()
        await evidence.close()

    asyncio.run(run())
    assert LogReader(tmp_path / "log", keys.Keys.load(tmp_path / "keys")).verify().opened == 1
