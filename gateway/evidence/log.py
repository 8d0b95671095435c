"""The evidence log as the gateway uses it: appends from the event loop, group commit, checkpoints.

`append()` queues an entry and returns a future that resolves to the entry's index once the entry is on
disk (its segment fsynced). One writer task takes whatever is queued, every `batch_interval` seconds at
most (entries that nobody waits for are given that long to gather), seals and writes it as one
batch on the event loop (a few microseconds an entry), then waits for one fsync in a helper thread (group
commit), so the loop never blocks on the disk. With durability
"batch" callers do not wait: an entry reaches disk within about `batch_interval` plus one fsync, which is
the window a power loss can take. With "fsync" the pipeline waits for it where it matters (see recorder.py).

Checkpoints are signed every `checkpoint_every` entries or `checkpoint_interval` seconds (when the tree
grew) and at close, only over entries already fsynced, and only after checking that the new tree is
consistent with the previous checkpoint. Each checkpoint then goes to the configured witnesses in the
background (witnessing.py); their cosignatures land in `cosignatures.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..files import durable_dirs, write_atomically
from . import entry, merkle, note
from .keys import Keys
from .store import LogStore
from .tenants import TenantKeys
from .witnessing import Witness, Witnesses

log = logging.getLogger("canarygate.evidence")


class EvidenceLog:
    def __init__(
        self,
        directory: Path,
        keys: Keys,
        origin: str,
        batch_interval: float = 0.002,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        segment_bytes: int = 64 * 1024 * 1024,
        witnesses: tuple[Witness, ...] = (),
    ) -> None:
        self.origin = origin
        self.store = LogStore(directory, segment_bytes)
        self._keys = keys
        self._signer = note.Signer(origin, keys.signer.seed)
        self._batch_interval = batch_interval
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._queue: list[tuple[bytes, bytes, str | None, str | None, asyncio.Future | None]] = []
        self._tenant_keys = TenantKeys(keys.directory)
        self._tenant_sealers: dict[str, entry.Sealer] = {}
        self._wake = asyncio.Event()
        self._waiter = asyncio.Event()  # set when an entry that is waited for is queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evidence-writer")
        self._writer: asyncio.Task | None = None
        self._last_checkpoint: note.Checkpoint | None = None
        self._checkpointed_at = time.monotonic()
        self._closing = False
        self.failure: str | None = None
        self._sealer: entry.Sealer | None = None
        self._sealer_for: tuple[int, int] | None = None  # (key epoch, segment) the sealer's data key is for
        self._witness_list = witnesses
        self.witnesses: Witnesses | None = None

    @property
    def keys_directory(self) -> Path:
        return self._keys.directory

    @property
    def verifier(self) -> note.NoteKey:
        return self._signer.verifier

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)
        self._writer = loop.create_task(self._run())
        if self._witness_list:
            self.witnesses = Witnesses(list(self._witness_list), self._consistency, self._keep_cosigned)
            if self._last_checkpoint is not None:  # the last one may never have reached them
                last = self._last_checkpoint
                self.witnesses.submit(self.store.checkpoints()[-1], last)

    def _consistency(self, old: int, new: int) -> list[bytes]:
        return merkle.consistency_proof(self.store.subtree, old, new)

    async def _keep_cosigned(self, note_text: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.add_cosigned, note_text)

    def _open(self) -> None:
        durable_dirs(self.store.dir)
        origin_file = self.store.dir / "origin"
        if not origin_file.exists():
            write_atomically(origin_file, (self.origin + "\n").encode())
        elif origin_file.read_text().strip() != self.origin:
            raise RuntimeError(
                f"{self.store.dir} is the log of {origin_file.read_text().strip()!r}, not "
                f"{self.origin!r}: keep [evidence] origin as it was, or use another state folder"
            )
        previous = self.store.checkpoints() if (self.store.dir / "checkpoints.log").exists() else []
        if previous:
            self._last_checkpoint = self._open_checkpoint(previous[-1])
        last = self._last_checkpoint
        self._refuse_a_rollback(last.size if last else 0)
        self.store.open(self._keys.current_epoch, (last.size, last.root) if last else None)
        covered = last.size if last else 0
        if self.store.size > covered:  # the next checkpoint signs them as they are: say so, where someone looks
            log.warning(
                "%s: entries %d-%d are under no checkpoint (written just before a crash, or its checkpoints were "
                "removed); the next checkpoint signs them as found",
                self.store.dir, covered, self.store.size - 1,
            )  # fmt: skip

    def _refuse_a_rollback(self, size: int) -> None:
        """The latest checkpoint as served (the `checkpoint` file) is never beyond checkpoints.log's last: if it
        is, checkpoints.log was cut back (or removed), and signing the entries found now could sign others."""
        served = self.store.dir / "checkpoint"
        if not served.exists():
            return
        try:
            latest = note.open_checkpoint(served.read_text("utf-8", "replace"), self._keys.verifiers(self.origin))
        except note.NoteError:
            return  # not this log's signature: it vouches for nothing (log verify says more)
        if latest.size > size:
            raise RuntimeError(
                f"{self.store.dir}: the log signed a checkpoint of {latest.size} entries (the checkpoint file), but "
                f"checkpoints.log ends at {size}: it was cut back or removed. Nothing more is signed; run "
                "`canarygate log verify` and restore the folder from a copy"
            )

    def _open_checkpoint(self, text: str) -> note.Checkpoint:
        """The latest checkpoint, signed by the current key or (after a rotation) an earlier one."""
        try:
            return note.open_checkpoint(text, self._keys.verifiers(self.origin))
        except note.NoteError:
            pass
        raise RuntimeError(f"{self.store.dir}: the latest checkpoint is signed by none of the log's keys")

    def append(
        self, leaf: bytes, openings: bytes, identity: str | None, wait: bool = True, tenant: str | None = None
    ) -> asyncio.Future | None:
        """Queue an entry (its canonical leaf and packed openings). With `wait`, a future gives its index
        once it is on disk; without, nothing does, and a failure to write shows in `failure` (and the log's
        readiness). Once the log has failed or is closing, appends raise. `tenant`: whose data this is, sealed
        under that tenant's key so that it can be erased ("" for none); None: the log's own, never erased."""
        if self.failure or self._closing:
            raise RuntimeError(self.failure or "the evidence log is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((leaf, openings, identity, tenant, future))
        self._wake.set()
        if wait:
            self._waiter.set()  # ends a gathering that only entries nobody waits for began
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        behind = False  # entries came while the last batch was written
        while not (self._closing and not self._queue) and not self.failure:
            with contextlib.suppress(TimeoutError):  # time-based checkpoints need a wake-up when idle
                await asyncio.wait_for(self._wake.wait(), self._checkpoint_interval)
            if self._queue and not self._closing:
                await self._gather(behind)
            self._wake.clear()
            batch, self._queue = self._queue, []
            try:
                if batch:
                    # a new segment (rarely) and the fsync wait in a helper thread; sealing and writing are quick
                    epoch = self._keys.current_epoch
                    if self.store.needs_roll(epoch):  # a new file and two fsyncs: off the loop
                        await loop.run_in_executor(self._executor, self.store.roll_if_needed, epoch)
                    tenants = {item[3] for item in batch} - {None}
                    keys = await loop.run_in_executor(self._executor, self._tenant_keys_for, tenants) if tenants else {}
                    first = self._write(batch, epoch, keys)
                    await loop.run_in_executor(self._executor, self.store.sync)
                    for offset, (*_, future) in enumerate(batch):
                        if future is not None and not future.done():
                            future.set_result(first + offset)
                await self._maybe_checkpoint(force=False)
            except Exception as error:  # fail-stop: a log that lost a write must not sign past it
                log.exception("evidence log write failed; no more entries are accepted")
                self.failure = f"evidence log write failed: {type(error).__name__}"
                for *_, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(error)
            behind = bool(self._queue)
        self._fail_queued()

    async def _gather(self, behind: bool) -> None:
        """Let the batch gather, to be written and fsynced once (group commit): for batch_interval behind a
        batch just written; and, when no entry in it is waited for (durability "batch"), until an entry that
        is waited for comes or batch_interval has passed, so that at one request at a time a request's begin
        and end share one batch instead of taking one each."""
        if behind:
            await asyncio.sleep(self._batch_interval)
            return
        self._waiter.clear()
        if not any(future is not None for *_, future in self._queue):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiter.wait(), self._batch_interval)

    def _fail_queued(self) -> None:
        """After a failed write, what was queued since will never be written: say so to whoever waits."""
        for *_, future in self._queue:
            if future is not None and not future.done():
                future.set_exception(RuntimeError(self.failure or "the evidence log is closed"))

    def _tenant_keys_for(self, tenants: set[str]) -> dict[str, tuple[str, bytes]]:
        """Each tenant's key for today (made if missing: a file write, so in the writer thread)."""
        return {tenant: self._tenant_keys.current(tenant) for tenant in tenants}

    def _write(self, batch, epoch: int, tenant_keys: dict[str, tuple[str, bytes]]) -> int:
        store = self.store
        if self._sealer_for != (epoch, store.segment.number):
            self._sealer = entry.Sealer(entry.data_key(self._keys.masters[epoch], self.origin, store.segment.number))
            self._sealer_for = (epoch, store.segment.number)
        first = store.size
        keys: dict[str | None, tuple[str, entry.Sealer]] = {None: ("", self._sealer)}
        records = []
        for offset, (leaf, openings, identity, tenant, _) in enumerate(batch):
            if tenant not in keys:
                keys[tenant] = self._tenant_sealer(*tenant_keys[tenant])
            reference, sealer = keys[tenant]
            records.append((leaf, entry.seal_record(sealer, first + offset, identity, openings, reference)))
        store.append(records, sync=False)
        return first

    def _tenant_sealer(self, reference: str, key: bytes) -> tuple[str, entry.Sealer]:
        if reference not in self._tenant_sealers:
            if len(self._tenant_sealers) > 4096:  # yesterday's and shredded keys
                self._tenant_sealers.clear()
            self._tenant_sealers[reference] = entry.Sealer(key)
        return reference, self._tenant_sealers[reference]

    async def _maybe_checkpoint(self, force: bool) -> None:
        """Sign a checkpoint over the entries fsynced so far, if one is due and consistent with the last."""
        size = self.store.size
        last = self._last_checkpoint
        grown = size - (last.size if last else 0)
        due = grown >= self._checkpoint_every or time.monotonic() - self._checkpointed_at >= self._checkpoint_interval
        if grown <= 0 or not (due or force):
            return
        checkpoint = note.Checkpoint(self.origin, size, self.store.root(size))
        if last is not None:
            proof = merkle.consistency_proof(self.store.subtree, last.size, size)
            merkle.verify_consistency(last.size, size, last.root, checkpoint.root, proof)
        signed = note.sign_checkpoint(checkpoint, self._signer)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.add_checkpoint, signed)
        self._last_checkpoint = checkpoint
        self._checkpointed_at = time.monotonic()
        if self.witnesses is not None:
            self.witnesses.submit(signed, checkpoint)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._waiter.set()
        if self._writer is not None:
            await self._writer
        if not self.failure:
            await self._maybe_checkpoint(force=True)
        if self.witnesses is not None:
            await self.witnesses.close()
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown()
