"""The engine directory's `weights.bin`, memory-mapped once per process, shared by all buckets.

Before any tensor is used, every tensor's bytes are checked against the sha256 the manifest's
table records for it (`verify_weights`): a flipped byte anywhere in a tensor is refused with an
EngineError naming the file and the tensor, never run. The check reads the whole file once
(hashlib's sha256, about 1 GB/s per core: about 0.6 s for VGG-16's 596 MB) and is remembered per
process, keyed by the file's resolved path, size and modification time, so reopening the engine,
another bucket or another Extractor in the same process costs nothing.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import EngineError

REEXPORT = (
    "the file is corrupt or was changed after export: restore it from a good copy or export the "
    "engine again into a new --out directory"
)


def _open_map(path: Path) -> mmap.mmap:
    """The whole file mapped read-only, or an EngineError naming it (missing, unreadable,
    empty: an interrupted copy or export)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise EngineError(f"{path}: the weights file is empty (truncated?); {REEXPORT}")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise EngineError(f"{path}: cannot read the weights file: {err.strerror or err}") from err


def _check_extent(path: Path, name: str, entry: dict[str, Any], size: int) -> None:
    end = int(entry["offset"]) + int(entry["length"])
    if end > size:
        raise EngineError(
            f"{path}: tensor {name!r} ends at byte {end}, the file has {size} (truncated?); "
            f"{REEXPORT}"
        )


class MappedWeights:
    """Read-only numpy views into weights.bin, one per tensor of the manifest's table.

    The views cost no memory until pages are touched, and every bucket's session receives the
    same views, so weights are resident once however many buckets are open. Made through
    `mapped_weights`, which verifies the tensors' sha256 first.
    """

    def __init__(self, path: Path, table: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self._map = _open_map(path)
        size = len(self._map)
        self.arrays: dict[str, np.ndarray] = {}
        for name, entry in table.items():
            _check_extent(path, name, entry, size)
            count = int(np.prod(entry["shape"], dtype=np.int64))
            view = np.frombuffer(
                self._map, dtype=np.dtype(entry["dtype"]), count=count, offset=int(entry["offset"])
            )
            self.arrays[name] = view.reshape(entry["shape"])


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a whole file, read in 4 MiB blocks (the manifest's `weights.sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_cache: dict[Path, MappedWeights] = {}
_lock = threading.Lock()
# (resolved path, size, mtime_ns) -> {(tensor name, offset, length): sha256 of those bytes}
_verified: dict[tuple[Path, int, int], dict[tuple[str, int, int], str]] = {}


def _file_key(path: Path) -> tuple[Path, int, int]:
    try:
        stat = path.stat()
    except OSError as err:
        raise EngineError(f"{path}: cannot read the weights file: {err.strerror or err}") from err
    return path, stat.st_size, stat.st_mtime_ns


def verify_weights(path: Path, table: dict[str, dict[str, Any]]) -> None:
    """Check every tensor of `table` that records a sha256 against the bytes of `path`; an
    EngineError naming the file and the first tensor that differs.

    Remembered per process by (resolved path, size, mtime_ns): an unchanged file is hashed once,
    and a file that grew (an export adding tensors) has only its new tensors hashed.
    """
    path = path.resolve()
    key = _file_key(path)
    with _lock:
        done = _verified.setdefault(key, {})
        todo = [
            (name, entry)
            for name, entry in table.items()
            if entry.get("sha256")
            and done.get((name, int(entry["offset"]), int(entry["length"]))) != entry["sha256"]
        ]
        if not todo:
            return
        mapped = _open_map(path)
        try:
            view = memoryview(mapped)
            try:
                for name, entry in todo:
                    _check_extent(path, name, entry, len(mapped))
                    offset, length = int(entry["offset"]), int(entry["length"])
                    digest = hashlib.sha256(view[offset : offset + length]).hexdigest()
                    if digest != entry["sha256"]:
                        raise EngineError(
                            f"{path}: tensor {name!r} (bytes {offset}..{offset + length}) does "
                            f"not match the sha256 in the manifest; {REEXPORT}"
                        )
                    done[(name, offset, length)] = digest
            finally:
                view.release()
        finally:
            mapped.close()


def mapped_weights(path: Path, table: dict[str, dict[str, Any]]) -> MappedWeights:
    """One MappedWeights per file per process, whoever asks (backends, extractors, exporter),
    its tensors verified against the table's sha256 first (`verify_weights`)."""
    key = path.resolve()
    verify_weights(key, table)
    with _lock:
        found = _cache.get(key)
        if found is None or set(found.arrays) != set(table) or _size(key) != len(found._map):
            found = _cache[key] = MappedWeights(key, table)
        return found


def _size(path: Path) -> int:
    return path.stat().st_size
