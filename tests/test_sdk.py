"""The official SDKs, pointed at the gateway (sidecar and middleware), against a real-format upstream."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import DEFAULT_TEXT
from tests.transforms import rewrite_text


def oai(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0, timeout=10)


def ant(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0, timeout=10)


MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


def test_chat_completion_whole_and_streamed(gw):
    client = oai(gw)
    whole = client.chat.completions.create(model="m", messages=MESSAGES)
    assert whole.choices[0].message.content == DEFAULT_TEXT
    assert whole.usage.total_tokens > 0
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == DEFAULT_TEXT


def test_chat_stream_usage_chunk_and_several_choices(gw):
    client = oai(gw)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, n=3, stream_options={"include_usage": True}
        )
    )
    texts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == dict(enumerate(gw.upstream.texts(3)))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    whole = client.chat.completions.create(model="m", messages=MESSAGES, n=3)
    assert [c.message.content for c in whole.choices] == gw.upstream.texts(3)


def test_legacy_completions(gw):
    client = oai(gw)
    assert client.completions.create(model="m", prompt="Say hi").choices[0].text == DEFAULT_TEXT
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="x", stream=True))
    assert streamed == DEFAULT_TEXT


def test_responses_api(gw):
    client = oai(gw)
    assert client.responses.create(model="m", input="Tell me").output_text == DEFAULT_TEXT
    events = list(client.responses.create(model="m", input="Tell me", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == DEFAULT_TEXT
    assert [e.text for e in events if e.type == "response.output_text.done"] == [DEFAULT_TEXT]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == DEFAULT_TEXT


def test_embeddings_and_models(gw):
    client = oai(gw)
    assert len(client.embeddings.create(model="e", input=["a", "b"]).data) == 2
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_anthropic_messages_with_several_blocks(gw):
    gw.upstream.behaviour.blocks = [
        ("thinking", "Let me think about foxes."),
        ("text", DEFAULT_TEXT),
        ("tool_use", '{"q": "fox"}'),
        ("text", "Second block."),
    ]
    client = ant(gw)
    whole = client.messages.create(model="c", max_tokens=100, messages=MESSAGES)
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use", "text"]
    assert whole.content[1].text == DEFAULT_TEXT
    with client.messages.stream(model="c", max_tokens=100, messages=MESSAGES) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "text"]
    assert final.content[0].thinking == "Let me think about foxes."
    assert final.content[2].input == {"q": "fox"}
    assert [b.text for b in final.content if b.type == "text"] == [DEFAULT_TEXT, "Second block."]


def test_transform_rewrites_streams_and_whole_answers(gw):
    gw.transform.enabled = True
    gw.upstream.behaviour.blocks = [("thinking", "the fox thinks"), ("text", DEFAULT_TEXT)]
    expected = rewrite_text(DEFAULT_TEXT)
    assert expected != DEFAULT_TEXT
    client = oai(gw)
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == expected
    streamed = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    events = list(client.responses.create(model="m", input="x", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].response.output_text == expected
    final = ant(gw).messages.create(model="c", max_tokens=9, messages=MESSAGES)
    assert final.content[0].thinking == "the fox thinks"  # thinking blocks are never touched
    assert final.content[1].text == expected


def test_stream_keeps_one_event_per_upstream_event(gw):
    gw.transform.enabled = True
    for path, body in (
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True, "n": 2}),
        ("/v1/messages", {"model": "c", "max_tokens": 5, "messages": MESSAGES, "stream": True}),
        ("/v1/responses", {"model": "m", "input": "x", "stream": True}),
    ):
        with gw.client() as http:
            raw = http.post(path, headers=gw.headers(), json=body).content
        gw.transform.enabled = False
        with gw.client() as http:
            plain = http.post(path, headers=gw.headers(), json=body).content
        gw.transform.enabled = True
        assert raw.count(b"\n\n") == plain.count(b"\n\n") > 5, path


ROUTE_CALLS = {
    "chat": lambda gw, stream: _chat_text(oai(gw), stream),
    "responses": lambda gw, stream: _responses_text(oai(gw), stream),
    "messages": lambda gw, stream: _messages_text(ant(gw), stream),
}


def _chat_text(client, stream):
    if not stream:
        return [c.message.content for c in client.chat.completions.create(model="m", messages=MESSAGES, n=2).choices]
    texts = ["", ""]
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    return texts


def _responses_text(client, stream):
    if not stream:
        return [client.responses.create(model="m", input="x").output_text]
    events = list(client.responses.create(model="m", input="x", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == deltas
    return [deltas]


def _messages_text(client, stream):
    if not stream:
        return [b.text for b in client.messages.create(model="c", max_tokens=9, messages=MESSAGES).content]
    with client.messages.stream(model="c", max_tokens=9, messages=MESSAGES) as s:
        return [b.text for b in s.get_final_message().content]


@pytest.mark.parametrize("route", sorted(ROUTE_CALLS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from(list("the fox dog Hello, ab\n\u00e9\u4e2d!")), min_size=1, max_size=80),
    cuts=st.lists(st.integers(min_value=1, max_value=79), max_size=30),
    transformed=st.booleans(),
)
def test_streamed_equals_whole_for_any_split(gw, route, text, cuts, transformed):
    gw.transform.enabled = transformed
    points = sorted({c for c in cuts if c < len(text)})
    gw.upstream.behaviour.text = text
    gw.upstream.behaviour.splitter = lambda t: [t[a:b] for a, b in zip([0, *points], [*points, len(t)], strict=True)]
    gw.upstream.behaviour.blocks = None
    whole = ROUTE_CALLS[route](gw, False)
    assert ROUTE_CALLS[route](gw, True) == whole
    assert whole[0] == (rewrite_text(text) if transformed else text)


def test_token_usage_is_recorded_for_whole_and_streamed_answers(gw):
    oai(gw).chat.completions.create(model="m", messages=MESSAGES)
    whole = gw.records()[-1]["usage"]
    assert whole["completion_tokens"] == len(DEFAULT_TEXT.split()) and whole["total_tokens"] > 0
    list(
        oai(gw).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert gw.records()[-1]["usage"]["completion_tokens"] == whole["completion_tokens"]
    with ant(gw).messages.stream(model="c", max_tokens=9, messages=MESSAGES) as stream:
        stream.get_final_message()
    usage = gw.records()[-1]["usage"]  # input from message_start, output from message_delta
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == len(DEFAULT_TEXT.split())


def test_a_usage_key_the_model_wrote_is_not_the_answers_usage(gw):
    """An Anthropic tool's input is JSON the model writes (and a client can steer): a "usage" in it must not
    settle the token budget. Read where the API reports it, the usage is the same as without it."""
    gw.upstream.behaviour.blocks = [("text", "Calling."), ("tool_use", '{"usage": {"total_tokens": 0}}')]
    ant(gw).messages.create(model="c", max_tokens=9, messages=MESSAGES)
    whole = gw.records()[-1]["usage"]
    assert set(whole) == {"input_tokens", "output_tokens"} and whole["output_tokens"] > 0
    with ant(gw).messages.stream(model="c", max_tokens=9, messages=MESSAGES) as stream:
        stream.get_final_message()
    assert gw.records()[-1]["usage"] == whole


def test_every_exchange_is_recorded(gw):
    before = len(gw.records())
    oai(gw).chat.completions.create(model="m", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="cg_bad_key", max_retries=0).models.list()
    records = gw.records()[before:]
    assert [(r["status"], r["outcome"], r["identity"]) for r in records] == [
        (200, "completed", "alice"),
        (401, "rejected", None),
    ]
    assert json.dumps(records).find(gw.key) < 0  # the caller's key never reaches the record
