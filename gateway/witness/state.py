"""The witness's memory: the latest checkpoint it cosigned for each log it trusts, one 0600 file per log.

Each submission is checked and recorded under that log's lock, and the new checkpoint is on disk (written
atomically, fsynced) before the cosignature is returned: a witness restarted at any moment still refuses
anything inconsistent with what it has cosigned (otherwise two racing or replayed requests could roll it
back). A checkpoint validly signed for a size the witness holds, with another root, is kept under
`conflicts/` beside the one held: two roots for one size, both signed by the log, prove that it forked. (A
failed consistency proof is not kept: anyone can send one.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..evidence.note import ALG_COSIGNATURE_V1, Checkpoint, NoteError, NoteKey, Signer, cosign, open_checkpoint
from ..evidence.verifier import ProofError, signed_by, split_note, verify_consistency
from ..evidence.witnessing import SIZE_CONTENT_TYPE
from ..files import fsync_dir, write_atomically

KEY_FILE = "witness.key"
MAX_CONFLICTS = 1000  # fork proofs kept per witness: one is enough to show a log forked


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


def init_witness(directory: Path, name: str) -> Signer:
    """Create the witness's key (0600) unless it exists; returns it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (directory / KEY_FILE).exists():
        signer = Signer(name, secrets.token_bytes(32), ALG_COSIGNATURE_V1)
        write_atomically(directory / KEY_FILE, (signer.skey() + "\n").encode())
    return load_cosigner(directory)


def load_cosigner(directory: Path) -> Signer:
    path = directory / KEY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no witness key; run `canarygate witness init --dir {directory} --name NAME`")
    signer = Signer.parse(path.read_text().strip())
    if signer.algorithm != ALG_COSIGNATURE_V1:
        raise NoteError(f"{path}: not a cosignature key")
    return signer


class WitnessState:
    def __init__(self, directory: Path, logs: list[NoteKey]) -> None:
        self.dir = directory
        self.cosigner = load_cosigner(directory)
        self._logs: dict[str, list[NoteKey]] = {}
        for key in logs:
            self._logs.setdefault(key.name, []).append(key)
        for folder in ("logs", "conflicts"):
            (directory / folder).mkdir(mode=0o700, exist_ok=True)
        fsync_dir(directory)  # the folders' entries too: a witness that lost `logs` would trust anything shown
        self._lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:  # one process per state folder: two would each check against a state the other is changing
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{directory}: another witness process is using this folder") from None
        self._locks = {origin: asyncio.Lock() for origin in self._logs}

    def close(self) -> None:
        os.close(self._lock_fd)

    def _path(self, origin: str) -> Path:
        return self.dir / "logs" / hashlib.sha256(origin.encode()).hexdigest()

    def latest(self, origin: str) -> str | None:
        """The latest checkpoint cosigned for `origin`, with the log's signature and this witness's."""
        path = self._path(origin)
        return path.read_text() if path.exists() else None

    async def add(self, old: int, proof: list[bytes], note: str) -> Answer:
        try:
            origin = Checkpoint.parse(split_note(note)[0]).origin
        except NoteError as e:
            return Answer(400, f"malformed checkpoint: {e}\n")
        if origin not in self._logs:
            return Answer(404, f"unknown log {origin!r}\n")
        try:
            checkpoint = open_checkpoint(note, self._logs[origin])
        except NoteError:
            return Answer(403, "no signature by a trusted key of this log\n")
        if old > checkpoint.size:
            return Answer(400, "the old size is larger than the checkpoint's\n")
        if (old == 0 or old == checkpoint.size) and proof:
            return Answer(400, "a proof from size 0, or between equal sizes, must be empty\n")
        async with self._locks[origin]:
            return await self._decide(origin, old, proof, note, checkpoint)

    async def _decide(self, origin: str, old: int, proof: list[bytes], note: str, checkpoint: Checkpoint) -> Answer:
        stored_note = self.latest(origin)
        stored = Checkpoint.parse(split_note(stored_note)[0]) if stored_note else None
        held = stored.size if stored else 0
        if old != held:
            return Answer(409, f"{held}\n", SIZE_CONTENT_TYPE)
        if held > 0:  # every tree extends the empty one
            if old == checkpoint.size and checkpoint.root != stored.root:
                await self._keep_conflict(stored_note, note)  # two roots for one size, both signed: a fork
                return Answer(409, f"{held}\n", SIZE_CONTENT_TYPE)
            try:
                verify_consistency(old, checkpoint.size, stored.root, checkpoint.root, proof)
            except ProofError as e:  # a bad proof proves nothing (anyone can send one): nothing is kept
                return Answer(422, f"inconsistent with the checkpoint held: {e}\n")
            if split_note(note)[0] == split_note(stored_note)[0]:  # the one held, again: its cosignature stands
                return Answer(200, stored_note[stored_note.rindex("\n", 0, -1) + 1 :])  # (no write for a replay)
        note = self._signed_by_log(note, origin)
        cosignature = cosign(note, self.cosigner, int(time.time()))
        record = note + cosignature
        await asyncio.get_running_loop().run_in_executor(None, write_atomically, self._path(origin), record.encode())
        return Answer(200, cosignature)

    def _signed_by_log(self, note: str, origin: str) -> str:
        """The note with only the log's valid signature lines: what else a submitter attached is not this
        witness's to serve (a planted line under its name would make its own cosignature look forged)."""
        text, _ = split_note(note)
        kept = []
        for line in note[len(text) + 1 :].splitlines(keepends=True):
            with contextlib.suppress(NoteError):
                if any(signed_by(text + "\n" + line, key) is not None for key in self._logs[origin]):
                    kept.append(line)
        return text + "\n" + "".join(kept)

    async def _keep_conflict(self, held: str, offered: str) -> None:
        """Keep the two signed checkpoints, once per pair, up to MAX_CONFLICTS files."""
        data = f"held:\n{held}\noffered:\n{offered}".encode()
        name = hashlib.sha256(data).hexdigest()[:32] + ".txt"
        folder = self.dir / "conflicts"
        if (folder / name).exists() or sum(1 for _ in folder.iterdir()) >= MAX_CONFLICTS:
            return
        await asyncio.get_running_loop().run_in_executor(None, write_atomically, folder / name, data)
