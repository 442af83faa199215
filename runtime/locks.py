"""One writer at a time: an OS file lock (`fcntl.flock`) on a small file beside what it guards.

`exclusive_lock(path, what)` holds an exclusive, non-blocking flock on `path` for the duration of
a `with` block and writes who holds it (pid, host, start time, command) into the file. A second
holder is refused at once with LockedError, one line naming the holder and the lock file. The
kernel drops the lock when its process ends, however it ends (even `kill -9`), so a lock file
left behind never blocks anyone: the file stays (removing a lock file races with the next
holder) and only its text is stale. flock works across processes on one machine and, on Linux,
on NFS (emulated with POSIX byte-range locks); some network filesystems ignore it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .manifest import EngineError

# The lock file of an engine directory: `interactive export` and `interactive build` hold it
# while they write the directory.
ENGINE_LOCK = ".interactive.lock"


class LockedError(EngineError):
    """Another process holds the lock; the message names it and the lock file."""


def holder_record() -> str:
    """Who this process is, as the JSON the lock file holds: pid, host, start time, command."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    line = f"pid {record['pid']} on {record['host']} since {started}: {command}"
    # `holder` first: `cat` on the lock file reads as a sentence; the fields are for programs.
    return json.dumps({"holder": line, **record, "command": command})


def describe_holder(text: str) -> str:
    """A lock file's record in one line: "pid N on HOST since TIME: COMMAND"."""
    try:
        return str(json.loads(text)["holder"])
    except (ValueError, KeyError, TypeError):
        return text.strip() or "another process"


def _holder_text(fd: int) -> str:
    """The holder's line; it writes it right after taking the lock, so wait a moment for it."""
    for _ in range(20):
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        if text:
            return describe_holder(text)
        time.sleep(0.025)
    return ""


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold an exclusive flock on `path` (created if needed) or raise LockedError at once.

    `what` names the guarded thing in the refusal ("engine directory engines/x"). An OSError
    creating or writing the lock file (read-only or full filesystem, no permission) becomes an
    EngineError naming the file: it is the first write into the guarded directory, so a
    directory that cannot be written is refused before any work.
    """
    lock = Path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise EngineError(f"{what}: cannot create the lock file {lock}: {err.strerror}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EngineError(f"{what}: cannot lock {lock}: {err.strerror}") from err
            holder = _holder_text(fd) or "another process"
            raise LockedError(
                f"{what} is in use by {holder} (lock file {lock}); wait for it to finish"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_record() + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            raise EngineError(f"{what}: cannot write the lock file {lock}: {err.strerror}") from err
        try:
            yield lock
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: no stale holder text for the next reader
    finally:
        os.close(fd)  # closing the descriptor releases the flock
