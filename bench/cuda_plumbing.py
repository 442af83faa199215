"""The TensorRT backend's CUDA plumbing without TensorRT: pinned buffers, two streams, events and
chunking (engines/tensorrt_backend.py's `_BucketPlan.run`) around a stand-in execution context
whose "inference" is a plain device-to-device copy of each input row's first bytes into each
output row. The host can then check every output byte, so a chunk read before its event, a slot
reused too early or a row copied to the wrong place shows as a mismatch.

Two CUDA runtimes can sit under it: cuda-python's `cuda.bindings.runtime` on a GPU, or
`HostRuntime` here, an emulation in host memory that runs every queued copy only when the host
synchronises on an event (so a missing synchronisation reads stale bytes, as on a GPU).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

INPUT = "images"
# Small float32 rows (64 and 96 bytes), both shorter than an input row, so every output byte
# is a copy of an input byte.
ROWS = {"a": (16,), "b": (4, 6)}


class HostRuntime:
    """Just the cudart calls `_BucketPlan` makes, in host memory; copies run lazily (in the
    order they were queued) when the host waits on an event."""

    cudaHostAllocDefault = 0
    cudaEventDisableTiming = 2
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.queue: list[Callable[[], None]] = []
        self.copies = 0
        self.syncs = 0
        self.handles = 0  # streams and events are plain numbers, as cuda-python's int() gives

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        buffer = (ctypes.c_uint8 * max(nbytes, 1))()
        pointer = ctypes.addressof(buffer)
        self.buffers[pointer] = buffer
        return 0, pointer

    def cudaHostAlloc(self, nbytes: int, flags: int) -> tuple[int, int]:  # noqa: N802
        return self._alloc(nbytes)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:  # noqa: N802
        return self._alloc(nbytes)

    def cudaFree(self, pointer: int) -> tuple[int]:  # noqa: N802
        return (0 if self.buffers.pop(pointer, None) is not None else 1,)

    cudaFreeHost = cudaFree  # noqa: N815

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: Any) -> tuple[int]:  # noqa: N802
        def copy() -> None:
            ctypes.memmove(dst, src, n)
            self.copies += 1

        self.queue.append(copy)
        return (0,)

    def _handle(self) -> tuple[int, int]:
        self.handles += 1
        return 0, self.handles

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[int, int]:  # noqa: N802
        return self._handle()

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:  # noqa: N802
        return self._handle()

    def cudaEventRecord(self, event: Any, stream: Any) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaStreamWaitEvent(self, stream: Any, event: Any, flags: int) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaEventSynchronize(self, event: Any) -> tuple[int]:  # noqa: N802
        for job in self.queue:
            job()
        self.queue.clear()
        self.syncs += 1
        return (0,)

    def cudaEventDestroy(self, event: Any) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaGetErrorName(self, error: Any) -> tuple[int, bytes]:  # noqa: N802
        return 0, f"host error {int(error)}".encode()


class CopyContext:
    """An execution context whose enqueue copies, on the compute stream, the first bytes of
    each input row into each output row (device to device)."""

    def __init__(self, runtime: Any, bucket: tuple[int, int], refuse: str | None = None) -> None:
        self.rt = runtime
        width, height = bucket
        self.row_bytes = height * width * 3
        self.shape: tuple[int, ...] = ()
        self.addresses: dict[str, int] = {}
        self.refuse = refuse  # "shape" or "address": that call returns False (error paths)
        self.launches = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = tuple(shape)
        return self.refuse != "shape"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shape[0], *ROWS[name])

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = int(pointer)
        return self.refuse != "address"

    def execute_async_v3(self, stream: Any) -> bool:
        from interactive_features.engines.tensorrt_plans import cuda_call

        d2d = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        source = self.addresses[INPUT]
        for name, row in ROWS.items():
            out_bytes = int(np.prod(row)) * 4
            for r in range(self.shape[0]):
                cuda_call(
                    self.rt.cudaMemcpyAsync(
                        self.addresses[name] + r * out_bytes, source + r * self.row_bytes,
                        out_bytes, d2d, stream,
                    )
                )  # fmt: skip
        self.launches += 1
        return True


def expected(images: np.ndarray) -> dict[str, np.ndarray]:
    """What CopyContext's outputs hold for `images`: each row's first bytes, as float32 rows."""
    flat = images.reshape(len(images), -1)
    out = {}
    for name, row in ROWS.items():
        nbytes = int(np.prod(row)) * 4
        out[name] = np.ascontiguousarray(flat[:, :nbytes]).view(np.float32).reshape(-1, *row)
    return out


@contextmanager
def runtime_in_use(runtime: Any) -> Iterator[Any]:
    """Make the TensorRT backend module use `runtime` as its cudart while inside."""
    from interactive_features.engines import tensorrt_backend

    saved = tensorrt_backend.cudart_module
    tensorrt_backend.cudart_module = lambda: runtime
    try:
        yield runtime
    finally:
        tensorrt_backend.cudart_module = saved


def exercise(
    runtime: Any, bucket: tuple[int, int] = (32, 32), max_batch: int = 4,
    batches: tuple[int, ...] = (1, 4, 9, 3), seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Run batches (one row, one full chunk, three chunks through both slots, a partial chunk)
    through `_BucketPlan.run` with CopyContext, on `runtime`; every output byte is checked.
    Returns {"batches", "chunks", "mismatches": [...]}; raises what the plumbing raises."""
    from interactive_features.engines.tensorrt_backend import _BucketPlan
    from interactive_features.engines.tensorrt_plans import cuda_call

    width, height = bucket
    rng = np.random.default_rng(seed)
    mismatches = []
    with runtime_in_use(runtime):
        flags = runtime.cudaStreamNonBlocking
        upload = cuda_call(runtime.cudaStreamCreateWithFlags(flags))
        compute = cuda_call(runtime.cudaStreamCreateWithFlags(flags))
        context = CopyContext(runtime, bucket)
        plan = _BucketPlan.for_context(context, bucket, INPUT, list(ROWS), max_batch)
        try:
            for n in batches:
                images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
                got = plan.run(images, upload, compute)
                for name, want in expected(images).items():
                    if got[name].shape != want.shape or got[name].tobytes() != want.tobytes():
                        mismatches.append(f"batch {n}, output {name}")
        finally:
            plan.free()
            for stream in (upload, compute):
                cuda_call(runtime.cudaStreamDestroy(stream))
    return {"batches": list(batches), "chunks": context.launches, "mismatches": mismatches}
