"""What the evidence log says was served with a canary: the prompt, the answer before the canary, the entry.

These are the probe's most telling prompts: a model trained on an identity's answers is most likely to
write that identity's canary after the same question, and most likely to rate it above other phrases after
the same answer. The log seals prompts and answers, so reading them needs the keys. A canary whose prompt
or preceding text already holds a canary-space phrase (a conversation quoting an earlier answer) is left
out: a suspect could repeat the phrase from the prompt, and the context would no longer be independent of
the canary, which both canary tests assume.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass

from ..canary.phrases import Canary, canaries_of, phrases_in
from ..evidence.reader import LogReader
from ..evidence.tenants import Erased
from ..protocols import ROUTES, SlotKind
from ..protocols.sse import SSEEvent, SSEFramer


@dataclass(frozen=True)
class ServedCanary:
    canary: Canary
    log: str  # the log's origin
    entry: int  # the index of the log entry that records the answer (its "end" entry)
    time: str
    prompt: str  # the prompt's text, as the API's dialect reads it
    context: str  # the answer's text before the canary

    def as_json(self) -> dict:
        return {
            "canary": self.canary.id,
            "identity": self.canary.identity,
            "epoch": self.canary.epoch,
            "phrase": self.canary.text,
            "log": self.log,
            "entry": self.entry,
            "time": self.time,
            "prompt": self.prompt,
            "context": self.context,
        }


def served_canaries(reader: LogReader, canary_key: bytes, count: int) -> Iterator[ServedCanary]:
    """Every canary the log records as served, with its prompt and context; erased entries are skipped."""
    begins: dict[str, int] = {}
    owned: dict[tuple[str, int], dict[str, Canary]] = {}
    origin = reader.origin()
    for item in reader.entries(strict=False):
        public = item.public
        if public.get("kind") == "begin":
            begins[public["id"]] = item.index
            continue
        begin = begins.pop(public.get("id"), None) if public.get("kind") == "end" else None
        records = [r for r in public.get("canaries") or () if "id" in r]
        if begin is None or not records:
            continue
        identity = public.get("identity")
        for record in records:
            mine = owned.setdefault((identity, record["epoch"]), {})
            if not mine:
                mine.update((c.id, c) for c in canaries_of(canary_key, identity, record["epoch"], count))
            canary = mine.get(record["id"])
            if canary is None:  # made with another key or count: not ours to read
                continue
            served = _read(reader, begin, item.index, canary, tuple(record.get("part") or ()))
            if served is not None and not phrases_in(served[0]) and not phrases_in(served[1]):
                yield ServedCanary(canary, origin, item.index, public["time"], *served)


def _read(reader: LogReader, begin: int, end: int, canary: Canary, part: tuple) -> tuple[str, str] | None:
    begin_entry = reader.get(begin)
    try:
        opened = reader.open_all(begin_entry)
        answer = reader.open_all(reader.get(end))
    except Erased:
        return None
    try:
        request = json.loads(_value(opened, "prompt") or b"{}")
    except ValueError:
        return None
    begin_public = begin_entry.public
    dialect = ROUTES.get(begin_public.get("path") or "")
    if dialect is None or not isinstance(request, dict):
        return None
    text = answer_text(dialect, _value(answer, "response"), bool(begin_public.get("stream")), part)
    position = text.rfind(canary.text)
    if position < 0:
        return None
    return dialect.question(request), text[:position].rstrip()  # never the system prompt nor the history


def _value(openings: dict, name: str) -> bytes:
    field = openings.get(name)
    return base64.b64decode(field["value"]) if field else b""


def answer_text(dialect, delivered: bytes, stream: bool, part: tuple) -> str:
    """The text of one part of a delivered answer, whole or streamed, as the route's dialect reads it."""
    if not stream:
        try:
            body = json.loads(delivered)
        except ValueError:
            return ""
        return "".join(s.text for s in dialect.body_slots(body) if tuple(s.part) == part)
    state, pieces = dialect.new_stream_state(), []
    for raw in SSEFramer().feed(delivered + b"\n\n"):
        event = SSEEvent.parse(raw)
        try:
            data = json.loads(event.data)
        except ValueError:
            continue
        for slot in dialect.event_slots(state, event.name, data):
            if slot.kind is SlotKind.DELTA and tuple(slot.part) == part:
                pieces.append(slot.text)
    return "".join(pieces)
