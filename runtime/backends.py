"""Backends run one bucket's graph on a uint8 [N, H, W, 3] batch; `open_backend` picks one.

Every backend takes the engine manifest and returns {output name: float32 array}. The registry
below names each backend's module; a module is imported only when its backend is asked for (or
probed by `backend_status`), so the runtime never imports torch, TensorRT or CUDA libraries
unless a backend that needs them is used.

| name           | module                       | needs                                   |
|----------------|------------------------------|-----------------------------------------|
| `ort`          | backends.OrtBackend          | onnxruntime (CPU, or CUDA when present)  |
| `ort-cuda`     | ort_gpu.OrtCudaBackend       | onnxruntime-gpu and a CUDA GPU           |
| `ort-tensorrt` | ort_gpu.OrtTensorrtBackend   | onnxruntime-gpu with TensorRT            |
| `torch`        | torch_backend.TorchBackend   | torch (CPU or CUDA)                      |
| `tensorrt`     | tensorrt_backend.TensorRTBackend | tensorrt, cuda-python and a CUDA GPU |

A backend module defines its class and `unavailable_reason(manifest=None) -> str | None`: None
when its libraries and device are present (and, given a manifest, when that engine directory
has what the backend needs, e.g. TensorRT plans for this GPU), otherwise one line saying what is
missing.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from .manifest import EngineError, EngineManifest
from .registry import AUTO_ORDER, BACKENDS, REGISTRY
from .weights import MappedWeights, mapped_weights

T = TypeVar("T")


class Backend(Protocol):
    name: str

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for one same-bucket uint8 [N, H, W, 3] batch."""
        ...

    def close(self) -> None: ...


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - onnxruntime is a hard dependency
        raise EngineError("the ort backend needs onnxruntime: pip install onnxruntime") from err
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, the CPU always."""
    available = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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


def ort_session(
    model: Path,
    initializers: dict[str, Any] | None = None,
    *,
    providers: list[Any] | None = None,
    threads: int = 0,
    prepack: bool = False,
    profile_prefix: Path | None = None,
) -> Any:
    """An InferenceSession whose weights come from `initializers` (shared OrtValues), not copies.

    Prepacking (ORT's private reordered copy of every weight, per session) is off by default so
    that an extra bucket costs its activations only; `prepack=True` trades memory for speed.
    Layout optimisations above EXTENDED also copy weights per session, and measured no faster.
    `providers` are names or (name, options) pairs, as onnxruntime takes them.
    `profile_prefix` turns on ORT's per-node profiler (session.end_profiling() writes the trace).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False  # give activations back between batches
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    return ort.InferenceSession(str(model), options, providers=providers or default_providers())


_ortvalue_cache: dict[Path, tuple[MappedWeights, dict[str, Any]]] = {}


def shared_initializers(weights_file: Path, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OrtValues over the memory-mapped weights file, made once per process and file.

    The values wrap the mapped numpy views without copying; the cache keeps the map alive.
    """
    path = weights_file.resolve()
    mapped = mapped_weights(path, table)
    cached = _ortvalue_cache.get(path)
    if cached is None or cached[0] is not mapped:
        ort = _ort()
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in mapped.arrays.items()}
        cached = _ortvalue_cache[path] = (mapped, values)
    return cached[1]


def engine_initializers(manifest: EngineManifest) -> dict[str, Any]:
    weights = manifest.data["weights"]
    return shared_initializers(manifest.directory / weights["file"], weights["tensors"])


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


class OrtBackend:
    """ONNX Runtime sessions opened lazily per bucket and kept in a bounded LRU.

    `release_memory` (default on) returns freed activations to the OS after every batch, so RSS
    stays at one bucket's peak however many sizes go through (0-8% slower on the 2-core CPU at
    512x512, batch 1; bench/RESULTS.md). `prepack` lets ORT keep its own reordered copy of the
    weights per session: a little faster, but every open bucket then costs a copy of them.
    """

    name = "ort"

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        providers: list[Any] | None = None,
        max_open_buckets: int = 4,
        threads: int = 0,
        prepack: bool = False,
        release_memory: bool = True,
    ) -> None:
        self.manifest = manifest
        self.providers = providers or default_providers()
        self.threads = threads
        self.prepack = prepack
        self.release_memory = release_memory
        self._sessions: BucketCache[Any] = BucketCache(max_open_buckets, self._open_session)

    def session(self, bucket: tuple[int, int]) -> Any:
        return self._sessions.get(bucket)

    def _open_session(self, bucket: tuple[int, int]) -> Any:
        return ort_session(
            self.manifest.bucket_path(bucket),
            engine_initializers(self.manifest),
            providers=self.providers,
            threads=self.threads,
            prepack=self.prepack,
        )

    @property
    def open_buckets(self) -> list[tuple[int, int]]:
        return self._sessions.buckets

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.manifest.outputs
        values = self.session(bucket).run(outputs, {self.manifest.input_name: images})
        if self.release_memory:
            release_freed_memory()
        return dict(zip(outputs, values, strict=True))

    def close(self) -> None:
        self._sessions.clear()


def unavailable_reason(manifest: EngineManifest | None = None) -> str | None:
    """The `ort` backend needs onnxruntime only, a hard dependency."""
    return None


def _backend_module(name: str) -> Any:
    if name not in REGISTRY:
        raise EngineError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    import importlib

    return importlib.import_module(f".{REGISTRY[name][0]}", __package__)


def backend_status(name: str, manifest: EngineManifest | None = None) -> str | None:
    """None when backend `name` can run here (on `manifest`, if given), otherwise why not."""
    try:
        module = _backend_module(name)
    except ImportError as err:
        return f"{name}: {err}"
    return _unavailable_reason(module, name, manifest)


def _unavailable_reason(module: Any, name: str, manifest: EngineManifest | None) -> str | None:
    """The backend class's own `unavailable_reason` where it has one (two backends sharing a
    module), else the module's."""
    cls = getattr(module, REGISTRY[name][1])
    reason: str | None = getattr(cls, "unavailable_reason", module.unavailable_reason)(manifest)
    return reason


def available_backends(manifest: EngineManifest | None = None) -> dict[str, str | None]:
    """Every registered backend -> None (runs here) or the reason it does not."""
    return {name: backend_status(name, manifest) for name in REGISTRY}


def open_backend(manifest: EngineManifest, name: str = "auto", **options: Any) -> Backend:
    """Open backend `name` on `manifest`; `auto` takes the first of AUTO_ORDER that runs here.

    A named backend that cannot run here raises EngineError saying what is missing.
    """
    if name == "auto":
        name = next(n for n in AUTO_ORDER if n == "ort" or backend_status(n, manifest) is None)
    module = _backend_module(name)
    reason = _unavailable_reason(module, name, manifest)
    if reason is not None:
        raise EngineError(f"backend {name!r} cannot run here: {reason}")
    backend: Backend = getattr(module, REGISTRY[name][1])(manifest, **options)
    return backend
