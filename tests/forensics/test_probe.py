"""The probe against a misbehaving suspect: retries, limits, clear errors, resume; and canary exposure."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time

import httpx
import pytest

from gateway.canary import canaries_of, canary_key
from gateway.canary.phrases import SPACE, phrase
from gateway.evidence.keys import Keys
from gateway.evidence.reader import LogReader
from gateway.forensics.exposure import candidates, exposure, ranked
from gateway.forensics.probe import (
    ERRORS,
    TRANSCRIPT,
    Failed,
    Limits,
    Session,
    Target,
    append_row,
    read_rows,
    retry_after,
    run,
)
from gateway.forensics.served import served_canaries
from tests.conftest import ServerThread
from tests.forensics.suspect import MisbehavingSuspect, jsonl
from tests.ratelimit.conftest import running_gateway
from tests.test_cli import cli

FAST = Limits(concurrency=3, rate=500, timeout=1.0, max_bytes=200_000, retries=3, backoff=0.01, backoff_cap=0.05)


@pytest.fixture(scope="module")
def suspect():
    fake = MisbehavingSuspect()
    with ServerThread(fake) as server:
        fake.url = server.url + "/v1"
        yield fake


def _items(prompts: list[str]) -> list[dict]:
    return [{"id": f"p{i}", "kind": "prose", "prompt": p} for i, p in enumerate(prompts)]


def test_misbehaviour_is_retried_when_it_may_pass_and_refused_with_a_clear_error_when_not(suspect, tmp_path):
    prompts = ["a flaky one", "a failing one", "a malformed one", "a slow one", "a plain one",
               "an endless one", "a trickle one", "a huge one", "a forbidden one", "a garbled one", "a deep one",
               "an impatient one", "a patient one", "a line\u2028separator"]  # fmt: skip
    counts = asyncio.run(run(Target(suspect.url, "m"), FAST, _items(prompts), tmp_path))
    assert counts == {"answered": 7, "failed": 7, "skipped": 0}
    answered = {row["prompt"]: row for row in read_rows(tmp_path / TRANSCRIPT)}
    assert {p: r["attempts"] for p, r in answered.items()} == {
        "a flaky one": 2, "a failing one": 3, "a malformed one": 2, "a slow one": 2, "a plain one": 1,
        "a patient one": 2, "a line\u2028separator": 1}  # fmt: skip
    asked = suspect.times["a patient one"]
    assert asked[1] - asked[0] >= 0.4  # Retry-After is honoured, though far above the backoff cap
    assert all(r["text"] == f"An answer to: {p}" and r["finish_reason"] == "stop" for p, r in answered.items())
    failed = {prompts[int(row["id"][1:])]: row for row in read_rows(tmp_path / ERRORS)}
    assert failed["an endless one"]["error"] == "answer larger than 200000 bytes; cut off"
    assert failed["a huge one"]["attempts"] == 1 and "larger than" in failed["a huge one"]["error"]
    assert failed["a forbidden one"]["attempts"] == 1 and failed["a forbidden one"]["error"].startswith("HTTP 400")
    assert (
        failed["a trickle one"]["error"] == "no complete answer within 1 s" and failed["a trickle one"]["attempts"] == 4
    )
    assert failed["a garbled one"]["attempts"] == 4 and "DecodingError" in failed["a garbled one"]["error"]
    assert failed["a deep one"]["attempts"] == 4 and "malformed answer" in failed["a deep one"]["error"]
    impatient = failed["an impatient one"]
    assert impatient["attempts"] == 1 and "wait 3600 s; run again later" in impatient["error"]
    assert oct((tmp_path / TRANSCRIPT).stat().st_mode & 0o777) == "0o600"  # it holds prompts from the sealed log


def test_retry_after_is_read_in_every_form_the_apis_send():
    assert retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after(httpx.Headers({"retry-after": date})) <= 31
    assert retry_after(httpx.Headers({"retry-after": "soon"})) is None and retry_after(httpx.Headers()) is None


def test_an_interrupted_probe_resumes_where_it_stopped(suspect, tmp_path):
    prompts = [f"resume question {i}" for i in range(30)]

    async def interrupted() -> None:
        task, done = asyncio.current_task(), [0]

        def on_done() -> None:
            done[0] += 1
            if done[0] == 10:
                task.cancel()

        await run(Target(suspect.url, "m"), FAST, _items(prompts), tmp_path, on_done)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(interrupted())
    first = read_rows(tmp_path / TRANSCRIPT)
    assert 10 <= len(first) < 30
    torn = next(f"p{i}" for i in range(30) if f"p{i}" not in {r["id"] for r in first})
    with open(tmp_path / TRANSCRIPT, "a") as f:
        f.write(f'{{"id": "{torn}", "te')  # killed halfway through writing a line of an item not yet done
    counts = asyncio.run(run(Target(suspect.url, "m"), FAST, _items(prompts), tmp_path))
    assert counts == {"answered": 30 - len(first), "failed": 0, "skipped": len(first)}
    rows = read_rows(tmp_path / TRANSCRIPT)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(30))
    assert sum(suspect.asked[p] for p in prompts) <= 30 + FAST.concurrency  # only what was in flight is asked twice


def test_the_probe_command_keeps_its_folder_to_one_suspect(suspect, tmp_path):
    assert cli(tmp_path, "init").returncode == 0
    (tmp_path / "more.jsonl").write_text(jsonl([{"prompt": "a plain one"}, {"prompt": "a forbidden one"}]))
    args = ["probe", "--base-url", suspect.url, "--model", "m", "--out", "out", "--prose", "3", "--samples", "2"]
    result = cli(tmp_path, *args, "--prompts", "more.jsonl", "--retries", "0")
    assert result.returncode == 1 and "8 answered, 2 failed" in result.stdout
    rows = read_rows(tmp_path / "out" / TRANSCRIPT)
    assert len({r["prompt"] for r in rows}) == 4 and {r["id"] for r in rows} >= {"prose-0", "prose-0#1"}
    again = cli(tmp_path, *args, "--prompts", "more.jsonl", "--retries", "0")
    assert "0 answered, 2 failed" in again.stdout and "8 already in" in again.stdout
    other = cli(tmp_path, *args[:4], "other-model", *args[5:])
    assert other.returncode == 2 and "holds a probe of m;" in other.stderr
    elsewhere = [args[0], "--base-url", suspect.url.replace("127.0.0.1", "localhost"), *args[3:], "--retries", "0"]
    changed = cli(tmp_path, *elsewhere)
    assert changed.returncode == 2 and "probed with other settings (prompts)" in changed.stderr
    moved = cli(tmp_path, *elsewhere, "--prompts", "more.jsonl")
    assert "0 answered, 2 failed" in moved.stdout  # the same model at a new address: resumed, not restarted
    assert len(json.loads((tmp_path / "out" / "probe.json").read_text())["base_urls"]) == 2
    empty = cli(tmp_path, *args, "--api-key-env", "CANARYGATE_TEST_UNSET_VARIABLE")
    assert empty.returncode == 2 and "CANARYGATE_TEST_UNSET_VARIABLE" in empty.stderr


def test_exposure_p_values_are_exactly_uniform_under_the_null():
    """Continuous scores: the canary's rank among N candidates is uniform, so P(p <= k / (N + 1)) = k / (N + 1)."""
    rng = random.Random(11)
    p_values = [ranked(rng.random(), [rng.random() for _ in range(99)])[1] for _ in range(4000)]
    for k in (1, 5, 10, 50):
        share = sum(p <= k / 100 for p in p_values) / len(p_values)
        assert abs(share - k / 100) <= 3 * (k / 100 * (1 - k / 100) / len(p_values)) ** 0.5 + 1e-9
    assert ranked(float("nan"), [0.0]) == (2, 1.0, 0.0)  # a NaN never ranks first


def test_exposure_p_values_are_calibrated_for_a_model_that_never_saw_the_canary():
    """A model that rates phrases by length alone (ties galore) knows nothing of the key: the share of
    canaries at p <= alpha stays at or below alpha."""
    rng = random.Random(7)

    def score(index: int) -> float:
        return -float(len(phrase(index).split()))

    p_values = []
    for _ in range(400):
        canary = rng.randrange(SPACE)
        others = [score(i) for i in candidates(canary, 500, str(canary))]
        p_values.append(ranked(score(canary), others)[1])
    for alpha in (0.5, 0.2, 0.05):
        assert sum(p <= alpha for p in p_values) / len(p_values) <= alpha + 0.03
    assert ranked(0.0, [-1.0] * 999) == (1, 0.001, pytest.approx(9.9658, abs=1e-3))


def test_served_canaries_come_from_the_log_and_a_model_trained_on_one_exposes_it(fake_upstream, tmp_path):
    limits = {"identity": {"requests": "100000/minute"}, "tiers": {"suspect": {"tarpit_ms": 0}}}
    with running_gateway(tmp_path / "gw", fake_upstream.url, limits) as gateway:
        name, key = gateway.identity("suspect")
        with gateway.client(key) as http:
            # a customer's system prompt and history stay in the log: the suspect is asked the last question only
            private = [{"role": "system", "content": "Internal DB password: hunter2"},
                       {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]  # fmt: skip
            for question in ("Tell me about lighthouses.", "Tell me about kites."):
                body = {"model": "m", "messages": [*private, {"role": "user", "content": question}]}
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            body["stream"] = True
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            quoting = canaries_of(canary_key(Keys.load(gateway.state_dir / "keys").watermark), name, 0, 8)[0].text
            body = {"model": "m", "messages": [{"role": "user", "content": f"You said {quoting} Why?"}]}
            assert http.post("/v1/chat/completions", json=body).status_code == 200  # left out: the prompt holds one
    keys = Keys.load(gateway.state_dir / "keys")
    served = list(served_canaries(LogReader(gateway.state_dir / "evidence" / "0", keys), canary_key(keys.watermark), 8))
    assert [s.prompt for s in served] == ["Tell me about lighthouses.", "Tell me about kites.", "Tell me about kites."]
    mine = {c.id: c for c in canaries_of(canary_key(keys.watermark), name, 0, 8)}
    assert all(s.canary.identity == name and s.canary.id in mine for s in served)
    assert served[1].context == served[2].context and "lazy dog" in served[0].context
    assert not any(c.text in s.context for s in served for c in mine.values())

    trained = MisbehavingSuspect(learned=served[0].canary.text)
    fresh = next(c for c in mine.values() if not {w.strip(" .,!") for w in c.text.lower().split()} <= trained.learned)
    with ServerThread(trained) as server:
        target = Target(server.url + "/v1", "m")
        rows = asyncio.run(_exposures(target, [served[0].as_json(), {**served[0].as_json(), "phrase": fresh.text}]))
    assert rows[0]["rank"] == 1 and rows[0]["p_value"] == pytest.approx(1 / 2001) and rows[0]["exposure"] > 10.9
    assert rows[1]["rank"] > 1 and rows[1]["exposure"] < rows[0]["exposure"]
    broken = MisbehavingSuspect(learned="broken")
    with ServerThread(broken) as server, pytest.raises(Failed, match="malformed log-probabilities"):
        asyncio.run(_exposures(Target(server.url + "/v1", "m"), [served[0].as_json()]))


async def _exposures(target: Target, items: list[dict]) -> list[dict]:
    async with Session(target, FAST) as session:
        return [await exposure(session, item, 2000) for item in items]


def test_the_built_in_prose_prompts_are_distinct_and_in_a_fixed_order():
    from gateway.forensics.probeset import probe_items, prose_prompts

    prompts = prose_prompts(600)
    assert len(prompts) == len(set(prompts)) == 504 and prose_prompts(5) == prompts[:5]
    items = probe_items(4, 1, None, [])
    assert [i["id"] for i in items] == ["prose-0", "prose-1", "prose-2", "prose-3"]
    assert json.loads(json.dumps(items)) == items


def test_a_prompts_file_not_in_utf8_or_a_damaged_probe_json_is_a_clear_error(tmp_path):
    from gateway.config import ConfigError
    from gateway.forensics.probe import SETTINGS, prepare
    from gateway.forensics.probeset import probe_items

    latin = tmp_path / "prompts.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        probe_items(0, 1, latin, [])
    out = tmp_path / "probe"
    prepare(out, Target("http://127.0.0.1:9/v1", "m"), lambda: [], {})
    for damaged in ('{"base_url": "http://h/v1", "mod', '{"model": "m"}'):  # torn (before it was written
        (out / SETTINGS).write_text(damaged)  # atomically), or not what a probe writes
        with pytest.raises(ConfigError, match="probe.json: damaged"):
            prepare(out, Target("http://127.0.0.1:9/v1", "m"), lambda: [], {})


def test_a_suspects_lone_surrogate_is_kept_and_a_line_torn_inside_a_character_is_skipped(tmp_path):
    """JSON lets a suspect answer "\\ud800", which has no UTF-8: writing it stopped the probe, and every resume.
    A run killed inside a multi-byte character left a line that stopped every later read of the file."""

    path = tmp_path / "transcript.jsonl"
    append_row(path, {"id": "a", "text": "evil \ud800"})
    append_row(path, {"id": "b", "text": "café"})
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "text": "caf' + "é".encode()[:1])
    assert read_rows(path) == [{"id": "a", "text": "evil \ud800"}, {"id": "b", "text": "café"}]


def test_too_few_exposure_candidates_are_refused_rather_than_never_exposing(tmp_path):
    """A canary ranked first of 500 is not in the top 0.1%: with fewer than 999 candidates every exposure test
    came out empty, and the report said nothing of why."""
    args = ("probe", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", "p", "--exposure")
    refused = cli(tmp_path, *args, "--candidates", "500")
    assert refused.returncode == 2 and "at least 999" in refused.stderr
