"""The report: from a probe's transcript and the log, every test, its proofs, and a page a real browser renders."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from gateway.canary import canary_key
from gateway.evidence.keys import Keys
from gateway.evidence.reader import LogReader
from gateway.evidence.verifier import NoteKey, verify_inclusion_proof
from gateway.forensics.probe import SETTINGS, TRANSCRIPT
from gateway.forensics.served import served_canaries
from gateway.watermark import epoch_keys
from tests.forensics.suspect import jsonl
from tests.ratelimit.conftest import running_gateway
from tests.test_cli import cli
from tests.watermark.test_detect import SAMPLE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def served(fake_upstream, tmp_path_factory):
    """A suspect identity's marked, canaried answers to the sample instructions, served by a real gateway
    whose state is where the CLI looks by default (./.canarygate)."""
    folder = tmp_path_factory.mktemp("report")
    limits = {"identity": {"requests": "100000/minute"}, "tiers": {"suspect": {"tarpit_ms": 0}}}
    answers = []
    with running_gateway(folder / ".canarygate", fake_upstream.url, limits) as gateway:
        for _ in range(5):
            gateway.identity()  # bystanders: the attribution must pass them over
        name, key = gateway.identity("suspect")
        with gateway.client(key) as http:
            for row in SAMPLE:
                fake_upstream.behaviour.text = row["output"]
                body = {"model": "m", "messages": [{"role": "user", "content": row["instruction"]}]}
                answers.append(http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"])
    fake_upstream.reset()
    return folder, name, answers


def _probe_folder(folder, name: str, texts: list[str]):
    """What `canarygate probe` leaves: its settings and a transcript of the suspect's answers."""
    probe = folder / name
    probe.mkdir()
    # a real probe begins after the log's commitments, in a later second (a report reads the same second as late)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    (probe / SETTINGS).write_text(json.dumps({"base_url": "http://suspect.example/v1", "model": name,
                                              "started": started}))  # fmt: skip
    rows = [{"id": f"p{i}", "kind": "prose", "prompt": "", "text": t} for i, t in enumerate(texts)]
    (probe / TRANSCRIPT).write_text(jsonl(rows))
    return probe


def _scored_by_logprobs(probe, folder, name: str) -> None:
    """What --exposure and --reading leave for a suspect that learned the identity's canaries and the key."""
    keys = Keys.load(folder / ".canarygate" / "keys")
    key = epoch_keys(keys)[0]
    served = {s.canary.id: s for s in served_canaries(LogReader(folder / ".canarygate" / "evidence" / "0", keys),
                                                      canary_key(keys.watermark), 8)}  # fmt: skip
    exposure = [{**s.as_json(), "candidates": 10_000, "score": -5.0, "rank": 1, "p_value": 1 / 10_001,
                 "exposure": 13.3} for s in list(served.values())[:3]]  # fmt: skip
    exposure += [{**row, "identity": "bystander", "canary": f"cn_b{i}", "rank": 5000, "p_value": 5000 / 10_001,
                  "exposure": 1.0} for i, row in enumerate(exposure)]  # fmt: skip
    reading = [{"id": f"{s}-0-0", "set": s, "scores": [0.0 if m == key.preferred[s] else -2.0 for m in range(2)]}
               for s in range(60) if len(key.sets.sets[s].members) == 2]  # fmt: skip
    (probe / "exposure.jsonl").write_text(jsonl(exposure))
    (probe / "reading.jsonl").write_text(jsonl(reading))


def test_a_suspect_that_reproduces_served_answers_is_named_with_proofs_anyone_can_check(served):
    folder, name, answers = served
    _scored_by_logprobs(_probe_folder(folder, "student", answers), folder, name)
    result = cli(folder, "report", "--probe", "student", "--out", "student-report", "--wrong-keys", "100")
    assert result.returncode == 0, result.stderr
    doc = json.loads((folder / "student-report" / "report.json").read_text())
    assert doc["watermark"]["best"]["p_value"] < 1e-6 and doc["claims"][0]["level"] == "strong"
    assert doc["watermark"]["commitments"]["watermark-key@0"] is not None
    wrong = doc["watermark"]["wrong_keys"]["p_values"]
    # the wrong keys are drawn afresh each run: a bound the null exceeds once in 100,000 runs (binomial, 100 at 0.05)
    assert len(wrong) == 100 and sum(p <= 0.05 for p in wrong) <= 16
    attributions = doc["canaries"]["attributions"]
    # a bystander may share one canary with the served ones by chance (its p-value is then far from strong)
    strong = [a for a in attributions if a["p_value"] < 1e-4]
    assert [a["identity"] for a in strong] == [name] == [attributions[0]["identity"]]
    assert attributions[0]["p_value"] < 1e-6
    assert doc["canaries"]["identities_tested"] == 6
    proofs = json.loads((folder / "student-report" / "proofs.json").read_text())
    entries = {s["entry"] for a in [attributions[0], *doc["exposure"]["identities"]] for s in a["served"]}
    committed = doc["watermark"]["commitments"]["watermark-key@0"]  # the claim cites it: its proof is here too
    entries |= {c["index"] for c in doc["watermark"]["commitments"].values() if c is not None}
    assert committed["proof"] in proofs and committed["proof"]["leaf_index"] == committed["index"]
    assert len(proofs) == len(entries) and len(attributions[0]["served"]) >= len(attributions[0]["canaries"])
    assert all(s["identity"] == name for s in attributions[0]["served"])
    keys = [NoteKey.parse(k) for k in doc["public_keys"]]
    for proof in proofs:
        verify_inclusion_proof(proof, keys)
        committed_at = {c["index"] for c in doc["watermark"]["commitments"].values() if c is not None}
        assert proof["leaf_index"] in committed_at or json.loads(base64.b64decode(proof["leaf"]))["identity"] == name
    verify = [
        sys.executable,
        "verify.py",
        "--proofs",
        "proofs.json",
        *sum((["--log-key", k] for k in doc["public_keys"]), []),
    ]
    checked = subprocess.run(verify, cwd=folder / "student-report", capture_output=True, text=True, env={})
    assert checked.returncode == 0 and f"{len(proofs)} inclusion proofs verified" in checked.stdout
    (folder / "student-report" / "one.json").write_text(json.dumps(proofs[0]))  # as `log prove` prints one
    one = subprocess.run([*verify[:3], "one.json", *verify[4:]], cwd=folder / "student-report", capture_output=True,
                         text=True, env={})  # fmt: skip
    assert one.returncode == 0 and "1 inclusion proofs verified" in one.stdout, one.stderr
    tampered = [{**proofs[0], "leaf_index": proofs[0]["leaf_index"] + 1}]
    (folder / "student-report" / "tampered.json").write_text(json.dumps(tampered))
    verify[3] = "tampered.json"
    assert subprocess.run(verify, cwd=folder / "student-report", capture_output=True, env={}).returncode == 1
    html = (folder / "student-report" / "report.html").read_text()
    assert not re.findall(r'(?:src|href)="(?!#)', html) and "<svg" in html  # self-contained: nothing fetched
    assert Keys.load(folder / ".canarygate" / "keys").watermark.hex() not in html + json.dumps(doc)
    exposed = doc["exposure"]["identities"]
    assert [(e["identity"], e["exposed"], e["scored"], e["shown"]) for e in exposed] == [(name, 3, 3, 3)]
    assert exposed[0]["p_value"] < 1e-8 and exposed[0]["served_p_value"] < 1e-8  # Holm, Bonferroni over two
    assert doc["reading"]["best"]["p_value"] < 1e-6 and doc["reading"]["best"]["hits"] == doc["reading"]["best"]["n"]
    assert {c["about"] for c in doc["claims"] if c["level"] == "strong"} == {"watermark", "canaries", "exposure",
                                                                             "reading mode"}  # fmt: skip
    assert "canaries in the top 0.1%" in html and "Reading mode" in html
    # an account scored and found at chance is counted, never named: the report goes to third parties
    assert "bystander" not in html + json.dumps(doc) and "1 other identities scored" in html
    assert isinstance(doc["canaries"]["chance_matches"], int)


def test_a_suspect_that_never_saw_marked_answers_is_not_named(served):
    folder, _, _ = served
    _probe_folder(folder, "control", [row["output"] for row in SAMPLE])
    result = cli(folder, "report", "--probe", "control", "--out", "control-report", "--wrong-keys", "100")
    assert result.returncode == 0, result.stderr
    doc = json.loads((folder / "control-report" / "report.json").read_text())
    assert doc["watermark"]["best"]["p_value"] > 0.01 and doc["claims"][0]["level"] == "none"
    assert (
        doc["canaries"]["attributions"] == []
        and json.loads((folder / "control-report" / "proofs.json").read_text()) == []
    )
    assert "[none] The watermark test finds nothing" in result.stdout
    # a third party checking its empty proofs is told that nothing was checked, not "OK"
    doc_keys = sum((["--log-key", k] for k in doc["public_keys"]), [])
    checked = subprocess.run([sys.executable, "verify.py", "--proofs", "proofs.json", *doc_keys],
                             cwd=folder / "control-report", capture_output=True, text=True, env={})  # fmt: skip
    assert checked.returncode != 0 and "no inclusion proofs to verify" in checked.stdout + checked.stderr
    assert "OK" not in checked.stdout


def test_the_report_renders_in_a_real_browser(served, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CANARYGATE_CI"):
            pytest.fail("chromium is missing; CI must install it")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    folder, name, answers = served
    _probe_folder(folder, "rendered", answers)
    assert cli(folder, "report", "--probe", "rendered", "--out", "rendered-report").returncode == 0
    shot = tmp_path / "report.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2000",
               f"--screenshot={shot}", (folder / "rendered-report" / "report.html").as_uri()]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    from matplotlib import image

    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # text, tables and plots, not a blank or an error page
    assert (pixels[..., 0] > 0.6).mean() < 0.999 and (
        (pixels[..., 0] > 0.55) & (pixels[..., 1] < 0.2)
    ).any()  # red: the plots


def test_the_amount_curve_is_the_whole_tests_p_value_at_each_amount():
    """The report's p-value against text: each point is the finding the report would give on that much text
    (every epoch, Holm-adjusted), not the best key's raw p-value, which could cross a line the finding does not."""
    from gateway.forensics.report import _by_amount
    from gateway.watermark import default_sets
    from gateway.watermark.detect import detect
    from gateway.watermark.mark import LexicalWatermark
    from gateway.watermark.scheme import LexicalKey

    sets = default_sets()
    epochs = [LexicalKey(bytes([epoch + 1]) * 32, sets, epoch) for epoch in range(3)]
    mark = LexicalWatermark(epochs[1])
    items = [(mark.mark(row["output"], row["instruction"]), row["instruction"]) for row in SAMPLE[:12]]
    best = min(detect(items, epochs, sets), key=lambda finding: finding.p_value)
    curve = _by_amount(items, epochs, sets)
    assert curve[-1]["p_value"] == best.p_value == 3 * best.raw_p_value  # three epochs tested
    assert [point["texts"] for point in curve] == sorted(point["texts"] for point in curve)


def test_canaries_the_log_never_served_implicate_no_account():
    """The suspect writes canaries drawn for an account that was never sent them: the canary key leaked, not
    the account's answers. Entries not yet under a checkpoint are not said to carry proofs."""
    from gateway.forensics.claims import _canaries

    attribution = {"identity": "carol", "epoch": 0, "canaries": ["cn_1", "cn_2", "cn_3"], "p_value": 1e-12,
                   "served_before_probe": [], "served_p_value": 1.0}  # fmt: skip
    found = {"phrases_found": 3, "identities_tested": 4, "chance_matches": 0}
    never = _canaries({**found, "attributions": [{**attribution, "served": []}]})[0]
    assert never["level"] == "suggestive" and "no record of serving them" in never["text"]
    assert "served only" not in never["text"] and never["alternatives"] == ["canary key leaked"]
    entries = [{"canary": c, "proof": {"leaf": "x"} if c != "cn_3" else None} for c in attribution["canaries"]]
    pending = _canaries({**found, "attributions": [{**attribution, "served": entries, "served_p_value": 1e-12,
                                                    "served_before_probe": attribution["canaries"]}]})[0]  # fmt: skip
    assert (
        pending["level"] == "strong"
        and "3 log entries below show when, 2 of them with an inclusion proof" in (pending["text"])
    )


def test_only_canaries_served_before_the_probe_began_make_an_account_strongly_implicated(tmp_path):
    """A canary never served to the identity (the reviewer's second phrase) or served once the probe had begun
    (the third) proves nothing about its answers: the claim is graded on the one served before, alone."""
    from gateway.canary.detect import Attribution
    from gateway.forensics.claims import _canaries
    from gateway.forensics.report import _proved

    owners = {("bob", 0): [None] * 8, ("alice", 0): [None] * 8}
    found = Attribution("bob", 0, ("cn_a", "cn_b", "cn_c"), 2e-8, 1e-8)
    served = [{"canary": "cn_a", "time": "2026-11-29T13:00:00Z", "proof": {"leaf": "x"}},
              {"canary": "cn_c", "time": "2026-11-29T13:31:54Z", "proof": {"leaf": "y"}}]  # fmt: skip
    row = _proved(found, served, "2026-11-29T13:30:42Z", owners, 3)
    assert row["served_before_probe"] == ["cn_a"] and 1e-4 < row["served_p_value"] < 0.01
    claim = _canaries({"phrases_found": 3, "identities_tested": 2, "chance_matches": 0, "attributions": [row]})[0]
    assert (
        claim["level"] == "suggestive" and "1 of them served to this identity before the probe began" in claim["text"]
    )
    assert "1 of them were never served to it" in claim["text"] and "canary key leaked" in claim["alternatives"]
    late = _proved(found, served[1:], "2026-11-29T13:30:42Z", owners, 3)
    assert (
        late["served_before_probe"] == []
        and "only once the probe had begun"
        in _canaries({"phrases_found": 3, "identities_tested": 2, "chance_matches": 0, "attributions": [late]})[0][
            "text"
        ]
    )
    unknown = _proved(found, served, None, owners, 3)  # when the probe began is not on record: nothing shown
    assert unknown["served_before_probe"] == [] and unknown["served_p_value"] == 1.0


def test_a_key_committed_after_the_probe_began_makes_no_strong_watermark_claim():
    from gateway.forensics.claims import claims

    mark = {"best": {"p_value": 1e-12, "hits": 60, "n": 60, "epoch": 0},
            "commitments": {"watermark-key@0": {"time": "2026-11-29T01:41:09Z", "log": "l", "index": 3}}}  # fmt: skip
    doc = {"watermark": mark, "canaries": {"attributions": [], "identities_tested": 0, "chance_matches": 0},
           "exposure": {"identities": []}}  # fmt: skip
    before = claims({**doc, "suspect": {"started": "2026-11-30T00:00:00Z"}})[0]
    after = claims({**doc, "suspect": {"started": "2000-01-01T00:00:00Z"}})[0]
    assert before["level"] == "strong" and after["level"] == "suggestive"
    assert "after the probe began (2000-01-01T00:00:00Z)" in after["text"]
    fraction = {**mark, "commitments": {"watermark-key@0": {"time": "2026-11-29T01:41:09.900000Z", "log": "l",
                                                             "index": 3}}}  # fmt: skip
    same_second = claims({**doc, "watermark": fraction, "suspect": {"started": "2026-11-29T01:41:09Z"}})[0]
    assert same_second["level"] == "suggestive"  # the probe's start has no fraction: the same second is late
    unknown = claims({**doc, "suspect": {}})[0]  # no start on record: nothing shows the key came first
    assert unknown["level"] == "suggestive"


def test_no_commitment_or_a_late_one_makes_no_strong_claim_in_either_mode():
    """The p-value holds only for a key fixed before the suspect's text: without a commitment that shows it, a
    finding of either mode (writing or reading) is suggestive at most."""
    from gateway.forensics.claims import claims

    best = {"p_value": 1e-12, "hits": 60, "n": 60, "epoch": 0}
    committed = {"watermark-key@0": {"time": "2026-11-29T01:41:09Z", "log": "l", "index": 3}}
    doc = {"canaries": {"attributions": [], "identities_tested": 0, "chance_matches": 0},
           "exposure": {"identities": []}, "reading": {"best": best, "passages": 80}}  # fmt: skip
    for commitments, started, level in (
        ({"watermark-key@0": None}, "2026-11-30T00:00:00Z", "suggestive"),
        (committed, "2000-01-01T00:00:00Z", "suggestive"),
        (committed, "2026-11-30T00:00:00Z", "strong"),
    ):
        found = claims(
            {**doc, "watermark": {"best": best, "commitments": commitments}, "suspect": {"started": started}}
        )
        (writing,) = [c for c in found if c["about"] == "watermark"]
        (reading,) = [c for c in found if c["about"] == "reading mode"]
        assert writing["level"] == reading["level"] == level, (commitments, started)
        if level != "strong":
            assert "learned from text marked by this gateway" not in writing["text"]
            assert "only text marked by this gateway teaches" not in reading["text"]


def test_an_exposure_the_log_does_not_show_served_names_no_account_as_proven():
    """Exposure rows whose canaries the log does not show served to the identity before the probe began (here:
    no such log at all) were worded as strong, with no proof in the report."""
    from gateway.forensics.claims import _exposure as worded
    from gateway.forensics.report import _exposure

    rows = [{"canary": f"cn_{i}", "identity": "alice", "epoch": 0, "log": "elsewhere", "entry": i,
             "candidates": 10_000, "rank": 1, "p_value": 1 / 10_001, "exposure": 13.3} for i in range(6)]  # fmt: skip
    found = _exposure(rows, [], "2026-11-29T13:30:42Z")
    assert found["identities"][0]["p_value"] < 1e-6 and found["identities"][0]["served_p_value"] == 1.0
    claim = worded(found)[0]
    assert claim["level"] == "suggestive" and "does not show" in claim["text"]
    assert found["identities"][0]["served"] == []


def test_the_earliest_servings_of_a_canary_are_read_across_every_workers_log():
    """One worker's log served a canary three times after the probe began, another's before it: taking the first
    log's entries up to the quota hid the one that counts, and the claim said it was served only too late."""
    from types import SimpleNamespace

    from gateway.forensics.report import _served_entries

    class Log:
        def __init__(self, origin: str, times: list[str]) -> None:
            self.name, self.times = origin, times

        def origin(self) -> str:
            return self.name

        def entries(self, strict: bool = True):
            for i, at in enumerate(self.times):
                yield SimpleNamespace(index=i, public={"time": at, "identity": "bob", "canaries": [{"id": "cn_a"}]})

        def prove(self, index: int) -> dict:
            return {"leaf_index": index}

    late = Log("log0", [f"2026-11-29T14:00:0{k}Z" for k in range(3)])
    early = Log("log1", ["2026-11-20T09:00:00Z"])
    served = _served_entries([late, early], {"cn_a"}, 3)["cn_a"]
    assert [(s["log"], s["time"]) for s in served][0] == ("log1", "2026-11-20T09:00:00Z") and len(served) == 3
