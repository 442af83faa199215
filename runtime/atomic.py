"""Atomic file replacement: the one way this package writes a file a reader may open.

A reader (or a rerun after a crash, even `kill -9`) sees the old file or the complete new one,
never a partial file. The temporary name is unique per process and call, so two processes
writing the same target never collide on it; the last rename wins.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_name(target: Path) -> Path:
    """A hidden, unique name beside `target` (same filesystem, so the rename is atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on a clean exit its file is fsynced and renamed
    to `target`, on an exception it is removed. The caller writes the file (any library)."""
    final = Path(target)
    tmp = temporary_name(final)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Replace `target` atomically with `data`."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json(target: str | os.PathLike[str], data: Any) -> Path:
    """Replace `target` atomically with `data` as indented JSON (non-JSON values as str)."""
    return write_bytes(target, (json.dumps(data, indent=2, default=str) + "\n").encode())
