"""The log's side of the C2SP tlog-witness protocol: each new checkpoint goes to every configured witness
with a consistency proof from the last checkpoint that witness cosigned, and the cosignatures are kept.

A witness cosigns only a checkpoint consistent with everything it has seen of this log, so a log that
showed two different trees to two parties cannot get both cosigned by one witness, and a bundle verifier
that requires witness cosignatures cannot be shown a tree no witness saw. Submission runs in the
background, one task per witness, always for the newest checkpoint (older ones are skipped, not queued).
A witness that answers that it saw a tree inconsistent with this log's (409 for another root at one size
or a larger tree, 422 for a failed proof) raises an alarm: an error log line and a metric, since it means
this log was forked, rolled back, or another process signs with its key.

`add_checkpoint_body` and `parse_add_checkpoint` are the request format, shared with `gateway.witness`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from prometheus_client import Counter, Gauge

from .verifier import Checkpoint, NoteError, NoteKey, signed_by

log = logging.getLogger("canarygate.evidence")

SIZE_CONTENT_TYPE = "text/x.tlog.size"
MAX_PROOF_LINES = 63
RETRY_SECONDS = 5.0

COSIGNED_SIZE = Gauge(
    "canarygate_witness_cosigned_size", "Tree size of the latest checkpoint each witness cosigned", ["witness"]
)
WITNESS_FAILURES = Counter(
    "canarygate_witness_failures_total",
    "Failed submissions to witnesses: unreachable, refused, or conflict (the witness saw another tree)",
    ["witness", "kind"],
)


class BadRequest(ValueError):
    """An add-checkpoint body that does not follow the protocol."""


def add_checkpoint_body(old: int, proof: list[bytes], note: str) -> bytes:
    lines = [f"old {old}"] + [base64.b64encode(p).decode() for p in proof]
    return ("\n".join(lines) + "\n\n" + note).encode()


def parse_add_checkpoint(body: bytes) -> tuple[int, list[bytes], str]:
    """(old size, consistency proof, checkpoint note) of an add-checkpoint request body."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    lines = head.split("\n")
    if not sep or not lines[0].startswith("old "):
        raise BadRequest("expected an `old <size>` line, proof lines, a blank line and a checkpoint")
    size = lines[0][4:]
    # at most 20 digits (a tree's size is 64 bits), which also keeps int() under Python's digit limit
    if not (size.isascii() and size.isdigit() and len(size) <= 20) or str(int(size)) != size:
        raise BadRequest("the old size must be a decimal number without leading zeroes")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise BadRequest(f"more than {MAX_PROOF_LINES} consistency proof lines")
    try:
        proof = [base64.b64decode(line, validate=True) for line in lines[1:]]
    except ValueError:
        raise BadRequest("a consistency proof line is not base64") from None
    return int(size), proof, note


@dataclass(frozen=True)
class Witness:
    url: str  # the submission prefix; add-checkpoint is appended
    key: NoteKey

    @property
    def name(self) -> str:
        return self.key.name


class Conflict(Exception):
    """A witness saw a tree of this log that the log's own tree does not extend."""


class Witnesses:
    def __init__(
        self,
        witnesses: list[Witness],
        proof: Callable[[int, int], list[bytes]],
        keep: Callable[[str], Awaitable[None]],
        timeout: float = 10.0,
    ) -> None:
        """`proof(old, new)` gives a consistency proof of this log; `keep(note)` stores a cosigned note."""
        self._witnesses = witnesses
        self._proof = proof
        self._keep = keep
        self._client = httpx.AsyncClient(timeout=timeout)
        self._latest: tuple[str, Checkpoint] | None = None
        self._wake = {w.name: asyncio.Event() for w in witnesses}
        self.cosigned = {w.name: 0 for w in witnesses}  # size of the latest checkpoint each one cosigned
        self._known = {w.name: 0 for w in witnesses}  # the size each one last said it holds
        self.conflicts: list[str] = []
        self._failing: set[str] = set()  # whose last attempt failed: not waited for at close
        self._closed = False
        self._tasks = [asyncio.get_running_loop().create_task(self._run(w)) for w in witnesses]

    def submit(self, note: str, checkpoint: Checkpoint) -> None:
        self._latest = (note, checkpoint)
        for event in self._wake.values():
            event.set()

    async def flush(self, timeout: float) -> None:
        """Wait until every reachable witness has cosigned the latest checkpoint, or `timeout` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._latest and any(
                    size < self._latest[1].size and name not in self._failing for name, size in self.cosigned.items()
                ):
                    await asyncio.sleep(0.02)

    async def close(self, timeout: float = 5.0) -> None:
        await self.flush(timeout)
        self._closed = True  # not cancellation alone: wait_for can swallow a cancel that races its wake-up
        for event in self._wake.values():
            event.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self, witness: Witness) -> None:
        wake = self._wake[witness.name]
        retry = None
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), retry)
            wake.clear()
            if self._closed:
                return
            if self._latest is None or self.cosigned[witness.name] >= self._latest[1].size:
                retry = None
                continue
            note, checkpoint = self._latest
            try:
                await self._submit(witness, note, checkpoint)
                retry = None
                self._failing.discard(witness.name)
            except Conflict as e:
                self._failing.add(witness.name)
                WITNESS_FAILURES.labels(witness.name, "conflict").inc()
                self.conflicts.append(str(e))
                log.error("witness %s: %s", witness.name, e)
                retry = None  # the next checkpoint tries again; this one cannot succeed
            except (httpx.HTTPError, NoteError, ValueError, OSError) as e:  # OSError: keeping its cosignature
                self._failing.add(witness.name)
                WITNESS_FAILURES.labels(witness.name, "unreachable_or_refused").inc()
                log.warning("witness %s: checkpoint %d not cosigned: %s", witness.name, checkpoint.size, e)
                retry = RETRY_SECONDS

    async def _submit(self, witness: Witness, note: str, checkpoint: Checkpoint) -> None:
        for _ in range(3):  # a 409 tells the size the witness holds; then one more try with the right proof
            old = self._known[witness.name]
            proof = self._proof(old, checkpoint.size) if 0 < old < checkpoint.size else []
            response = await self._client.post(
                witness.url.rstrip("/") + "/add-checkpoint", content=add_checkpoint_body(old, proof, note)
            )
            if response.status_code == 200:
                await self._accept(witness, note, checkpoint, response.text)
                return
            if response.status_code == 409 and response.headers.get("content-type", "").startswith(SIZE_CONTENT_TYPE):
                held = int(response.text.strip())
                if held == old or held > checkpoint.size:
                    raise Conflict(
                        f"holds a checkpoint of size {held} that this log's checkpoint of size {checkpoint.size} "
                        "does not extend: this log was forked or rolled back, or another process signs with its key"
                    )
                self._known[witness.name] = held
                continue
            if response.status_code == 422:
                raise Conflict(f"the consistency proof from size {old} failed: it saw another tree of this log")
            raise ValueError(f"answered {response.status_code}: {response.text[:200]}")
        raise ValueError("the witness kept changing the size it holds")

    async def _accept(self, witness: Witness, note: str, checkpoint: Checkpoint, lines: str) -> None:
        """Keep the witness's own cosignature line, once verified; any other line it sent is dropped (a
        witness must not be able to plant lines that break other witnesses' cosignatures)."""
        for line in lines.splitlines():
            cosigned = note + line + "\n"
            try:
                if signed_by(cosigned, witness.key) is not None:
                    break
            except NoteError:
                continue
        else:
            raise NoteError("the answer holds no valid cosignature by the witness's key")
        await self._keep(cosigned)
        self._known[witness.name] = self.cosigned[witness.name] = checkpoint.size
        COSIGNED_SIZE.labels(witness.name).set(checkpoint.size)
