"""The sampling-bias mark: the green list, its exact detector, and the request side in a real gateway."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import httpx
import pytest
from scipy import stats

from gateway.app import create_app
from gateway.bias import SCHEME, Vocabulary, green_list, green_test
from gateway.bias.green import VocabularyError, counted_words
from gateway.config import SamplingBiasSettings
from gateway.evidence.reader import LogReader, commitments
from gateway.identity import Registry
from gateway.stats import hypergeometric_sf
from gateway.watermark.scheme import reference_texts
from tests.conftest import ServerThread, exchanges
from tests.ratelimit.conftest import limited_settings
from tests.test_hygiene import assert_openai_error
from tests.watermark.test_detect import SAMPLE

CHAT = "/v1/chat/completions"
ROOMY = {"identity": {"requests": "100000/minute"}}


def _vocabulary_file(folder: Path) -> Path:
    """A byte-level BPE vocabulary in the `tokenizers` JSON layout: the reference text's words as word-initial
    tokens (Ġword), plus pieces that are not words, so the pool must be picked out of it."""
    words = sorted({w for t in reference_texts() for w in t.lower().split() if w.isalpha() and len(w) >= 3})
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "ing", "Ġ", ".", "Ġ1", *[f"Ġ{w}" for w in words]])}
    path = folder / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    return path


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> Vocabulary:
    return Vocabulary.load(_vocabulary_file(tmp_path_factory.mktemp("vocab")))


def test_the_green_list_is_a_keyed_subset_of_the_word_tokens(vocabulary):
    green = green_list(b"k" * 32, 0, vocabulary, 300, 4.0)
    assert len(green.words) == 300 and green.words <= vocabulary.ids.keys() and green.pool == len(vocabulary.ids)
    assert {vocabulary.ids[w] for w in green.words} == {int(t) for t in green.bias}
    assert set(green.bias.values()) == {4.0}
    assert green_list(b"k" * 32, 0, vocabulary, 300, 4.0) == green  # a detector derives the same list
    assert len(green.words & green_list(b"k" * 32, 1, vocabulary, 300, 4.0).words) < 60  # epochs differ
    assert "ing" not in vocabulary.ids and "1" not in vocabulary.ids  # pieces and numbers are not words


def test_the_hypergeometric_tail_is_exact():
    for k, population, successes, draws in ((3, 1000, 300, 10), (20, 20000, 300, 150), (0, 50, 5, 5), (6, 50, 5, 5)):
        expected = stats.hypergeom.sf(k - 1, population, successes, draws)
        assert hypergeometric_sf(k, population, successes, draws) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_on_unmarked_text_the_p_values_are_calibrated_across_many_keys(vocabulary):
    """The null is over the key: on real unmarked answers, under 400 random keys, the share of p-values at
    or below alpha stays at or below alpha (within a 99% binomial bound)."""
    items = [(row["output"], row["instruction"]) for row in SAMPLE]
    rng = random.Random(5)
    p_values = [
        green_test(items[i % 24 : i % 24 + 3], green_list(rng.randbytes(32), 0, vocabulary, 300, 4.0), vocabulary)[0]
        for i in range(400)
    ]
    for alpha in (0.05, 0.01):
        assert sum(p <= alpha for p in p_values) <= stats.binom.ppf(0.995, 400, alpha)


def test_text_that_uses_the_green_words_is_detected_and_the_prompt_is_not_counted(vocabulary):
    green = green_list(b"k" * 32, 0, vocabulary, 300, 4.0)
    chosen = sorted(green.words)[:25]
    marked = "We talk about " + " and ".join(chosen) + " today."
    p, counted, hits = green_test([(marked, "")], green, vocabulary)
    assert hits >= 25 and counted == len(counted_words([(marked, "")], vocabulary.ids)) and p < 1e-15
    assert green_test([(marked, marked)], green, vocabulary)[1:] == (0, 0)  # every word was in the prompt
    # nor where the prompt holds it in another typography: words after a mark, soft hyphens, capitals
    for retyped in ("\n".join("-" + w for w in marked.split()), marked.replace("a", "a\u00ad"), marked.upper()):
        assert green_test([(marked, retyped)], green, vocabulary)[1:] == (0, 0)


def _gateway(fake_upstream, tmp_path, client_bias: str):
    settings = limited_settings(tmp_path / "state", fake_upstream.url, ROOMY)
    chosen = SamplingBiasSettings(enabled=True, tokenizer=str(_vocabulary_file(tmp_path)), client_bias=client_bias)
    settings = dataclasses.replace(settings, sampling_bias=chosen)
    key = Registry(settings.state_dir).add("caller")
    with ServerThread(create_app(settings)) as server:
        yield server.url, key, fake_upstream, settings.state_dir
    fake_upstream.reset()


@pytest.fixture
def biased(fake_upstream, tmp_path):
    yield from _gateway(fake_upstream, tmp_path, "refuse")


@pytest.fixture
def yielding(fake_upstream, tmp_path):
    """A gateway whose mark gives way to a client's own logit_bias."""
    yield from _gateway(fake_upstream, tmp_path, "yield")


def _post(url: str, key: str, path: str = CHAT, **body) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}], **body}
    headers = {"authorization": f"Bearer {key}"}
    if path == "/v1/messages":
        headers["anthropic-version"] = "2023-06-01"
        body.setdefault("max_tokens", 50)
    return httpx.post(url + path, json=body, headers=headers, timeout=10)


def test_the_gateway_asks_for_the_bias_where_the_api_takes_it(biased):
    url, key, upstream, _ = biased
    assert _post(url, key).status_code == 200
    sent = upstream.requests[-1].json()["logit_bias"]
    assert len(sent) == 300 and set(sent.values()) == {4.0}
    json_output = {"response_format": {"type": "json_object"}}
    for path, extra in (("/v1/messages", {}), (CHAT, {"model": "o3-mini"}), (CHAT, json_output)):
        assert _post(url, key, path, **extra).status_code == 200
        assert "logit_bias" not in upstream.requests[-1].json()


def test_a_clients_own_logit_bias_is_refused_where_the_mark_applies(biased):
    """With temperature 0, an answer with the mark and one with the client's entries in its place would differ
    first at a favoured token: a few hundred pairs gave the list away, to strip the mark or to forge it."""
    url, key, upstream, state = biased
    refused = ({"5": 1}, {"5": 0}, [[5, 1.0]], False)  # in any form: llama.cpp takes a list of pairs
    for theirs in refused:
        assert_openai_error(_post(url, key, logit_bias=theirs), 400)
    assert not upstream.requests and [r["error"] for r in exchanges(state)] == ["invalid_request"] * len(refused)
    for none in ([], {}):  # no bias of their own: marked
        assert _post(url, key, logit_bias=none).status_code == 200
        assert len(upstream.requests[-1].json()["logit_bias"]) == 300
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert _post(url, key, logit_bias={"5": 1}, tools=[tool]).status_code == 200  # no mark there: theirs goes
    assert upstream.requests[-1].json()["logit_bias"] == {"5": 1}


def test_with_yield_a_clients_own_entries_win_and_a_zero_keeps_its_token_unfavoured(yielding):
    url, key, upstream, _ = yielding
    assert _post(url, key).status_code == 200
    sent = upstream.requests[-1].json()["logit_bias"]
    outside = next(str(token) for token in range(1000) if str(token) not in sent)  # the list is keyed: random
    green = iter(sent)
    theirs = {outside: -100, next(green): 2, next(green): 0}  # theirs win, and the total stays at most 300
    assert _post(url, key, logit_bias=theirs).status_code == 200
    merged = upstream.requests[-1].json()["logit_bias"]
    assert len(merged) == 300 and merged[outside] == -100 and list(theirs)[1] in merged
    assert merged[list(theirs)[1]] == 2 and list(theirs)[2] not in merged
    pairs = [[7, 0.0]]  # llama.cpp's list form: its strings are text, not token ids; left alone, and said so
    assert _post(url, key, logit_bias=pairs).status_code == 200
    assert upstream.requests[-1].json()["logit_bias"] == pairs
    marks = exchanges(yielding[3])[-1]["marks"]
    assert [m for m in marks if m["scheme"] == "sampling-bias-v1"] == [
        {"scheme": "sampling-bias-v1", "epoch": 0, "tokens": 0}
    ]


def test_an_upstream_that_refuses_the_bias_is_asked_again_without_it_and_then_skipped(biased):
    url, key, upstream, state = biased
    upstream.behaviour.refuse_logit_bias = True
    response = _post(url, key, model="some-reasoning-model")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert ["logit_bias" in r.json() for r in upstream.requests] == [True, False]
    assert _post(url, key, model="some-reasoning-model").status_code == 200
    assert "logit_bias" not in upstream.requests[-1].json() and len(upstream.requests) == 3
    upstream.behaviour.refuse_logit_bias = False
    upstream.behaviour.status = 400  # a 400 about something else: asked again without the mark, that 400 relayed
    assert _post(url, key, model="other").status_code == 400 and len(upstream.requests) == 5
    assert "logit_bias" not in upstream.requests[-1].json()
    upstream.behaviour.status = 200
    assert _post(url, key, model="other").status_code == 200 and "logit_bias" in upstream.requests[-1].json()
    marks = [[m["scheme"] for m in r["marks"] if m["scheme"] == SCHEME] for r in exchanges(state)]
    assert marks == [[], [], [], [SCHEME]]  # whatever went upstream unmarked claims no mark; "other" not skipped
    committed = [c for c in commitments([LogReader(state / "evidence" / "0")]) if c["subject"] == "sampling-bias-key"]
    assert len(committed) == 1 and committed[0]["size"] == 300 and committed[0]["scheme"] == SCHEME


def test_off_by_default_and_then_no_request_is_changed(fake_upstream, tmp_path):
    settings = limited_settings(tmp_path / "state", fake_upstream.url, ROOMY)
    assert not settings.sampling_bias.enabled
    key = Registry(settings.state_dir).add("caller")
    settings = dataclasses.replace(settings, watermark=dataclasses.replace(settings.watermark, enabled=False))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    with ServerThread(create_app(settings)) as server:
        assert httpx.post(server.url + CHAT, content=body, headers=headers).status_code == 200
    assert fake_upstream.requests[-1].body == body
    fake_upstream.reset()


def test_detect_tests_the_green_list_the_gateway_committed_to(fake_upstream, tmp_path):
    from gateway.evidence.keys import Keys
    from tests.test_cli import cli

    tokenizer = _vocabulary_file(tmp_path)
    (tmp_path / "canarygate.toml").write_text('[sampling_bias]\ntokenizer = "tokenizer.json"\n')
    assert cli(tmp_path, "keys", "init").returncode == 0
    vocabulary = Vocabulary.load(tokenizer)
    green = green_list(Keys.load(tmp_path / ".canarygate" / "keys").watermark, 0, vocabulary, 300, 4.0)
    marked = "We talk about " + " and ".join(sorted(green.words)[:30]) + " today."
    (tmp_path / "suspect.jsonl").write_text(json.dumps({"text": marked}) + "\n")
    before = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--json").stdout)
    assert list(before["schemes"]) == ["lexical-v1"]  # never served with the mark: nothing to test
    settings = limited_settings(tmp_path / ".canarygate", fake_upstream.url, ROOMY)
    chosen = SamplingBiasSettings(enabled=True, tokenizer=str(tokenizer))
    with ServerThread(create_app(dataclasses.replace(settings, sampling_bias=chosen))):
        pass  # the gateway commits to the green list before it serves
    doc = json.loads(cli(tmp_path, "detect", "suspect.jsonl", "--json").stdout)
    found = doc["schemes"][f"{SCHEME}@0"]
    assert found["p_value"] < 1e-15 and found["hits"] >= 30 and found["key"] == green.fingerprint
    assert found["p_value"] == pytest.approx(min(1.0, 2 * found["raw_p_value"]))  # Holm across the two schemes
    assert doc["commitments"]["sampling-bias-key@0"] is not None and len(doc["schemes"]) == 2
    (tmp_path / "tokenizer.json").write_text(tokenizer.read_text().replace("endoftext", "end"))
    other = cli(tmp_path, "detect", "suspect.jsonl")
    assert other.returncode == 2 and "not the tokenizer file the gateway committed to" in other.stderr


def test_a_client_cannot_switch_the_mark_off_for_others(yielding):
    url, key, upstream, state = yielding
    upstream.behaviour.refuse_logit_bias = True  # the client's own logit_bias is refused: their fault, not ours
    assert _post(url, key, logit_bias={"5": 500}).status_code == 400 and len(upstream.requests) == 2
    upstream.behaviour.refuse_logit_bias = False
    assert _post(url, key).status_code == 200 and "logit_bias" in upstream.requests[-1].json()
    crowded = {str(i): 1 for i in range(10_000, 10_300)}  # all 300 slots: no room, and the log says so
    assert _post(url, key, logit_bias=crowded).status_code == 200
    assert upstream.requests[-1].json()["logit_bias"] == crowded
    assert [m for m in exchanges(state)[-1]["marks"] if m["scheme"] == SCHEME][0]["tokens"] == 0


def test_marked_requests_lose_their_logprobs_and_tool_calls_are_left_alone(fake_upstream, tmp_path):
    settings = limited_settings(tmp_path / "state", fake_upstream.url, ROOMY)
    chosen = SamplingBiasSettings(enabled=True, tokenizer=str(_vocabulary_file(tmp_path)))
    settings = dataclasses.replace(settings, sampling_bias=chosen, watermark=dataclasses.replace(
        settings.watermark, enabled=False))  # fmt: skip
    key = Registry(settings.state_dir).add("caller")
    with ServerThread(create_app(settings)) as server:
        fake_upstream.behaviour.patch = _with_logprobs  # an upstream that sends them unasked
        answer = _post(server.url, key, logprobs=True, top_logprobs=5)
        sent = fake_upstream.requests[-1].json()
        assert "logit_bias" in sent and "logprobs" not in sent and "top_logprobs" not in sent
        assert answer.status_code == 200 and not answer.json()["choices"][0].get("logprobs")
        streamed = _post(server.url, key, stream=True).text
        assert '"token"' not in streamed and "[DONE]" in streamed
        fake_upstream.behaviour.patch = None
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        assert _post(server.url, key, tools=[tool]).status_code == 200
        assert "logit_bias" not in fake_upstream.requests[-1].json()
    fake_upstream.reset()


def _with_logprobs(data: bytes) -> bytes:
    logprobs = b'"logprobs": {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": []}]}, "finish_reason"'
    return data.replace(b'"finish_reason"', logprobs)


@pytest.mark.parametrize(
    "refusal",
    [  # vLLM: at the top level, and a message that names it among others with no param
        {"object": "error", "message": "logit_bias is not supported", "type": "BadRequestError", "param": "logit_bias"},
        {"error": {"message": "The min_p and logit_bias sampling parameters are not yet supported with speculative "
                   "decoding.", "type": "BadRequestError", "param": None}},
    ],
)  # fmt: skip
def test_a_refusal_in_another_shape_is_still_a_refusal(biased, refusal):
    url, key, upstream, _ = biased
    upstream.behaviour.refuse_logit_bias, upstream.behaviour.refusal = True, refusal
    assert _post(url, key, model="vllm-model").status_code == 200
    assert _post(url, key, model="vllm-model").status_code == 200
    assert ["logit_bias" in r.json() for r in upstream.requests] == [True, False, False]  # then skipped


def test_the_marked_request_is_never_shown_to_the_client(yielding):
    """An upstream that echoes the request in its errors: what the client sees is its own request's error."""
    url, key, upstream, _ = yielding
    upstream.behaviour.status = 400
    upstream.behaviour.error_body = lambda body: {"error": {"message": "temperature too high", "input": body.decode()}}
    for theirs in ({}, {"logit_bias": {"7": 1}}):
        answer = _post(url, key, temperature=3, **theirs)
        assert answer.status_code == 400 and json.loads(answer.json()["error"]["input"]) == upstream.requests[-1].json()
        assert len(json.loads(answer.json()["error"]["input"]).get("logit_bias", {})) == len(theirs)


def test_entries_of_bias_zero_take_no_room_and_other_values_are_the_clients_own(yielding):
    url, key, upstream, state = yielding
    zeros = {str(i): 0 for i in range(10_000, 10_300)}  # tokens outside the list: no room taken
    assert _post(url, key, logit_bias=zeros).status_code == 200
    sent = upstream.requests[-1].json()["logit_bias"]
    assert len(sent) == 300 and set(sent.values()) == {4.0} and not set(sent) & set(zeros)
    assert [m["tokens"] for m in exchanges(state)[-1]["marks"] if m["scheme"] == SCHEME] == [300]
    for malformed in (False, 0, ""):  # the upstream says what is wrong with it, as without the gateway
        _post(url, key, logit_bias=malformed)
        assert upstream.requests[-1].json()["logit_bias"] == malformed
    _post(url, key, logit_bias=[])  # none, as llama.cpp writes it: marked
    assert len(upstream.requests[-1].json()["logit_bias"]) == 300


def test_a_request_too_deep_to_write_again_goes_unmarked(biased):
    url, key, upstream, state = biased
    body = '{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "metadata": '
    body += '{"x": ' * 1000 + "{}" + "}" * 1000 + "}"  # too deep for the json module to write, or httpx
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    httpx.post(url + CHAT, content=body, headers=headers, timeout=10)  # the fake upstream cannot read it either
    assert upstream.requests[-1].body == body.encode()  # as it came, not a 500 from the gateway
    assert exchanges(state)[-1]["outcome"] != "internal_error"
    assert not [m for m in exchanges(state)[-1]["marks"] if m["scheme"] == SCHEME]


@pytest.mark.parametrize("bad", ["Infinity", "1e400", "-5", "2.5", '"7"'])
def test_a_tokenizer_with_ids_that_are_not_token_ids_is_refused(tmp_path, bad):
    path = _vocabulary_file(tmp_path)
    data = json.loads(path.read_text())
    data["model"]["vocab"]["\u0120zzzword"] = "BAD"
    path.write_text(json.dumps(data).replace('"BAD"', bad))
    with pytest.raises(VocabularyError):
        Vocabulary.load(path)
