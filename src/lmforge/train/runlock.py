"""One writer per run folder: an exclusive lock held for the whole run.

Two processes writing one run folder corrupt each other's state: a second `--resume` loads checkpoints the
first one is pruning and dies, or both append to metrics.jsonl. `run_lock` takes an exclusive, non-blocking
`flock` on `run_dir/.lock` (the operating system drops it when the process dies, even by kill -9, so a
crashed run never leaves a stale lock) and records the holder's pid and command for the error message a
second writer gets. Only process 0 of a DDP job locks: the other ranks write nothing there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block; a folder held by another live process is a one-line error
    naming that process. Where `flock` does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        enabled = False
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RuntimeError(
                f"run folder {run_dir} is in use by another process ({holder}); wait for it to finish, stop it, "
                "or choose another --train.name / --out"
            ) from None
        # the holder may have removed the file between our open and our lock: then we locked an orphan
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n".encode())
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding it, so no one else can be mid-lock on this file
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
