"""The record stage until the evidence log lands: one JSON line per exchange, whatever its outcome.

Each line is written with a single `write` on a file opened with O_APPEND, so lines from several worker
processes never interleave. It holds metadata only (who, what route, how it ended, timings); no prompt,
answer or credential is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .exchange import Exchange

FILE_NAME = "exchanges.jsonl"


class JSONLinesRecorder:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._fd: int | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def ready(self) -> str | None:
        return None if self._fd is not None else f"record file {self.path} is not open"

    def record(self, exchange: Exchange) -> None:
        line = json.dumps(to_record(exchange), separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())


def to_record(ex: Exchange) -> dict:
    first_byte = None if ex.first_byte_at is None else round((ex.first_byte_at - ex.started) * 1000, 3)
    return {
        "id": ex.id,
        "time": round(ex.started_at, 6),
        "identity": ex.identity.name if ex.identity else None,
        "tier": ex.tier,
        "client": ex.client_ip,
        "method": ex.method,
        "path": ex.path,
        "route": ex.route,
        "model": ex.model,
        "stream": ex.stream,
        "status": ex.status,
        "outcome": ex.outcome.value if ex.outcome else None,
        "error": ex.error,
        "upstream_status": ex.upstream_status,
        "duration_ms": round(ex.elapsed() * 1000, 3),
        "first_byte_ms": first_byte,
        "events": ex.events,
        "bytes_out": ex.bytes_out,
        "usage": ex.usage,
    }
