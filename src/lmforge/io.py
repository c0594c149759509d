"""Atomic writes: a file or folder that appears complete or not at all.

Every writer in lmforge goes through here, so a crash, a kill or an exception mid-write never leaves a
half-written file that a later run would trust. The recipe is the usual one:

  1. write to a hidden temporary name in the destination's own folder (same file system, so step 3 is a rename,
     not a copy): `.NAME.tmp-XXXXXXXX.SUFFIX` for a file, `.NAME.tmp-XXXXXXXX` for a folder;
  2. flush and fsync the data, so the bytes are on disk before any name points at them;
  3. `os.replace` onto the destination, which is atomic on POSIX and Windows: a reader sees the old content
     or the new, never a mix;
  4. fsync the parent folder, so the rename itself survives a power cut (POSIX only).

On any exception (KeyboardInterrupt included) the temporary is deleted and the destination is untouched.
Missing parent folders are created. Temporaries are made like plain `open()` and `mkdir()` make files, with
the process umask, so a finished file gets the usual permissions.

Files: `atomic_open` (a stream), `atomic_path` (a temporary name, for writers that want a path: matplotlib,
gzip, safetensors) and `write_text_atomic` / `write_bytes_atomic` / `write_json_atomic`.
Folders: `atomic_folder` (build a whole folder, then swap it in), with `fsync_tree` and `replace_folder`.
`write_errors_explained` turns the OSError of a full disk (or a read-only folder) into a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

WRITE_MODES = ("w", "wt", "wb")


def _temporary(path: Path, suffix: str = "") -> Path:
    """A hidden name beside `path` that no other writer picks; `suffix` keeps the extension readers sniff."""
    return path.with_name(f".{path.name.removesuffix(suffix)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the entries of `folder` (a rename into it) durable; folders cannot be opened for fsync on Windows."""
    if os.name == "posix":
        _fsync_file(folder)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write a file at; when the block ends without
    error the file is fsynced and renamed onto `path`. It keeps `path`'s extension, for writers that choose
    the format by name (`figure.savefig`, `gzip.open`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, path.suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """A stream (`mode` "w" or "wt": text in `encoding`; "wb": bytes) that becomes `path` only when the
    block ends without error; until then `path` keeps its old content, and on error it is left untouched."""
    if mode not in WRITE_MODES:
        raise ValueError(f"atomic_open mode={mode!r}; choose one of {', '.join(WRITE_MODES)} (it writes a new file)")
    binary = "b" in mode
    with (
        atomic_path(path) as tmp,
        open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as stream,
    ):
        yield stream


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Writes `text` to `path` atomically, byte for byte (no newline translation)."""
    write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """Writes `json.dumps(obj, indent=indent, **dumps_kwargs)` and a final newline to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under `folder` (itself included) to disk, before the rename that makes
    it visible as complete."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_file(path)
        elif path.is_dir():
            _fsync_folder(path)
    _fsync_folder(folder)


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `path`. An existing `path` is first renamed aside (to
    `.NAME.old-XXXXXXXX`) and deleted after, so at every moment `path` is either the old complete folder or
    the new one (two renames: a folder cannot be replaced in one step while it holds files).

    A symbolic link at `path` (dangling or not) is itself the entry replaced, as a rename replaces it: the link
    is removed and what it pointed at is left alone. Callers that must not drop a link refuse it first."""
    tmp, path = Path(tmp), Path(path)
    if path.is_symlink() or path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_folder(path.parent)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a new empty folder beside `path` (`.NAME.tmp-XXXXXXXX`); when the block ends without error its
    content is fsynced and it replaces `path` (`replace_folder`), and on error it is deleted and `path` is
    left as it was. The caller guards what may be replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def write_errors_explained(target: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Re-raises an OSError from the block (ENOSPC, EDQUOT, EROFS, EACCES... while writing `target`) as a one-line
    RuntimeError naming `target` and the fix, which commands print instead of a traceback. Wrap writes only (a
    read error would be misnamed) and write through the helpers above, which delete their temporaries on the
    error, so that the failure leaves nothing half-written."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise RuntimeError(
            f"disk full (or not writable) while writing {target} ({reason}): free space or choose another {option}"
        ) from error
