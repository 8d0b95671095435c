"""Detection: exact p-values, the marked found, the unmarked and wrong keys not, the CLI's output."""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path

import pytest
from scipy import stats

from gateway.evidence.keys import Keys, init_keys, rotate
from gateway.stats import holm
from gateway.watermark import epoch_keys
from gateway.watermark.detect import detect
from gateway.watermark.mark import LexicalWatermark
from gateway.watermark.scheme import VETTING_ALPHA, LexicalKey, epoch_key, reference_texts
from gateway.watermark.scoring import fixed_scheme_p, poisson_binomial_sf, vote_counts
from gateway.watermark.wordsets import default_sets
from tests.test_cli import Running, cli

SETS = default_sets()
SAMPLE = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "alpaca_eval_sample.jsonl").open()]


def test_poisson_binomial_tail_is_the_binomial_for_equal_probabilities():
    for n, p in ((20, 0.5), (37, 1 / 3), (12, 0.25)):
        for k in range(n + 1):
            assert math.isclose(poisson_binomial_sf(k, [p] * n), stats.binom.sf(k - 1, n, p), rel_tol=1e-9)


def test_poisson_binomial_tail_matches_enumeration_for_mixed_probabilities():
    probabilities = [0.5, 1 / 3, 0.25, 0.5, 1 / 3, 0.5, 0.25]
    for k in range(len(probabilities) + 1):
        exact = sum(
            math.prod(p if hit else 1 - p for p, hit in zip(probabilities, outcome, strict=True))
            for outcome in itertools.product((0, 1), repeat=len(probabilities))
            if sum(outcome) >= k
        )
        assert math.isclose(poisson_binomial_sf(k, probabilities), exact, rel_tol=1e-12)


def test_holm_adjusts_in_step_down_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.01], untested=7) == pytest.approx([0.08])  # a family of 8, one tested
    assert holm([0.04, 0.01], untested=1) == pytest.approx([0.08, 0.03])


def test_marked_answers_are_found_and_unmarked_ones_are_not():
    key = LexicalKey(b"k" * 32, SETS)
    mark = LexicalWatermark(key)
    marked = [(mark.mark(r["output"], r["instruction"]), r["instruction"]) for r in SAMPLE]
    plain = [(r["output"], r["instruction"]) for r in SAMPLE]
    found = detect(marked, [key], SETS)[0]
    assert found.p_value < 1e-12 and found.hits == found.n
    assert detect(plain, [key], SETS)[0].p_value > 0.01
    assert detect(marked, [LexicalKey(b"other" * 7, SETS)], SETS)[0].p_value > 0.01  # a wrong key finds nothing


def test_each_set_votes_once_however_often_it_recurs():
    text = "It is large and calm, and it is large and cold, and it is large and wet, here."
    counts = vote_counts([(text, "")], SETS)
    key = LexicalKey(b"k" * 32, SETS)
    _, votes, _, sites = fixed_scheme_p(counts, key)
    assert (votes, sites) == (2, 6)  # "it is" and "large": two votes from six sites


def test_text_copied_from_a_marked_prompt_casts_no_votes():
    """A suspect that only repeats marked text from its prompt learned nothing from it: reordered, every
    sentence's first words had a context the prompt lacks, and the copy of 40 answers scored 30 hits of 30."""
    key = LexicalKey(b"k" * 32, SETS)
    mark = LexicalWatermark(key)
    items = []
    for r in SAMPLE[:40]:
        marked = mark.mark(r["output"])
        sentences = [s for s in marked.replace("\n", " ").split(". ") if s]
        items.append((". ".join(sentences[::-1]), "Repeat these sentences in any order: " + marked))
        items.append((marked, marked))  # verbatim: the first two words were scored
    assert vote_counts(items, SETS) == {}
    assert detect(items, [key], SETS)[0].n == 0


def test_text_copied_from_a_prompt_in_another_typography_casts_no_votes():
    """The prompt held the marked text with no-break or double spaces, soft hyphens inside words, another
    apostrophe, or wrapped lines: the plain copy scored up to 80 hits of 80 (p = 3e-26)."""
    key = LexicalKey(b"k" * 32, SETS)
    mark = LexicalWatermark(key)
    marked = [mark.mark(r["output"]) for r in SAMPLE[:40]]
    retyped = {
        "no-break spaces": lambda t: t.replace(" ", "\u00a0"),
        "double spaces": lambda t: t.replace(" ", "  "),
        "soft hyphens": lambda t: " ".join(w[:2] + "\u00ad" + w[2:] if len(w) > 3 else w for w in t.split(" ")),
        "another apostrophe": lambda t: t.replace("'", "\u02bc").replace("\u2019", "\u02bc"),
        "wrapped": lambda t: "\n".join(textwrap.wrap(t, 60)),
    }
    for name, retype in retyped.items():
        items = [(text, "Repeat this exactly:\n\n" + retype(text)) for text in marked]
        assert vote_counts(items, SETS) == {}, name


def test_a_set_the_prompt_never_uses_is_still_scored_beside_one_it_does():
    text = "It is large and calm, here."
    it_is, large = SETS.lookup[("it", "is")][0], SETS.lookup[("large",)][0]
    assert vote_counts([(text, "")], SETS).keys() == {it_is, large}
    assert vote_counts([(text, "Is it big? Say so.")], SETS).keys() == {it_is}  # "big" is of the set of "large"


def test_epoch_keys_are_vetted_and_differ_by_epoch(tmp_path):
    init_keys(tmp_path, "test/origin")
    rotate(tmp_path)
    keys = epoch_keys(Keys.load(tmp_path))
    assert [k.epoch for k in keys] == [0, 1] and keys[0].preferred != keys[1].preferred
    counts = vote_counts([(t, "") for t in reference_texts()], SETS)
    assert all(fixed_scheme_p(counts, k)[0] >= VETTING_ALPHA for k in keys)
    assert epoch_key(Keys.load(tmp_path).watermark, 1, SETS).fingerprint == keys[1].fingerprint  # reproducible


def test_detect_command_reports_exact_p_values_per_file_and_per_text(tmp_path):
    assert cli(tmp_path, "init").returncode == 0
    keys = epoch_keys(Keys.load(tmp_path / ".canarygate" / "keys"))
    mark = LexicalWatermark(keys[-1])
    rows = [{"text": mark.mark(r["output"], r["instruction"]), "prompt": r["instruction"]} for r in SAMPLE[:12]]
    rows[0]["text"] += "\u2028It is large."  # JSON allows it raw in a string: no line ends there
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (tmp_path / "suspect.jsonl").write_text("\n".join(lines[:6] + [""] + lines[6:]) + "\n")  # a blank line
    result = cli(tmp_path, "detect", "suspect.jsonl", "--json", "--per-text")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    scheme = doc["schemes"]["lexical-v1"]
    assert scheme["p_value"] < 1e-6 and scheme["n"] == scheme["hits"] > 20
    assert [t["line"] for t in doc["per_text"]] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]  # the file's lines
    per_text = [t["schemes"]["lexical-v1"] for t in doc["per_text"]]  # one family: every line is a test
    assert [t["p_value"] for t in per_text] == pytest.approx(holm([t["raw_p_value"] for t in per_text]))
    assert any(t["p_value"] > t["raw_p_value"] for t in per_text)
    assert all("lexical-v1" in t["schemes"] for t in doc["per_text"])
    readable = cli(tmp_path, "detect", "suspect.jsonl")
    assert "lexical-v1: p = " in readable.stdout
    per_line = cli(tmp_path, "detect", "suspect.jsonl", "--per-text").stdout
    assert "per text, Holm-corrected over every line, scheme and key epoch" in per_line
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "suspect.jsonl").read_bytes())
    with_bom = json.loads(cli(tmp_path, "detect", "bom.jsonl", "--json").stdout)  # as Windows tools write it
    assert with_bom["schemes"]["lexical-v1"] == scheme
    shapes = (b'{"text": null}\n', b'{"text": "a", "prompt": ["a list"]}\n', b'{"text": "", "prompt": 0}', b"[1]")
    not_json = (b"not json\n", b"[" * 100_000, b'{"text": "a", "n": ' + b"9" * 5000 + b"}")  # 5,000 digits: refused
    for bad_lines, said in [
        *((b, "expected a JSON object") for b in shapes),
        *((b, "not valid JSON") for b in not_json),
    ]:
        (tmp_path / "bad.jsonl").write_bytes(b"\n" + bad_lines)
        bad = cli(tmp_path, "detect", "bad.jsonl")
        assert bad.returncode == 2 and f"bad.jsonl:2: {said}" in bad.stderr, bad.stderr
    (tmp_path / "empty.jsonl").write_bytes(b"\n \n")
    empty = cli(tmp_path, "detect", "empty.jsonl")
    assert empty.returncode == 2 and "empty.jsonl: no texts to test" in empty.stderr, empty.stderr
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\n")
    bad = cli(tmp_path, "detect", "bad.jsonl")
    assert bad.returncode == 2 and "not UTF-8 (byte 0)" in bad.stderr and "Traceback" not in bad.stderr


def test_detection_says_whether_its_key_was_committed_before_use(tmp_path):
    assert cli(tmp_path, "init").returncode == 0
    (tmp_path / "suspect.jsonl").write_text(json.dumps({"text": SAMPLE[0]["output"]}) + "\n")
    before = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--json").stdout)["commitments"]
    assert before == {"watermark-key@0": None, "word-sets": None, "detector": None}
    assert "watermark-key@0: NO PRIOR COMMITMENT" in cli(tmp_path, "detect", "suspect.jsonl").stdout

    with Running(tmp_path, "serve", "--upstream", "demo"):
        pass  # a gateway commits to its key, word sets and detector at start, before serving
    after = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--json").stdout)["commitments"]
    assert all(found is not None and found["index"] < 3 for found in after.values()), after
    assert after["watermark-key@0"]["checkpointed"]

    rotate(tmp_path / ".canarygate" / "keys")  # a new epoch, never used by a gateway: not committed
    rotated = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--json").stdout)["commitments"]
    assert rotated["watermark-key@1"] is None and rotated["watermark-key@0"] is not None
