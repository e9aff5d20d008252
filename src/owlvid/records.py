"""Resumable JSON-lines record files (batch output, evaluation predictions): one writer at a time, lines
appended whole and fsync'd, and on a rerun the ids already written.

A run holds `exclusive(path)` (an `flock` on PATH.lock, which records the holder's PID) from before it reads
the file until it ends, so a second run on the same file exits at once naming the first; the kernel drops the
lock with the process, so a `kill -9` leaves nothing that blocks the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked against each other
    fcntl = None  # type: ignore[assignment]


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a record file: PATH.lock beside it (present only while a run holds it), symbolic
    links resolved so that two names of one file share one lock."""
    path = Path(path).expanduser().resolve()
    return path.with_name(path.name + ".lock")


@contextmanager
def exclusive(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold the lock of the record file `path` for the block; if another process holds it, an InputError
    naming it (its PID) and `shown` (what the user called the output; default `path`)."""
    if fcntl is None:
        yield
        return
    where = lock_path(path)
    while True:
        fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"another owlvid run (PID {holder})" if holder else "another owlvid run"
            raise InputError(f"{shown or path} is being written by {who}; wait for it to end or stop it, "
                             "or choose another output") from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder removes the file as it ends: a lock taken on the file it removed guards nothing
        try:
            current = os.stat(where)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(where)  # removed while still locked, so no one can lock it and then see it vanish
        except OSError:
            pass
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The PID written in a lock file (None if its holder has not written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() else None


def read_done(path: str | os.PathLike, key: str, kind: str,
              is_record: Callable[[dict], bool] = lambda item: True) -> set[str]:
    """The ids (the string `key` field of each line) already in the record file `path` (none if it does not
    exist). Every line ending with a newline must be a record (a JSON object with the `key`, accepted by
    `is_record`); text after the last newline is a line torn by a killed run and is cut away, but only
    after at least one valid line: otherwise nothing says the file is ours, and it is refused untouched (one
    InputError saying it is not a `kind` file), as is damage anywhere else. Hold `exclusive(path)` around it:
    the cut must not race a running writer."""
    path = Path(path)
    if not path.exists():
        return set()
    with open(path, "rb") as f:
        data = f.read()
    done: set[str] = set()
    *complete, tail = data.split(b"\n")  # tail: text after the last newline (a torn line when not blank)
    for number, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            item = None
        if not (isinstance(item, dict) and isinstance(item.get(key), str) and is_record(item)):
            raise _not_ours(path, kind, f"line {number} is not a {kind} line")
        done.add(item[key])
    if tail.strip():
        if not done:
            raise _not_ours(path, kind, f"it holds no complete {kind} line")
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return done


def _not_ours(path: Path, kind: str, why: str) -> InputError:
    return InputError(f"{path} is not a {kind} file ({why}); refusing to write to it (move it away to start "
                      "over, or choose another output)")


class RecordWriter:
    """Appends records to a file, one whole line at a time, each flushed and fsync'd (a kill loses at most
    the line being written, which `read_done` cuts on the next run)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = open(path, "ab")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
