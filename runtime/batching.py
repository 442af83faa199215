"""Grouping prepared images by bucket into same-shaped batches, keeping their input positions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .images import PreparedImage


@dataclass
class Batch:
    bucket: tuple[int, int]
    indices: list[int]  # positions of the images in the caller's input
    pixels: np.ndarray  # uint8 [N, H, W, 3]


def batches_by_bucket(
    items: Iterable[tuple[int, PreparedImage]], batch_size: int
) -> Iterator[Batch]:
    """Yield a bucket's batch as soon as it holds `batch_size` images; the rest when input ends.

    An image waits in its bucket's queue only, so memory is bounded by one partial batch per
    bucket.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    queues: dict[tuple[int, int], list[tuple[int, PreparedImage]]] = {}
    for index, image in items:
        queue = queues.setdefault(image.bucket, [])
        queue.append((index, image))
        if len(queue) == batch_size:
            yield _stack(image.bucket, queues.pop(image.bucket))
    for bucket, queue in queues.items():
        yield _stack(bucket, queue)


def _stack(bucket: tuple[int, int], queue: list[tuple[int, PreparedImage]]) -> Batch:
    return Batch(bucket, [i for i, _ in queue], np.stack([im.pixels for _, im in queue]))
