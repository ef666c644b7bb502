"""The data directory lock: held by ``wardsync serve`` while it runs and by commands that replace the store.

An advisory ``flock`` on ``wardsync.lock`` in the data directory. The kernel drops it when the holder
exits, also after SIGKILL, so a crashed node never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "wardsync.lock"


class DataDirBusy(OSError):
    """Another process holds the data directory (a running node, a restore, a bootstrap)."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        self.data_dir = data_dir
        self.holder = holder
        super().__init__(f"the data directory {data_dir} is in use by {holder or 'another process'}")


def _describe(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode("utf-8", "replace").strip()
    pid, _, what = text.partition(" ")
    return f"wardsync {what} (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def hold(data_dir: Path, purpose: str) -> Iterator[None]:
    """Hold the lock for the body of the ``with``; raises :class:`DataDirBusy` at once if it is taken."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the store makes it: its owner's only
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirBusy(data_dir, _describe(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the lock; the file stays, so no other process races on its inode.
        os.close(fd)


def holder(data_dir: Path) -> str | None:
    """Who holds the lock of ``data_dir`` (a description), or None when nobody does."""
    path = data_dir / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
