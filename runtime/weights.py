"""The engine directory's `weights.bin`, memory-mapped once per process, shared by all buckets."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path
from typing import Any

import numpy as np


class MappedWeights:
    """Read-only numpy views into weights.bin, one per tensor of the manifest's table.

    The views cost no memory until pages are touched, and every bucket's session receives the
    same views, so weights are resident once however many buckets are open.
    """

    def __init__(self, path: Path, table: dict[str, dict[str, Any]]) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        size = len(self._map)
        self.arrays: dict[str, np.ndarray] = {}
        for name, entry in table.items():
            end = int(entry["offset"]) + int(entry["length"])
            if end > size:
                raise ValueError(f"{path}: tensor {name!r} ends at byte {end}, file has {size}")
            count = int(np.prod(entry["shape"], dtype=np.int64))
            view = np.frombuffer(
                self._map, dtype=np.dtype(entry["dtype"]), count=count, offset=int(entry["offset"])
            )
            self.arrays[name] = view.reshape(entry["shape"])


_cache: dict[Path, MappedWeights] = {}
_lock = threading.Lock()


def mapped_weights(path: Path, table: dict[str, dict[str, Any]]) -> MappedWeights:
    """One MappedWeights per file per process, whoever asks (backends, extractors, exporter)."""
    key = path.resolve()
    with _lock:
        found = _cache.get(key)
        if found is None or set(found.arrays) != set(table) or _size(key) != len(found._map):
            found = _cache[key] = MappedWeights(key, table)
        return found


def _size(path: Path) -> int:
    return path.stat().st_size
