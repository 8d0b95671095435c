"""With durability "fsync", nothing that depends on an entry happens before the entry is on disk.

An instrumented file layer notes each fsync of a segment and what it made durable (a write alone, as the
log's appends are, is not); instrumented servers note when the upstream receives a request and when the
gateway sends the last message of each answer. The begin entry must be durable before the request goes
upstream, the end entry before the answer's last byte.
"""

from __future__ import annotations

import os

import httpx
import pytest

from gateway.app import create_app
from gateway.evidence.keys import Keys
from gateway.evidence.reader import LogReader
from gateway.evidence.store import LogStore
from gateway.identity import Registry
from tests.conftest import ServerThread, _settings
from tests.fake_upstream import FakeUpstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Recording:
    def __init__(self, app, events: list, name: str) -> None:
        self.app, self.events, self.name = app, events, name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.name == "upstream":
            self.events.append(("upstream", None))
        request_id = None

        async def recording_send(message):
            nonlocal request_id
            if message["type"] == "http.response.start":
                request_id = dict(message["headers"]).get(b"x-request-id", b"").decode()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.events.append(("last_byte", request_id))
            await send(message)

        await self.app(scope, receive, recording_send if self.name == "gateway" else send)


@pytest.fixture
def instrumented(tmp_path, monkeypatch):
    events: list = []
    written: dict[int, int] = {}  # a segment's descriptor: the log's size once what is written to it is on disk
    append, fsync = LogStore.append, os.fsync

    def noting_append(self, records, sync=True):
        written[self._segment_fd] = self.size + len(records)
        return append(self, records, sync)

    def noting_fsync(fd):
        fsync(fd)
        if fd in written:
            events.append(("durable", written[fd]))

    monkeypatch.setattr(LogStore, "append", noting_append)
    monkeypatch.setattr(os, "fsync", noting_fsync)
    upstream = FakeUpstream()
    with ServerThread(Recording(upstream, events, "upstream")) as up:
        state = tmp_path / "state"
        key = Registry(state).add("olga")
        app = create_app(_settings(state, up.url))
        with ServerThread(Recording(app, events, "gateway")) as gw:
            yield gw.url, key, events, state


def test_entries_are_durable_before_forwarding_and_before_the_last_byte(instrumented):
    url, key, events, state = instrumented
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url) as http:
        for stream in (False, True, False, True):
            assert http.post("/v1/chat/completions", json={**BODY, "stream": stream}, headers=headers).is_success
        assert http.post("/v1/chat/completions", json=BODY).status_code == 401  # rejected: recorded too
    entries = {}
    for item in LogReader(state / "evidence" / "0", Keys.load(state / "keys")).entries(strict=False):
        if item.public["kind"] != "commitment":
            entries[(item.public["id"], item.public["kind"])] = item.index
    ids = [rid for kind, rid in events if kind == "last_byte"]
    assert len(ids) == 5
    upstream_seen = [i for i, (kind, _) in enumerate(events) if kind == "upstream"]
    assert len(upstream_seen) == 4

    def durable_before(position: int, index: int) -> bool:
        return any(kind == "durable" and size > index for kind, size in events[:position])

    for n, rid in enumerate(ids):
        last = events.index(("last_byte", rid))
        assert durable_before(last, entries[(rid, "end")]), f"exchange {n}: last byte before its end entry's fsync"
        if n < 4:
            assert durable_before(upstream_seen[n], entries[(rid, "begin")]), f"exchange {n} forwarded too early"


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_whose_end_entry_cannot_be_written_is_withheld(tmp_path, monkeypatch, stream):
    """The disk fails as the end entry is written (durability fsync): the log fails-stop, and the client gets
    an error instead of an answer that would then be on no record (a whole 200 went out before)."""
    from tests.conftest import STATE_DIRS

    ending = {"written": False}
    append, sync = LogStore.append, LogStore.sync

    def append_noting_ends(self, records, sync=True):
        ending["written"] |= any(b'"kind":"end"' in leaf for leaf, _ in records)
        return append(self, records, sync)

    def failing_sync(self):
        if ending["written"]:
            raise OSError(5, "input/output error (simulated)")
        return sync(self)

    monkeypatch.setattr(LogStore, "append", append_noting_ends)
    monkeypatch.setattr(LogStore, "sync", failing_sync)
    state = tmp_path / "state"
    key = Registry(state).add("olga")
    with ServerThread(FakeUpstream()) as upstream:
        settings = _settings(state, upstream.url)
        STATE_DIRS.remove(state)  # its log is failed on purpose: the suite's audit of every log leaves it out
        with ServerThread(create_app(settings)) as gw, httpx.Client(base_url=gw.url) as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            answer = http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            ready = http.get("/readyz")
    if stream:
        last = answer.text.strip().split("\n\n")[-1]
        assert '"code": "internal_error"' in last and "could not record" in last and "[DONE]" not in answer.text
    else:
        assert answer.status_code == 500 and "could not record" in answer.json()["error"]["message"]
    assert ready.status_code == 503 and "evidence log write failed" in ready.json()["checks"]["record"]
