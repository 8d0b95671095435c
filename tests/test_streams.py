"""A stream is judged by its events, not by how the upstream's body ends: a complete answer stays complete
whatever the upstream does after it, an answer cut inside an event or before its terminal event is a
failure, and what was ready before an event the gateway cannot read still reaches the client."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway import pipeline
from tests.test_hygiene import BODY, CHAT


def _events(text: str) -> list[str]:
    return [e for e in text.strip().split("\n\n") if e]


def _streamed(gw, **behaviour) -> tuple[object, list[str]]:
    """A chat stream through the gateway, its text transformed, from an upstream of this `behaviour`."""
    gw.transform.enabled = True
    for name, value in behaviour.items():
        setattr(gw.upstream.behaviour, name, value)
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json={**BODY, "stream": True})
    return r, _events(r.text)


def _content(events: list[str]) -> str:
    out = ""
    for event in events:
        data = event.removeprefix("data: ")
        if data != "[DONE]":
            out += "".join(c["delta"].get("content") or "" for c in json.loads(data).get("choices", []))
    return out


@pytest.mark.parametrize("after", ["hang", "die"])
def test_a_complete_stream_stays_complete_whatever_the_upstream_does_after_it(gw, after):
    r, events = _streamed(gw, after_events=after)
    assert r.status_code == 200 and events[-1] == "data: [DONE]" and '"error"' not in r.text, r.text
    assert _content(events) == "THE quick brown FOX jumps over THE lazy DOG, and THE DOG sleeps on."
    assert gw.records()[-1]["outcome"] == "completed"


def test_a_complete_stream_is_answered_without_waiting_for_the_upstream_to_end_its_body(gw, monkeypatch):
    """The upstream's body is read to its end beside the request (for its connection's reuse): the client has
    [DONE] while the upstream still holds the body open. It waited for the body's end, up to DRAIN_SECONDS."""
    monkeypatch.setattr(pipeline, "DRAIN_SECONDS", 20.0)
    r, events = _streamed(gw, after_events="hang")
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    assert not gw.upstream.hung_up.is_set()
    assert gw.records()[-1]["outcome"] == "completed"


@pytest.mark.parametrize("before", [b"id: 7\n", b": keep-alive\n", b"event: done\n"])
def test_a_terminal_event_with_other_lines_before_its_data_ends_the_stream(gw, before):
    """id, event and comment lines may come before an event's data line (SSE): [DONE] is the end all the same,
    not a stream that never ended (waited on until the upstream hangs up, then an error after [DONE])."""
    r, events = _streamed(gw, after_events="hang", patch=lambda raw: before + raw if b"[DONE]" in raw else raw)
    assert r.status_code == 200 and '"error"' not in r.text and events[-1].endswith("data: [DONE]"), r.text[-300:]
    assert gw.records()[-1]["outcome"] == "completed"


@pytest.mark.parametrize("extra", [b'data: {"choices": [{"index": 0, "delta": {"content": "EXTRA the"}}]}\n\n',
                                   b"data: \xff\xfe\n\n"])  # fmt: skip
def test_what_follows_the_terminal_event_in_its_own_read_goes_where_later_reads_go(gw, extra):
    """Dropped, whether the upstream sent it in the read that held the terminal event or in a later one:
    neither forwarded after [DONE] unmarked, nor, when it is no UTF-8, turning a complete answer into a failure."""
    r, events = _streamed(gw, patch=lambda raw: raw + extra if b"[DONE]" in raw else raw)
    assert r.status_code == 200 and events[-1] == "data: [DONE]" and "EXTRA" not in r.text, r.text[-300:]
    assert _content(events) == "THE quick brown FOX jumps over THE lazy DOG, and THE DOG sleeps on."
    assert gw.records()[-1]["outcome"] == "completed"


def test_a_stream_that_begins_with_a_byte_order_mark_is_read_from_its_first_event(gw):
    seen = []

    def patch(raw: bytes) -> bytes:
        seen.append(raw)
        return "\ufeff".encode() + raw if len(seen) == 1 else raw

    r, events = _streamed(gw, patch=patch)
    assert not r.content.startswith("\ufeff".encode())
    assert _content(events) == "THE quick brown FOX jumps over THE lazy DOG, and THE DOG sleeps on."


def test_an_event_nested_too_deeply_to_write_back_is_the_upstreams_failure(gw):
    """orjson reads 1,024 levels, the writer fewer: the event is read and marked, then cannot be written. Like a
    whole answer of that depth, an upstream failure in the stream's shape, not the gateway's internal error."""
    deep = b'"deep": ' + b"[" * 1010 + b"]" * 1010 + b", "
    r, events = _streamed(gw, patch=lambda raw: raw.replace(b"{", b"{" + deep, 1) if b"fox" in raw else raw)
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert r.status_code == 200 and error["code"] == "upstream_error", error
    assert _content(events[:-1]).startswith("THE quick")
    assert gw.records()[-1]["outcome"] == "upstream_failed"


def test_a_stream_that_ends_inside_an_event_is_a_failure(gw):
    gw.upstream.behaviour.patch = lambda raw: b'data: {"choices": [{"inde' if b"[DONE]" in raw else raw
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json={**BODY, "stream": True})
    last = json.loads(_events(r.text)[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_error" and '"inde\n' not in r.text
    assert gw.records()[-1]["outcome"] == "upstream_failed"


@pytest.mark.parametrize(
    ("path", "body", "ends"),
    [
        (CHAT, {**BODY, "stream": True}, (b"[DONE]", b'"finish_reason": "stop"', b'"usage"')),
        ("/v1/messages", {"model": "c", "max_tokens": 50, **BODY, "stream": True}, (b"message_stop",)),
        ("/v1/responses", {"model": "m", "input": "hi", "stream": True}, (b"response.completed",)),
    ],
)
def test_a_stream_that_ends_without_its_terminal_event_is_a_failure(gw, path, body, ends):
    """An upstream whose body ends cleanly between events but before the API's own end (its terminal event; on
    chat, also the chunk that finishes the answer) has cut the answer short: the client is told in the
    stream's own error shape, and the record does not say completed (which would also settle the token
    reservation on a partial count)."""
    gw.transform.enabled = True
    terminal = ends[0]
    gw.upstream.behaviour.patch = lambda raw: b"" if any(end in raw for end in ends) else raw
    with gw.client() as http:
        r = http.post(path, headers=gw.headers(), json=body)
    assert r.status_code == 200 and terminal not in r.content
    assert b"THE" in r.content or b"HELLO" in r.content or b"quick" in r.content  # what came before still came
    assert b"error" in _events(r.text)[-1].encode(), r.text[-300:]
    assert gw.records()[-1]["outcome"] == "upstream_failed" and gw.records()[-1]["error"] == "broken"


def test_a_chat_stream_that_finishes_but_sends_no_done_is_complete(gw):
    """Older TGI and llama.cpp servers end a chat stream after the chunk with its finish_reason, with no [DONE]."""
    r, events = _streamed(gw, patch=lambda raw: b"" if b"[DONE]" in raw else raw)
    assert r.status_code == 200 and '"error"' not in r.text and _content(events).startswith("THE quick")
    assert gw.records()[-1]["outcome"] == "completed"


def test_an_event_of_another_shape_fails_the_stream_after_what_came_before_it(gw):
    """An upstream chunk whose choice index is a list: an upstream failure, not the gateway's, and the text
    of the chunks before it reaches the client, even where both come in one read."""
    gw.transform.enabled = True
    seen = []

    def patch(raw: bytes) -> bytes:
        seen.append(raw)
        return raw.replace(b'"index": 0', b'"index": [0]') if len(seen) == 4 else raw

    gw.upstream.behaviour.patch = patch
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json={**BODY, "stream": True})
    events = _events(r.text)
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_error"
    assert _content(events[:-1]).startswith("THE quick")
    assert gw.records()[-1]["outcome"] == "upstream_failed"


def test_a_responses_stream_without_done_events_gets_its_whole_text_in_the_final_event(gw):
    gw.transform.enabled = True
    gw.upstream.behaviour.text = "Hello the world"  # ends in a word: held until the part ends
    done = (b"response.output_text.done", b"response.content_part.done", b"response.output_item.done")
    gw.upstream.behaviour.patch = lambda raw: b"" if any(name in raw for name in done) else raw
    with gw.client() as http:
        r = http.post("/v1/responses", headers=gw.headers(), json={"model": "m", "input": "hi", "stream": True})
    deltas, final = "", None
    for event in _events(r.text):
        data = json.loads(event.split("data: ", 1)[1])
        if data["type"] == "response.output_text.delta":
            deltas += data["delta"]
        elif data["type"] == "response.completed":
            final = data["response"]["output"][0]["content"][0]["text"]
    assert final == deltas == "HELLO THE world"


def test_usage_in_a_content_chunk_does_not_hide_the_usage_event_that_came_last(gw):
    """The usage event the gateway asked for (and keeps out of the client's stream) is the stream's final
    count; a content chunk that also carries usage must not replace it."""
    seen = []

    def patch(raw: bytes) -> bytes:
        seen.append(raw)
        early = b'"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "choices"'
        return raw.replace(b'"choices"', early, 1) if len(seen) == 2 else raw

    gw.upstream.behaviour.patch = patch
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json={**BODY, "stream": True})
    assert r.status_code == 200 and '"total_tokens": 2' in r.text  # the client sees the early one
    last_usage = json.loads(seen[-2].removeprefix(b"data: "))["usage"]  # the usage event, before [DONE]
    assert gw.records()[-1]["usage"]["total_tokens"] == last_usage["total_tokens"] > 2


@pytest.mark.parametrize("label", ["text/plain", "application/x-ndjson", "application/octet-stream", ""])
def test_a_stream_under_another_label_is_read_as_a_stream(gw, label):
    r, events = _streamed(gw, stream_type=label)
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert _content(events).startswith("THE quick") and '"usage"' not in r.text  # marked; usage kept out
    assert gw.records()[-1]["usage"]["total_tokens"] > 0


def test_a_stream_answered_with_an_html_page_is_the_upstreams_failure(gw):
    """A proxy's error page sent with 200 is no stream: relayed as one, an SDK saw an empty answer, recorded as
    completed."""
    page = b"<html><head><title>502 Bad Gateway</title></head></html>"
    r, _ = _streamed(gw, stream_type="text/html", patch=lambda raw: page)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert gw.records()[-1]["outcome"] == "upstream_failed"


def test_log_probabilities_an_upstream_sends_unasked_never_reach_a_client_of_marked_answers(gw):
    """They would show the tokens the mark replaced (the request's ask is removed; an upstream may send them
    anyway)."""
    sent = b'"logprobs": {"content": [{"token": "THE", "logprob": -0.1}]}, "finish_reason"'
    add = lambda raw: raw.replace(b'"finish_reason"', sent)  # noqa: E731
    _, events = _streamed(gw, patch=add)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e != "data: [DONE]"]
    assert all(c.get("logprobs") is None for chunk in chunks for c in chunk.get("choices", []))
    with gw.client() as http:
        whole = http.post(CHAT, headers=gw.headers(), json=BODY).json()
    assert whole["choices"][0]["logprobs"] is None and whole["choices"][0]["message"]["content"]
    gw.upstream.behaviour.patch = None


@pytest.mark.parametrize("error", [b'{"error": {"message": "overloaded", "type": "server_error"}}',
                                   b'{"object": "error", "message": "overloaded", "type": "BadRequestError"}',
                                   b'{"object":"error","message":"overloaded"}'])  # fmt: skip
def test_an_error_event_from_the_upstream_is_no_completed_answer(gw, error):
    """OpenAI's error chunk, and vLLM's (an error object itself, which older versions sent before [DONE])."""
    _, events = _streamed(gw, patch=lambda raw: b"data: " + error + b"\n\n" + raw if b"[DONE]" in raw else raw)
    assert json.loads(events[-1].removeprefix("data: "))["message" if b"object" in error else "error"]  # as sent
    assert gw.records()[-1]["outcome"] == "upstream_failed"


def test_a_terminal_event_behind_held_text_ends_the_stream(gw):
    """No chunk ends the part (no finish_reason) and the last word is held by the rewriter, with [DONE] behind
    it: the stream still ends at [DONE], without waiting for the upstream to close its body."""
    finish = b'"finish_reason": "stop"'
    r, events = _streamed(
        gw, text="Hello the world", after_events="hang", patch=lambda raw: b"" if finish in raw else raw
    )
    assert events[-1] == "data: [DONE]" and _content(events) == "HELLO THE world", r.text
    assert gw.records()[-1]["outcome"] == "completed"


def test_an_unreadable_last_event_is_withheld_and_what_came_before_goes_out_in_order(gw):
    bad = b'data: {"choices": [{"index": [0], "delta": {"content": " UNREAD"}}]}'  # and no blank line after
    _, events = _streamed(gw, patch=lambda raw: bad if b"[DONE]" in raw else raw)
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_error"
    assert _content(events[:-1]) == "THE quick brown FOX jumps over THE lazy DOG, and THE DOG sleeps on."


def test_an_error_event_with_no_blank_line_after_it_is_no_completed_answer(gw):
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}'
    _streamed(gw, patch=lambda raw: error if b"[DONE]" in raw else raw)
    assert gw.records()[-1]["outcome"] == "upstream_failed"


def test_a_tail_is_read_as_json_only_on_an_api_route():
    from gateway.pipeline import _completed_tail
    from gateway.protocols import ROUTES
    from gateway.upstream import UpstreamError

    chat = ROUTES[CHAT]
    assert _completed_tail(b"data: world", None) == [b"data: world\n\n"]  # a passthrough route's own format
    for whole in (b": keep-alive", b"event: ping", b"data: [DONE]", b'data: {"a": 1}'):
        assert _completed_tail(whole, chat) == [whole + b"\n\n"]
    with pytest.raises(UpstreamError):
        _completed_tail(b'data: {"choices": [{"inde', chat)


def test_an_error_status_to_a_stream_request_passes_through_as_the_upstream_sent_it(tmp_path):
    from gateway.app import create_app
    from gateway.identity import Registry
    from tests.conftest import ServerThread, _settings

    async def refusing(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Bad Request: no"})

    with ServerThread(refusing) as upstream:
        settings = _settings(tmp_path / "state", upstream.url)
        key = Registry(tmp_path / "state").add("ann")
        with ServerThread(create_app(settings)) as gateway:
            r = httpx.post(
                gateway.url + CHAT, json={**BODY, "stream": True}, headers={"authorization": f"Bearer {key}"}
            )
    assert (r.status_code, r.headers["content-type"], r.text) == (400, "text/plain", "Bad Request: no")
