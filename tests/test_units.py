"""Pure pieces tested alone: SSE framing, settings defaults, identity keys."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import config
from gateway.identity import IdentityError, Registry
from gateway.protocols.sse import SSEEvent, SSEFramer

EVENTS = [b'event: a\ndata: {"x": 1}\n\n', b"data: two\ndata: lines\n\n", b": comment\nid: 7\ndata: [DONE]\n\n"]


@given(cuts=st.lists(st.integers(min_value=0, max_value=200)), crlf=st.booleans())
def test_framer_returns_the_same_events_for_any_split(cuts, crlf):
    stream = b"".join(EVENTS)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
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


def test_init_file_parses_to_the_defaults():
    assert config.parse(__import__("tomllib").loads(config.DEFAULT_TOML), "x") == config.Settings(source="x")


def test_cli_overrides_are_validated():
    with pytest.raises(config.ConfigError, match="port"):
        config.Settings().with_overrides(port=70000)
    assert config.Settings().with_overrides(upstream="https://api.anthropic.com/").upstream.url == (
        "https://api.anthropic.com"
    )


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
    assert Registry(tmp_path).lookup(registry.add("erin")) is not None  # the name is free again
