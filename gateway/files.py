"""Files written so that a crash leaves the old content or the new, never a part: the one way the evidence
log, the keys, the identity registry and the witness write theirs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def locked(folder: Path, name: str = ".lock"):
    """`folder` (made 0700 if new) held under an exclusive lock on its 0600 lock file: processes that change
    what it holds take turns."""
    if not folder.exists():
        durable_dirs(folder)
    with open(os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_dirs(path: Path) -> None:
    """`path` and every missing folder above it, each made 0700 and its name fsynced into its parent, so that a
    power loss cannot take away a folder whose files were fsynced (and acknowledged) after it was made."""
    missing, target = [], path
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        fsync_dir(folder.parent)
    if not missing:  # another process may have made it and not yet fsynced its name: one fsync settles that
        fsync_dir(target.parent)


def write_all(fd: int, data: bytes) -> None:
    """os.write until everything is written (a short write is not an error; a full disk raises)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until everything is written: a filling disk may write fewer bytes without an error, and the
    next write would leave a hole behind it."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "no byte could be written")
        view, offset = view[written:], offset + written


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a temporary file left by a crash keeps its own mode otherwise
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
