"""Apply a transform to a whole answer or to a stream of events, keeping the stream's shape.

Streaming rule: one downstream event per upstream event, in order; events are never merged or dropped.
Text a rewriter holds back moves to a later event of the same part. When a part's end cannot carry text
(Anthropic's content_block_stop, the Responses API's output_text.done), the last event that carried the
part's text is held until the next event of that part arrives or the part ends, and the flushed text is
appended to it; events behind a held event wait so that order is kept. With a rewriter that holds
nothing back (or no transform at all), nothing is ever held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from . import jsonio
from .protocols import Dialect, Slot, SlotKind
from .protocols.sse import SSEEvent
from .stages import TextRewriter

RewriterFactory = Callable[[tuple], TextRewriter | None]


def rewrite_body(dialect: Dialect, body: dict[str, Any], open_rewriter: RewriterFactory) -> bool:
    """Rewrite every text part of a whole answer in place, and empty any log-probabilities it carries (they
    would show the tokens the rewriting replaced); True if anything changed."""
    changed = dialect.drop_logprobs(body)
    for slot in dialect.body_slots(body):
        rewriter = open_rewriter(slot.part)
        if rewriter is None:
            continue
        original = slot.text
        text = rewriter.whole(original)
        if text != original:
            slot.set(text)
            changed = True
    return changed


class _Pending:
    """An event waiting to be sent: unparsed bytes, or a decoded event whose slots may still change."""

    __slots__ = ("raw", "event", "data", "write", "open_parts", "carriers", "dirty")

    def __init__(self, raw: bytes, event: SSEEvent | None = None, data: Any = None, write=None) -> None:
        self.raw = raw
        self.event = event
        self.data = data
        self.write = write  # how the data is written back as it was read (jsonio.read)
        self.open_parts: set[tuple] = set()
        self.carriers: dict[tuple, Slot] = {}
        self.dirty = False

    def encode(self) -> bytes:
        if not self.dirty:
            return self.raw
        if self.event is None:  # one data line read from its bytes (_decoded): compact JSON holds no line break
            return b"data: " + self.write(self.data) + b"\n\n"
        self.event.data = self.write(self.data).decode()
        return self.event.encode()


def _decoded(raw: bytes) -> _Pending | None:
    """The event with its JSON data read, or None when its data is no JSON ("[DONE]", comments, keep-alives);
    bytes that are not UTF-8 raise UnicodeDecodeError, as SSEEvent.parse does. Most events are one `data:` line
    of JSON that orjson reads: that is read from the bytes, with no SSEEvent (decoding the event to text and its
    data back to bytes took a third of the stream parser's time)."""
    if raw.startswith(b"data: {") and raw.find(b"\n") == len(raw) - 2 and raw.endswith(b"\n\n"):
        done, data = jsonio.orjson_reads(raw[6:-2])
        if done:  # what `read` gives, written back by `dumps`
            return _Pending(raw, None, data, jsonio.dumps)
    event = SSEEvent.parse(raw)
    try:
        data, write = jsonio.read(event.data)
    except ValueError:
        return None
    return _Pending(raw, event, data, write)


class StreamRewrite:
    """Feed it upstream events one by one; it returns the events ready to go downstream, in order."""

    def __init__(self, dialect: Dialect, open_rewriter: RewriterFactory) -> None:
        self._dialect = dialect
        self._open_rewriter = open_rewriter
        self._state = dialect.new_stream_state()
        self._rewriters: dict[tuple, TextRewriter | None] = {}
        self._delivered: dict[tuple, list[str]] = {}
        self._held: dict[tuple, _Pending] = {}
        self._queue: deque[_Pending] = deque()

    def push(self, raw: bytes) -> list[bytes]:
        try:
            pending = self._rewrite(raw)
        except Exception:
            self._drop_unqueued()
            raise
        self._queue.append(pending)
        return self._release()

    def _drop_unqueued(self) -> None:
        """An event failed part way through its slots and goes nowhere: a part whose held text it took ends
        here, unflushed (text flushed into that event would be lost, and a canary recorded but never sent)."""
        for part, holder in list(self._held.items()):
            if holder not in self._queue:  # by identity: a pending event has no equality of its own
                del self._held[part]
                self._rewriters[part] = None

    def close(self) -> list[bytes]:
        """The stream ended (cleanly or not): flush every part still open and release everything."""
        for part in list(self._rewriters):
            self._end(part, None)
        for pending in self._queue:
            pending.open_parts.clear()
        return self._release()

    def _rewrite(self, raw: bytes) -> _Pending:
        pending = _decoded(raw)
        if pending is None:
            return _Pending(raw)  # nothing to rewrite
        name = pending.event.name if pending.event is not None else None
        pending.dirty = self._dialect.drop_logprobs(pending.data)  # an upstream's, unasked: see rewrite_body
        for slot in self._dialect.event_slots(self._state, name, pending.data):
            if slot.kind is SlotKind.DELTA:
                self._delta(slot, pending)
            elif slot.kind is SlotKind.END:
                self._end(slot.part, pending)
            else:
                self._aggregate(slot, pending)
        return pending

    def _rewriter(self, part: tuple) -> TextRewriter | None:
        if part not in self._rewriters:
            rewriter = self._rewriters[part] = self._open_rewriter(part)
            if rewriter is not None:
                self._delivered[part] = []
        return self._rewriters[part]

    def _delta(self, slot: Slot, pending: _Pending) -> None:
        rewriter = self._rewriter(slot.part)
        if rewriter is None:
            return
        self._unhold(slot.part)
        original = slot.text
        text = rewriter.feed(original)
        self._delivered[slot.part].append(text)
        if text != original:
            slot.set(text)
            pending.dirty = True
        pending.carriers[slot.part] = slot
        if rewriter.holding:
            pending.open_parts.add(slot.part)
            self._held[slot.part] = pending

    def _end(self, part: tuple, pending: _Pending | None) -> None:
        rewriter = self._rewriters.get(part)
        if rewriter is None:
            return
        self._rewriters[part] = None  # ended: a stray later delta is passed through, not re-opened
        rest = rewriter.flush()
        holder = self._unhold(part)
        if not rest:
            return
        carrier = holder or (pending if pending is not None and part in pending.carriers else None)
        if carrier is None:
            raise RuntimeError(f"text for part {part} flushed with no event to carry it")
        slot = carrier.carriers[part]
        slot.set(slot.text + rest)
        carrier.dirty = True
        self._delivered[part].append(rest)

    def _aggregate(self, slot: Slot, pending: _Pending) -> None:
        if self._rewriters.get(slot.part) is not None:  # a part no event ended (an upstream that sends no
            self._end(slot.part, None)  # *.done): ended here, so that the aggregate holds all of its text
        delivered = self._delivered.get(slot.part)
        if delivered is None:
            return
        text = "".join(delivered)
        if text != slot.text:
            slot.set(text)
            pending.dirty = True

    def _unhold(self, part: tuple) -> _Pending | None:
        holder = self._held.pop(part, None)
        if holder is not None:
            holder.open_parts.discard(part)
        return holder

    def _release(self) -> list[bytes]:
        ready = []
        while self._queue and not self._queue[0].open_parts:
            ready.append(self._queue.popleft().encode())
        return ready
