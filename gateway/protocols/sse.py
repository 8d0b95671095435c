"""Server-sent events: cut a byte stream into whole events, and read or rewrite one event.

Framing is cheap (a search for the blank line) and always done, so that each upstream event is forwarded
as soon as it is complete and an error event can be appended on a clean boundary. Parsing an event's
fields is done only when a transform needs to look inside.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


class SSEFramer:
    """Accumulates chunks and returns complete events (each ending in a blank line), in order.

    An event not yet ended is kept in pieces, each searched once for the blank line (with the byte before
    it): joining and searching the whole of it at every chunk made a large event arriving in small chunks
    cost time quadratic in its size."""

    __slots__ = ("_pending", "_cr", "_begun")

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # the event begun and not ended, in pieces (line ends made LF)
        self._cr = b""  # a CR that ended the last chunk: it may pair with an LF still to come
        self._begun = False  # a byte of the stream has come (a byte-order mark before it is dropped)

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._begun:
            chunk = self._without_bom(chunk)
        if self._cr:
            chunk, self._cr = self._cr + chunk, b""
        if b"\r" in chunk:  # CRLF and lone CR end lines too
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._pending
        if pending:
            if pending[-1][-1:] + chunk[:1] != b"\n\n" and b"\n\n" not in chunk:
                if chunk:
                    pending.append(chunk)
                return []
            data = b"".join(pending) + chunk
            pending.clear()
        else:
            data = chunk
        events = []
        start = 0
        while (end := data.find(b"\n\n", start)) >= 0:
            events.append(data[start : end + 2])
            start = end + 2
        if start < len(data):
            pending.append(data[start:])
        return events

    def _without_bom(self, chunk: bytes) -> bytes:
        """The stream's first bytes without a UTF-8 byte-order mark, which the SSE standard drops (it may come
        split over chunks: its start is kept until the rest shows whether it is one)."""
        pending = self._pending.pop() if self._pending else b""
        start = pending + chunk
        if len(start) < 3 and _BOM.startswith(start):
            self._pending.append(start)
            return b""
        self._begun = True
        return start[3:] if start.startswith(_BOM) else start

    def remainder(self) -> bytes:
        """Bytes of an event that never ended (a stream cut mid-event)."""
        return b"".join(self._pending) + self._cr


def first_data(raw: bytes) -> bytes:
    """An event from its first data line's value on, without parsing it: id, event and comment lines may come
    before that line."""
    if raw.startswith(b"data:"):
        start = 5
    else:
        start = raw.find(b"\ndata:")
        if start < 0:
            return b""
        start += 6
    return raw[start + 1 :] if raw[start : start + 1] == b" " else raw[start:]


@dataclass(slots=True)
class SSEEvent:
    """One parsed event. `other` keeps id, retry and comment lines so a rewrite loses nothing."""

    name: str | None
    data: str
    other: list[str]

    @classmethod
    def parse(cls, raw: bytes) -> SSEEvent:
        text = raw.decode("utf-8")
        if text.startswith("data: ") and text.find("\n") == len(text) - 2 and text.endswith("\n\n"):
            return cls(None, text[6:-2], [])  # one data line: most events of a stream, read in one step
        name = None
        data_lines = []
        other = []
        for line in text.split("\n"):
            if not line:
                continue
            field, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if field == "event":
                name = value
            elif field == "data":
                data_lines.append(value)
            else:
                other.append(line)
        return cls(name, "\n".join(data_lines), other)

    def encode(self) -> bytes:
        if self.name is None and not self.other and "\n" not in self.data:
            return f"data: {self.data}\n\n".encode()
        lines = [f"event: {self.name}"] if self.name is not None else []
        lines.extend(self.other)
        lines.extend(f"data: {line}" for line in self.data.split("\n"))
        return ("\n".join(lines) + "\n\n").encode("utf-8")


def event_name(raw: bytes) -> bytes | None:
    """The `event:` field of a raw event, without parsing the rest."""
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


def encode_event(data: str, name: str | None = None) -> bytes:
    return SSEEvent(name, data, []).encode()
