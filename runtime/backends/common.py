"""What the backends share that is not ONNX Runtime's: the batch check, the per-bucket LRU, the
CUDA device count and handing freed heap memory back (numpy and ctypes only)."""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def cuda_device_count() -> int:
    """CUDA devices the driver sees; 0 without a driver or a GPU (no CUDA package needed)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere a no-op).

    Without it, glibc keeps freed activations of the sizes seen so far (measured: about +460 MB
    at 512x512 once a second bucket has run, then flat).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def check_batch(bucket: tuple[int, int], images: np.ndarray) -> np.ndarray:
    """`images` as a C-contiguous uint8 [N, H, W, 3] batch of `bucket`, or a ValueError naming
    what is wrong (the backends that hand raw pointers or tensors on call it first)."""
    width, height = bucket
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = f"an array of {images.dtype}" if isinstance(images, np.ndarray) else None
        raise ValueError(f"images must be a uint8 numpy array, got {kind or type(images).__name__}")
    if images.ndim != 4 or images.shape[1:] != (height, width, 3) or images.shape[0] < 1:
        raise ValueError(
            f"images must be [N, {height}, {width}, 3] (NHWC RGB) for bucket {width}x{height}, "
            f"got shape {images.shape}"
        )
    return np.ascontiguousarray(images)


class BucketCache(Generic[T]):
    """Per-bucket objects (sessions, plans) made on first use and kept in a bounded LRU: beyond
    `size`, the least recently used is dropped and handed to `discard` (e.g. to free device
    memory)."""

    def __init__(
        self,
        size: int,
        make: Callable[[tuple[int, int]], T],
        discard: Callable[[T], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"max_open_buckets must be at least 1, got {size}")
        self.size = size
        self.make = make
        self.discard = discard
        self._items: OrderedDict[tuple[int, int], T] = OrderedDict()

    def get(self, bucket: tuple[int, int]) -> T:
        found = self._items.get(bucket)
        if found is not None:
            self._items.move_to_end(bucket)
            return found
        item = self._items[bucket] = self.make(bucket)
        while len(self._items) > self.size:
            self._drop(self._items.popitem(last=False)[1])
        return item

    def __contains__(self, bucket: object) -> bool:
        return bucket in self._items

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Open buckets, least recently used first."""
        return list(self._items)

    def clear(self) -> None:
        while self._items:
            self._drop(self._items.popitem(last=False)[1])

    def _drop(self, item: T) -> None:
        if self.discard is not None:
            self.discard(item)
