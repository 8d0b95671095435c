"""The watermark in a running gateway (sidecar and middleware), through the official SDKs."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.watermark.mark import LexicalWatermark
from gateway.watermark.scheme import LexicalKey
from gateway.watermark.wordsets import default_sets
from tests.ratelimit.conftest import running_gateway
from tests.test_sdk import MESSAGES, ROUTE_CALLS, ant, oai

PROSE = "However, it is large and we are done quickly. They are often here, and colors vary. Do not worry."
MARK = LexicalWatermark(LexicalKey(b"test-key" * 4, default_sets()))
PROMPT = MESSAGES[0]["content"]


@pytest.fixture
def marked(gw):
    gw.transform.enabled = True
    gw.transform.watermark = MARK
    gw.upstream.behaviour.text = PROSE
    return gw


def test_answers_are_marked_the_same_whole_and_streamed_on_every_route(marked):
    expected = MARK.mark(PROSE, PROMPT)
    assert expected != PROSE
    assert oai(marked).chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == expected
    streamed = oai(marked).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    with ant(marked).messages.stream(model="c", max_tokens=9, messages=MESSAGES) as stream:
        assert stream.get_final_message().content[0].text == expected


def test_every_choice_is_marked_and_the_marks_are_recorded(marked):
    texts = ROUTE_CALLS["chat"](marked, True)
    assert texts[0] == MARK.mark(PROSE, PROMPT) and texts[1] == MARK.mark(PROSE + " Choice 1 says more.", PROMPT)
    marks = marked.records()[-1]["marks"]
    assert [m["part"] for m in marks] == [["choice", 0], ["choice", 1]]
    assert all(m["scheme"] == "lexical-v1" and m["key"] == MARK.key.fingerprint and m["sites"] > 0 for m in marks)


def test_an_answer_holding_what_python_writes_but_json_forbids_is_marked_and_passed_on_as_it_came(marked):
    """An upstream written in Python may send -Infinity (a log-probability of zero) or NaN."""
    marked.upstream.behaviour.patch = lambda raw: raw.replace(
        b'"finish_reason"', b'"score": -Infinity, "finish_reason"'
    )
    expected = MARK.mark(PROSE, PROMPT)
    body = {"model": "m", "messages": MESSAGES}
    with marked.client() as http:
        whole = http.post("/v1/chat/completions", headers=marked.headers(), json=body)
        streamed = http.post("/v1/chat/completions", headers=marked.headers(), json={**body, "stream": True})
    (choice,) = json.loads(whole.content)["choices"]
    assert whole.status_code == 200 and choice["message"]["content"] == expected and choice["score"] == -math.inf
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == expected
    assert all(c["score"] == -math.inf for c in choices)


def test_a_prompt_with_a_lone_surrogate_is_marked_whole_and_streamed(marked):
    """JSON allows an escaped lone surrogate, which has no UTF-8: the mark reads the prompt all the same."""
    prompt = "Is it large? \ud800 It is large."
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    expected = MARK.mark(PROSE, prompt)
    with marked.client() as http:
        whole = http.post("/v1/chat/completions", headers=marked.headers(), content=json.dumps(body))
        streamed = http.post(
            "/v1/chat/completions", headers=marked.headers(), content=json.dumps({**body, "stream": True})
        )
    assert whole.status_code == 200 and json.loads(whole.content)["choices"][0]["message"]["content"] == expected
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"]) == expected


def test_an_answer_that_is_not_json_is_a_bad_gateway_in_the_api_shape(marked):
    marked.upstream.behaviour.patch = lambda raw: raw[:-1]
    with marked.client() as http:
        answer = http.post("/v1/chat/completions", headers=marked.headers(), json={"model": "m", "messages": MESSAGES})
    assert answer.status_code == 502 and "not valid JSON" in answer.json()["error"]["message"]
    assert marked.records()[-1]["outcome"] == "upstream_failed"


def test_thinking_tool_use_and_code_stay_byte_identical(marked):
    code = "```python\nit is large = True  # however, quickly\n```"
    marked.upstream.behaviour.blocks = [
        ("thinking", "however, it is large"),
        ("text", code),
        ("tool_use", '{"q": "it is large"}'),
        ("text", PROSE),
    ]
    final = ant(marked).messages.create(model="c", max_tokens=9, messages=MESSAGES)
    assert final.content[0].thinking == "however, it is large"
    assert final.content[1].text == code
    assert final.content[2].input == {"q": "it is large"}
    assert final.content[3].text == MARK.mark(PROSE, PROMPT)


def test_structured_output_is_never_marked(marked):
    answer = oai(marked).chat.completions.create(model="m", messages=MESSAGES, response_format={"type": "json_object"})
    assert answer.choices[0].message.content == PROSE


def test_an_answer_that_may_cite_its_sources_by_offsets_is_not_marked(marked):
    """Web and file search answers carry citations as character offsets into their text, which a rewritten text
    would leave pointing at other words."""
    client = oai(marked)
    chat = client.chat.completions.create(model="m", messages=MESSAGES, web_search_options={})
    assert chat.choices[0].message.content == PROSE
    for tool in ({"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}):
        assert client.responses.create(model="m", input=PROMPT, tools=[tool]).output_text == PROSE
    assert client.responses.create(model="m", input=PROMPT).output_text == MARK.mark(PROSE, PROMPT)


def test_log_probabilities_are_not_asked_of_the_upstream_for_a_marked_answer(marked):
    oai(marked).chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=3)
    sent = marked.upstream.requests[-1].json()
    assert "logprobs" not in sent and "top_logprobs" not in sent


def test_log_probabilities_can_be_refused_instead(fake_upstream, tmp_path):
    fake_upstream.reset()
    with running_gateway(tmp_path / "state", fake_upstream.url, watermark={"logprobs": "refuse"}) as gateway:
        _, key = gateway.identity("unlimited")
        with gateway.client(key) as http:
            refused = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "logprobs": True})
            plain = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert refused.status_code == 400 and "log-probabilities" in refused.json()["error"]["message"]
    assert plain.status_code == 200


@pytest.mark.parametrize("route", sorted(ROUTE_CALLS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(
        st.sampled_from(
            [
                "it",
                "is",
                "large",
                "however,",
                "quickly",
                "colors",
                "we",
                "are",
                "the",
                "Moreover,",
                "do",
                "not",
                "dog",
                "\n",
                "`",
                '"',
                "often",
            ]
        ),
        min_size=1,
        max_size=40,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=30),
)
def test_streamed_equals_whole_for_any_split_with_the_mark_on(marked, route, words, cuts):
    text = " ".join(words)
    points = sorted({c for c in cuts if c < len(text)})
    marked.upstream.behaviour.text = text
    marked.upstream.behaviour.splitter = lambda t: [
        t[a:b] for a, b in zip([0, *points], [*points, len(t)], strict=True)
    ]
    whole = ROUTE_CALLS[route](marked, False)
    assert ROUTE_CALLS[route](marked, True) == whole
    prompt = "x" if route == "responses" else PROMPT
    assert whole[0] == MARK.mark(text, prompt)
