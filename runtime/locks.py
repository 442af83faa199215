"""One process at a time on a directory: an exclusive, non-blocking lock on a lock file.

`exclusive_lock(path, what)` takes an `fcntl.flock` on `path` (created if absent) for the
duration of the `with` block and writes its holder (pid, host, command, start time) into it; a
second process is refused at once with `LockedError`, whose one-line message names the holder
and the lock file. The kernel drops the lock when its process dies, even by `kill -9`, so a
crash never leaves a stale lock (the file stays, harmless: it is the lock's name, not the lock).
Local filesystems and NFSv4 (where Linux maps flock to byte-range locks) honour it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockedError(ValueError):
    """Another process holds the lock."""


def _holder() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']} (started {info['started']}: {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold the lock on `path` for the block; LockedError at once if another process holds it."""
    lock = Path(path)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for _ in range(20):  # the holder writes its name right after taking the lock
                raw = os.pread(fd, 65536, 0)
                if raw:
                    break
                time.sleep(0.025)
            holder = _describe(raw)
            raise LockedError(
                f"{what} is in use by {holder}; lock file {lock}: wait for that job or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
