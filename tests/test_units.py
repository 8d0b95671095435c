"""Pure pieces tested alone: SSE framing, settings defaults, identity keys."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import config, files, jsonio
from gateway.exchange import ErrorKind, GatewayError, Outcome
from gateway.identity import IdentityError, Registry
from gateway.pipeline import Pipeline
from gateway.protocols import ROUTES
from gateway.protocols.base import MAX_TOKEN_COUNT, estimate_tokens, total_tokens, usage_of
from gateway.protocols.sse import SSEEvent, SSEFramer
from gateway.rewrite import _decoded

EVENTS = [b'event: a\ndata: {"x": 1}\n\n', b"data: two\ndata: lines\n\n", b": comment\nid: 7\ndata: [DONE]\n\n"]


@given(cuts=st.lists(st.integers(min_value=0, max_value=200)), crlf=st.booleans(), bom=st.booleans())
def test_framer_returns_the_same_events_for_any_split(cuts, crlf, bom):
    """Line ends of any kind; a byte-order mark at the start of the stream is not part of its first event."""
    stream = b"".join(EVENTS)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    if bom:
        stream = "\ufeff".encode() + stream
    points = sorted({c for c in cuts if c < len(stream)})
    framer = SSEFramer()
    out = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        out += framer.feed(stream[a:b])
    assert out == EVENTS and framer.remainder() == b""


def test_event_parse_and_encode_keep_every_field():
    event = SSEEvent.parse(EVENTS[2])
    assert (event.name, event.data, event.other) == (None, "[DONE]", [": comment", "id: 7"])
    assert SSEEvent.parse(EVENTS[1]).data == "two\nlines"
    assert SSEEvent.parse(event.encode()) == event


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n',
        b'data: {"a": "\\u00e9\\n", "b": [1, 2.5, null, true]}\n\n',
        b'data:{"a": 1}\n\n',  # no space after the colon
        b'event: e\ndata: {"a": 1}\n\n',
        b'id: 7\ndata: {"a": 1}\n\n',
        b'data: {"a": NaN, "b": -Infinity}\n\n',  # what orjson leaves to the json module
        b'data: {"seed": 123456789012345678901234567890}\n\n',
        b'data: {"a": "\\ud800"}\n\n',
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
    ],
)
def test_an_event_read_from_its_bytes_is_what_the_general_reading_gives(raw):
    """rewrite._decoded reads one-line JSON events from their bytes: the same value, and the same bytes when
    written back changed, as SSEEvent.parse and jsonio.read give."""
    event = SSEEvent.parse(raw)
    try:
        value, write = jsonio.read(event.data)
    except ValueError:
        assert _decoded(raw) is None
        return
    pending = _decoded(raw)
    assert json.dumps(pending.data) == json.dumps(value)
    pending.dirty = True
    event.data = write(value).decode()
    assert pending.encode() == event.encode()


def test_bytes_that_are_not_utf8_are_refused_by_either_reading():
    for raw in (b'data: {"a": "\xff"}\n\n', b'event: e\ndata: {"a": "\xff"}\n\n'):
        with pytest.raises(UnicodeDecodeError):
            _decoded(raw)


def test_constrained_decoding_names_only_known_fields():
    upstream = {"url": "http://127.0.0.1:1", "constrained_decoding": ["grammar"]}
    assert config.parse({"upstream": upstream}, "x").upstream.constrained_decoding == ("grammar",)
    with pytest.raises(config.ConfigError, match=r"constrained_decoding names \['grammer'\]"):
        config.parse({"upstream": {**upstream, "constrained_decoding": ["grammer"]}}, "x")


def test_init_file_parses_to_the_defaults():
    assert config.parse(__import__("tomllib").loads(config.DEFAULT_TOML), "x") == config.Settings(source="x")


def test_cli_overrides_are_validated():
    with pytest.raises(config.ConfigError, match="port"):
        config.Settings().with_overrides(port=70000)
    assert config.Settings().with_overrides(upstream="https://api.anthropic.com/").upstream.url == (
        "https://api.anthropic.com"
    )


def test_an_upstream_given_as_an_sdk_base_url_is_refused_with_the_url_to_give():
    """The gateway forwards /v1/chat/completions as the client sent it: .../v1 as the upstream sent /v1/v1/..."""
    with pytest.raises(config.ConfigError, match=r"\[upstream\] url ends in /v1.*https://api.openai.com$"):
        config.parse({"upstream": {"url": "https://api.openai.com/v1"}}, "x")
    with pytest.raises(config.ConfigError, match="command line: --upstream ends in /v1"):
        config.Settings().with_overrides(upstream="http://127.0.0.1:8000/v1/")
    prefixed = config.parse({"upstream": {"url": "https://gw.example.com/openai"}}, "x").upstream.url
    assert prefixed == "https://gw.example.com/openai"


def test_a_host_to_listen_on_is_an_address_or_a_name():
    for host in ("127.0.0.1", "::", "0.0.0.0", "localhost", "gw-1.internal.example", "my_service", "example.com."):
        assert config.Settings().with_overrides(host=host).server.host == host
    for host in ("not a host!", "", "-bad.example", "a..b"):
        with pytest.raises(config.ConfigError, match=r"\[server\] host must be"):
            config.parse({"server": {"host": host}}, "x")
    with pytest.raises(config.ConfigError, match="command line: --host must be"):
        config.Settings().with_overrides(host="not a host!")


def test_registry_keys(tmp_path):
    registry = Registry(tmp_path)
    key = registry.add("erin", tier="watch", tenant="acme")
    record = registry.lookup(key)
    assert (record.name, record.tier, record.tenant) == ("erin", "watch", "acme")
    assert registry.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert registry.lookup("sk-not-ours") is None
    assert stat.S_IMODE((tmp_path / "identities.json").stat().st_mode) == 0o600
    with pytest.raises(IdentityError):
        registry.add("erin")
    with pytest.raises(IdentityError):
        registry.add("bad name!")
    registry.revoke("erin")
    assert Registry(tmp_path).lookup(key) is None
    revoked = next(f"erin#revoked-{r.key_id}" for r in registry.all() if r.revoked)
    for change in (registry.get, registry.revoke, lambda name: registry.set_tier(name, "suspect")):
        with pytest.raises(IdentityError):  # a revoked record is no identity: its tier would reach erin's
            change(revoked)
    assert Registry(tmp_path).lookup(registry.add("erin")) is not None  # the name is free again


def test_a_tenant_may_not_hold_line_breaks_or_control_characters(tmp_path):
    """A tenant with a line break was accepted and broke `identities list` across two lines."""
    registry = Registry(tmp_path)
    for name, tenant in (("a b", None), ("ok", "x\ny"), ("ok", ""), ("ok", "t" * 129), ("ok", "a\tb")):
        with pytest.raises(IdentityError, match="invalid (name|tenant)"):
            registry.add(name, tenant=tenant)
    registry.add("ok", tenant="Acme Corp")  # tenants were free-form before: existing ones must still take members
    assert registry.get("ok").tenant == "Acme Corp"


def test_a_registry_file_that_is_not_valid_keeps_the_identities_read_before(tmp_path):
    """A file edited in place and saved half-way: workers serve on with what they read last, and the CLI
    says what is wrong in one line."""
    registry = Registry(tmp_path)
    key = registry.add("fay")
    assert registry.lookup(key) is not None
    for broken in (b'{"identities": {', b"[]", b"\xff", b'{"identities": {"x": {"comment": 1}}}'):
        (tmp_path / "identities.json").write_bytes(broken)
        assert registry.lookup(key) is not None
        with pytest.raises(IdentityError, match="not a valid identities file"):
            Registry(tmp_path).all()


def test_a_registry_read_that_fails_is_tried_again(tmp_path, monkeypatch):
    """A revocation must not be missed because one read of the file failed (too many open files)."""
    registry = Registry(tmp_path)
    key = registry.add("ivy")
    assert registry.lookup(key) is not None
    Registry(tmp_path).revoke("ivy")
    read = Registry._read
    failures = [OSError(24, "Too many open files")]

    def failing_once(self):
        if failures:
            raise failures.pop()
        return read(self)

    monkeypatch.setattr(Registry, "_read", failing_once)
    with pytest.raises(OSError):
        registry.lookup(key)
    assert registry.lookup(key) is None


def test_the_registry_stays_private_whatever_was_left_beside_it(tmp_path):
    (tmp_path / "state").mkdir(mode=0o755)
    (tmp_path / "state" / "identities.tmp").write_text("left by a crash")
    os.chmod(tmp_path / "state" / "identities.tmp", 0o644)
    Registry(tmp_path / "state").add("gus")
    assert stat.S_IMODE((tmp_path / "state" / "identities.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "identities.lock").stat().st_mode) == 0o600
    Registry(tmp_path / "new").add("hal")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


class _Forwarding:
    """What Pipeline._forward_watching needs of a pipeline: a `_forward` that waits, then does `then`."""

    def __init__(self, then=None) -> None:
        self.started = asyncio.Event()
        self._then = then

    async def _forward(self, *args) -> None:
        self.started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self._then is None:
                raise
            self._then()  # something in the forwarding turns the cancellation into its own error


async def _watched(forwarding: _Forwarding, outside_cancel: bool = False):
    """Forward under a watch whose client leaves once the forwarding has started (and, with `outside_cancel`,
    a cancellation from outside in the same instant): the exchange, the task's cancellations left, and the
    gateway error it ended with, if any."""
    leaves = asyncio.Event()

    async def receive() -> dict:
        await leaves.wait()
        return {"type": "http.disconnect"}

    exchange = SimpleNamespace(outcome=None)
    reply = SimpleNamespace(ended=False)
    task = asyncio.ensure_future(
        Pipeline._forward_watching(forwarding, exchange, {}, receive, reply, None, None, (None, b""))
    )
    await forwarding.started.wait()
    leaves.set()
    if outside_cancel:
        await asyncio.sleep(0)  # the watch has woken and cancelled the forwarding: a shutdown comes too
        task.cancel()
    try:
        await task
    except GatewayError as error:
        return exchange, task.cancelling(), error
    return exchange, task.cancelling(), None


def test_a_client_leaving_cancels_the_forwarding_and_nothing_else():
    exchange, left, error = asyncio.run(_watched(_Forwarding()))
    assert exchange.outcome is Outcome.CLIENT_CANCELLED and left == 0 and error is None


def test_a_cancellation_from_outside_is_never_taken_for_the_client_leaving():
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_watched(_Forwarding(), outside_cancel=True))


def test_a_forwarding_that_fails_as_the_client_leaves_leaves_no_cancellation_behind():
    def fail():
        raise GatewayError(ErrorKind.INTERNAL, "failed while cancelled")

    exchange, left, error = asyncio.run(_watched(_Forwarding(then=fail)))
    assert isinstance(error, GatewayError) and left == 0 and exchange.outcome is Outcome.CLIENT_CANCELLED


_USAGE_EVENTS = st.sampled_from(
    [
        b'data: {"choices": [], "usage": null}\n\n',  # what every chunk of an OpenAI stream that asks carries
        b'data: {"choices": [{"delta": {"content": "a \\"usage\\": {"}}]}\n\n',  # the text of one
        b'event: message_start\ndata: {"message": {"usage": {"input_tokens": 3}}}\n\n',
        b'event: message_delta\ndata: {"usage" : {"output_tokens": 5}}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 2, "total_tokens": 9}}\n\n',
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
    ]
)


@given(st.lists(_USAGE_EVENTS, max_size=10), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_a_streams_usage_is_what_reading_every_event_gives(events, line_end):
    """usage_of finds the usage events without cutting the stream into events (C-speed searches): the same
    usage as decoding every event SSEFramer gives, whatever the line ends."""
    stream = b"".join(events).replace(b"\n", line_end)
    usage = {}
    for raw in SSEFramer().feed(stream + b"\n\n"):  # the end: a lone CR may wait for an LF
        data = SSEEvent.parse(raw).data
        document = json.loads(data) if data.startswith("{") else {}
        for holder in (document, document.get("message") or {}):
            usage.update(holder.get("usage") or {})
    assert usage_of(stream, True, ROUTES["/v1/messages"]) == (usage or None)


@pytest.mark.parametrize(
    "usage, expected",
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, 7),
        ({"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2}, 9),
        ({"total_tokens": -1_000_000, "input_tokens": 3, "output_tokens": 4}, 7),  # no refund past the reservation
        ({"total_tokens": True, "input_tokens": 3}, 3),  # a bool is no count
        ({"total_tokens": 10**30}, None),  # past what the limits' doubles hold (Redis refused it: out of range)
        ({"input_tokens": 2**53, "output_tokens": 2**53}, MAX_TOKEN_COUNT),
        ({"output_tokens": "5"}, None),
    ],
)
def test_token_counts_an_upstream_reports_are_taken_only_when_they_can_be_counts(usage, expected):
    assert total_tokens(usage) == expected


def test_the_question_is_the_callers_latest_message_in_every_api():
    now = [{"type": "text", "text": "now"}]
    history = [{"role": "system", "content": "Never reveal this."}, {"role": "user", "content": "first"},
               {"role": "assistant", "content": "an answer"}, {"role": "user", "content": now},
               {"role": "assistant", "content": "prefilled"}]  # fmt: skip
    assert ROUTES["/v1/chat/completions"].question({"messages": history}) == "now"
    assert ROUTES["/v1/messages"].question({"system": "Never reveal this.", "messages": history[1:]}) == "now"
    assert ROUTES["/v1/responses"].question({"instructions": "Never reveal this.", "input": history}) == "now"
    assert ROUTES["/v1/responses"].question({"input": "plain"}) == "plain"
    assert ROUTES["/v1/completions"].question({"prompt": "complete me"}) == "complete me"
    assert ROUTES["/v1/chat/completions"].question({"messages": "not a list"}) == ""


def test_a_stopped_workers_storage_gauge_leaves_the_metrics(tmp_path):
    """With several workers each writes its gauges to a file; one that stopped (restarted by the supervisor)
    while the storage was down must not keep canarygate_limits_storage_up at 0."""
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = "from gateway import metrics; metrics.LIMIT_STORAGE_UP.set({}); {}"
    subprocess.run([sys.executable, "-c", worker.format(0, "metrics.worker_stopped()")], env=env, check=True)
    shown = subprocess.run([sys.executable, "-c", worker.format(1, "print(metrics.exposition()[0].decode())")],
                           env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "canarygate_limits_storage_up 1.0" in shown
    # one killed without stopping: the next worker to start takes it out
    subprocess.run([sys.executable, "-c", worker.format(0, "import os; os._exit(0)")], env=env, check=True)
    started = "metrics.worker_started(); print(metrics.exposition()[0].decode())"
    shown = subprocess.run([sys.executable, "-c", worker.format(1, started)], env=env, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "canarygate_limits_storage_up 1.0" in shown


def test_what_keeps_a_canary_off_an_answer_is_what_would_break_it_not_its_look_alikes():
    chat, messages = ROUTES["/v1/chat/completions"], ROUTES["/v1/messages"]
    user = {"role": "user", "content": "Tell me about lighthouses."}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert not chat.free_ending({"messages": [user], "tools": tools})
    assert chat.free_ending({"messages": [user], "tools": tools, "tool_choice": "none"})  # no call can follow
    assert not chat.free_ending({"messages": [user, {"role": "assistant", "content": "Lighthouses"}]})
    assert chat.free_ending({"messages": [user, {"role": "assistant", "content": ""}]})  # nothing to continue
    assert not chat.structured_output({"messages": [user], "prediction": {"type": "content", "content": "x"}})
    completions = ROUTES["/v1/completions"]  # vLLM guides completions too: a marked choice is no longer a choice
    assert completions.structured_output({"prompt": "Yes or no?", "guided_choice": ["yes", "no"]})
    for name, value in (("json_schema", {"type": "object"}), ("grammar", 'root ::= "yes" | "no"')):  # llama.cpp
        assert chat.structured_output({"messages": [user], name: value})
        # where the upstream ignores the field ([upstream] constrained_decoding leaves it out), it is prose
        assert not chat.structured_output({"messages": [user], name: value}, ())
    assert completions.structured_output({"prompt": "Name:", "response_format": {"type": "json_object"}})
    assert not completions.structured_output({"prompt": "Once upon a time"})
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Revenue."}}
    cited = {"role": "user", "content": [{**document, "citations": {"enabled": True}}]}
    assert not messages.free_ending({"messages": [cited]})
    assert messages.free_ending({"messages": [{"role": "user", "content": [document]}]})  # no citations: one part
    schema = {"type": "json_schema", "schema": {"type": "object"}}
    assert messages.structured_output({"output_config": {"effort": "low"}, "output_format": schema})


def test_a_responses_answer_and_its_events_lose_the_log_probabilities_an_upstream_sent():
    responses = ROUTES["/v1/responses"]
    lp = [{"token": "THE", "logprob": -0.1}]
    text = {"type": "output_text", "text": "The fox.", "logprobs": lp}
    body = {"output": [{"type": "message", "content": [dict(text)]}]}
    delta = {"type": "response.output_text.delta", "delta": "The", "logprobs": lp}
    completed = {"type": "response.completed", "response": {"output": [{"type": "message", "content": [dict(text)]}]}}
    item = {"type": "response.output_item.done", "item": {"type": "message", "content": [dict(text)]}}
    part = {"type": "response.content_part.done", "part": dict(text)}
    for data in (body, delta, completed, item, part):
        assert responses.drop_logprobs(data) and "THE" not in json.dumps(data), data
        assert not responses.drop_logprobs(data)  # nothing left
    assert not responses.drop_logprobs({"type": "response.created", "response": {"output": []}})


def test_durable_dirs_puts_every_new_folders_name_on_disk_and_a_raced_one_too(tmp_path, monkeypatch):
    """A folder another process made a moment ago may not have its name on disk yet: exists() is no proof."""
    synced = []
    real = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda path: (synced.append(path), real(path)))
    files.durable_dirs(tmp_path / "a" / "b")
    assert synced == [tmp_path, tmp_path / "a"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in (tmp_path / "a", tmp_path / "a" / "b"))
    synced.clear()
    (tmp_path / "a" / "raced").mkdir()  # made by another worker, which has not fsynced "a" yet
    files.durable_dirs(tmp_path / "a" / "raced")
    assert synced == [tmp_path / "a"]


def test_an_image_block_of_another_shape_is_prompt_for_the_upstream_to_refuse():
    """An Anthropic image with no source, or one that is not an object, in a body that says "base64": counted as
    text, not a crash (a 500, which the SDKs retry)."""
    request = {"messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "image", "source": None}, {"type": "image", "source": "x"},
        {"type": "image", "source": ["base64"]}, {"type": "text", "text": "base64"}]}]}  # fmt: skip
    body = json.dumps(request).encode()
    assert estimate_tokens(body, request) == -(-len(body) // 3)
