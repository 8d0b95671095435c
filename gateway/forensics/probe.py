"""Ask a suspect endpoint the probe set: politely, within limits, and so that an interrupted run resumes.

A suspect endpoint is not ours and may misbehave: each attempt has a deadline for the whole answer and a
cap on its size (an endless or huge answer is cut off, not buffered); timeouts, dropped connections, 429s,
5xx and malformed answers are retried with capped exponential backoff and full jitter, honouring
Retry-After; other 4xx are final. Requests are paced by the probe's own rate limit. Each finished item is
appended to the transcript and flushed to disk at once, so a run stopped at any point loses only what was
in flight, and the next run asks only what the transcript lacks. Items that failed every attempt go to
errors.jsonl and are asked again by the next run.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from ..config import ConfigError
from ..files import write_atomically

TRANSCRIPT = "transcript.jsonl"
ERRORS = "errors.jsonl"
PROBE_SET = "probe-set.jsonl"
SETTINGS = "probe.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    base_url: str  # up to and including /v1
    model: str
    api_key: str | None = field(default=None, repr=False)  # never written anywhere

    def headers(self) -> dict[str, str]:
        # identity encoding: a compressed answer would be inflated before the size cap could stop it
        auth = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"accept-encoding": "identity", **auth}


@dataclass(frozen=True)
class Limits:
    concurrency: int = 4
    rate: float = 4.0  # requests per second at most, across all workers
    timeout: float = 120.0  # seconds for one attempt, the whole answer included
    max_bytes: int = 2_000_000  # an answer larger than this is cut off and fails
    retries: int = 6  # attempts after the first
    backoff: float = 1.0  # seconds: the first retry's ceiling, doubled each time up to backoff_cap
    backoff_cap: float = 60.0
    retry_after_cap: float = 300.0  # the longest Retry-After honoured; a longer one fails the item (resume later)
    max_tokens: int = 600
    temperature: float = 0.7


class AttemptFailed(Exception):
    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.retry_after = retry_after


class Pacer:
    """At most `rate` starts per second, shared by every worker."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    def defer(self, seconds: float) -> None:
        """Start nothing for `seconds` (the endpoint's Retry-After): every worker waits, not only the one told."""
        self._next = max(self._next, time.monotonic() + seconds)

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class Transcript:
    """JSON lines, one per item answered; written and flushed to disk as each item finishes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _drop_torn_line(path)
        self.done = {row["id"] for row in read_rows(path)}

    def append(self, row: dict) -> None:
        append_row(self.path, row)
        self.done.add(row["id"])


def append_row(path: Path, row: dict) -> None:
    """One JSON line, on disk before this returns. Probe files hold prompts and answers from the sealed log,
    so they are readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(_line(row))
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: cut it, so the next line starts clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a run killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):  # bytes: a line torn inside a character must not stop the rest
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(map(_line, rows)))


def _line(row: dict) -> str:
    """A row as one JSON line, readable as written; a suspect's answer may hold a lone surrogate (JSON allows
    "\\ud800"), which has no UTF-8: such a row is written with its escapes."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def prepare(out: Path, target: Target, items: Callable[[], list[dict]], options: dict) -> list[dict]:
    """The probe set of the run in `out`: made and saved by the first run, read back by a resumed one. A
    resumed run must question the same model with the same `options` (what shapes the probe set and the
    answers); its address may have moved (every address is kept)."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    saved = out / SETTINGS
    if saved.exists():
        previous = read_settings(saved)
        if previous.get("model") != target.model:
            raise ConfigError(f"{out} holds a probe of {previous.get('model')}; use another --out")
        if previous.get("options", options) != options:
            changed = ", ".join(k for k in options if previous["options"].get(k) != options[k])
            raise ConfigError(f"{out} was probed with other settings ({changed}); use another --out")
        if target.base_url not in previous.setdefault("base_urls", [previous["base_url"]]):
            previous["base_urls"].append(target.base_url)
            write_atomically(saved, (json.dumps(previous, indent=1) + "\n").encode())
        return read_rows(out / PROBE_SET)
    probe_set = items()
    write_rows(out / PROBE_SET, probe_set)
    settings = {"base_url": target.base_url, "model": target.model, "started": _now(), "items": len(probe_set),
                "options": options}  # fmt: skip
    write_atomically(saved, (json.dumps(settings, indent=1) + "\n").encode())  # a run killed here leaves none
    return probe_set


def read_settings(path: Path) -> dict:
    """A probe's settings file (probe.json), or a clear error where it is not one."""
    try:
        settings = json.loads(path.read_bytes())
    except ValueError:
        settings = None
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), str) for k in ("model", "base_url")):
        raise ConfigError(f"{path}: damaged (not a probe's settings); probe again into another --out")
    return settings


async def run(
    target: Target, limits: Limits, items: list[dict], out: Path, on_done: Callable[[], None] = lambda: None
) -> dict:
    """Ask every item the transcript lacks; returns counts of answered, failed and skipped (already done)."""
    transcript = Transcript(out / TRANSCRIPT)
    pending = [item for item in items if item["id"] not in transcript.done]
    queue: asyncio.Queue = asyncio.Queue()
    for item in pending:
        queue.put_nowait(item)
    counts = {"answered": 0, "failed": 0, "skipped": len(items) - len(pending)}

    async def drain(session: Session) -> None:
        while not queue.empty():
            row = await _ask(session, queue.get_nowait())
            if "text" in row:
                transcript.append(row)
                counts["answered"] += 1
            else:
                append_row(out / ERRORS, row)
                counts["failed"] += 1
            on_done()

    async with Session(target, limits) as session:
        await asyncio.gather(*(drain(session) for _ in range(max(1, limits.concurrency))))
    return counts


async def _ask(session: Session, item: dict) -> dict:
    """One item: its transcript row, or a row with "error" after the last attempt."""
    body = {
        "model": session.target.model,
        "messages": [{"role": "user", "content": item["prompt"]}],
        "max_tokens": session.limits.max_tokens,
        "temperature": session.limits.temperature,
    }
    try:
        (text, finish), attempts = await session.call("/chat/completions", body, _chat_answer)
    except Failed as e:
        return {"id": item["id"], "error": str(e), "attempts": e.attempts, "time": _now()}
    base = {k: v for k, v in item.items() if k != "context"}
    return {**base, "text": text, "finish_reason": finish, "attempts": attempts, "time": _now()}


def _chat_answer(data: bytes) -> tuple[str, str | None]:
    try:
        choice = json.loads(data)["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise AttemptFailed(f"malformed answer (not a chat completion): {data[:120]!r}", True) from None
    if not isinstance(text, str):
        raise AttemptFailed("malformed answer: message content is not text", True)
    return text, choice.get("finish_reason")


class Failed(Exception):
    """Every attempt failed (or one failed for good): says why the last one did."""

    def __init__(self, reason: str, attempts: int, final: bool) -> None:
        super().__init__(reason)
        self.attempts = attempts
        self.final = final  # the endpoint refused for good (a 4xx other than 429, or an answer too large)


class Session:
    """One HTTP client, pacer and retry policy for every request of a probe."""

    def __init__(self, target: Target, limits: Limits) -> None:
        self.target, self.limits = target, limits
        self.pacer = Pacer(limits.rate)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(limits.timeout), headers=target.headers())

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def call(self, path: str, body: dict, read: Callable[[bytes], T]) -> tuple[T, int]:
        """POST with retries; `read` turns a 2xx answer into a value (or raises AttemptFailed)."""
        attempts = 0
        while True:
            attempts += 1
            await self.pacer.wait()
            try:
                status, headers, data = await self.post(path, body)
                _raise_for_status(status, headers, data)
                return read(data), attempts
            except AttemptFailed as e:
                failure = e
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
                failure = AttemptFailed(f"malformed answer ({type(e).__name__})", True)
            if (failure.retry_after or 0) > self.limits.retry_after_cap:
                failure = AttemptFailed(f"{failure}: asked to wait {failure.retry_after:.0f} s; run again later", False)
            if not failure.retryable or attempts > self.limits.retries:
                raise Failed(str(failure), attempts, not failure.retryable)
            if failure.retry_after:
                self.pacer.defer(failure.retry_after)
            ceiling = min(self.limits.backoff_cap, self.limits.backoff * 2 ** (attempts - 1))
            await asyncio.sleep(random.uniform(0, ceiling))

    async def post(self, path: str, body: dict) -> tuple[int, httpx.Headers, bytes]:
        """One request, its whole answer within the deadline and under the size cap."""
        url = self.target.base_url.rstrip("/") + path
        try:
            async with asyncio.timeout(self.limits.timeout):
                async with self.client.stream("POST", url, json=body) as response:
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > self.limits.max_bytes:
                            raise AttemptFailed(f"answer larger than {self.limits.max_bytes} bytes; cut off", False)
                    return response.status_code, response.headers, bytes(data)
        except TimeoutError:
            raise AttemptFailed(f"no complete answer within {self.limits.timeout:g} s", True) from None
        except httpx.RequestError as e:  # transport failures, and bodies that cannot be decoded
            raise AttemptFailed(f"connection failed: {type(e).__name__}", True) from None


def _raise_for_status(status: int, headers: httpx.Headers, data: bytes) -> None:
    if status == 429 or status >= 500:
        raise AttemptFailed(f"HTTP {status}", True, retry_after(headers))
    if status >= 400:
        raise AttemptFailed(f"HTTP {status}: {data[:200]!r}", False)


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the endpoint asks us to wait: retry-after-ms, else Retry-After as seconds or an HTTP date."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
