"""The ONNX Runtime backends: `ort` (sessions run by `session.run`, CPU or CUDA as onnxruntime
has them) and its IO-binding GPU forms `ort-cuda` and `ort-tensorrt`.

IO binding hands ONNX Runtime the uint8 batch as it is (one copy to the device, 4x fewer bytes
than float pixels) and preallocated float32 numpy arrays for every output, which ONNX Runtime
fills directly: no output goes through `session.run`'s Python-side copies. The binding code is
the same for every provider, so `OrtBoundBackend` with the CPU provider (what the tests run)
exercises exactly the path that the CUDA and TensorRT providers take.

`ort-cuda` and `ort-tensorrt` need onnxruntime-gpu (`pip install onnxruntime-gpu` in place of
onnxruntime) and a CUDA GPU; `ort-tensorrt` also needs TensorRT's libraries (`pip install
tensorrt`).
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..buckets import format_size
from ..manifest import BadBucketError, EngineManifest
from .base import GPU_DEVICES, Backend, check_device, cuda_index
from .common import BucketCache, check_batch, cuda_device_count, release_freed_memory
from .sessions import (
    BadGraphError,
    default_providers,
    engine_initializers,
    onnxruntime_module,
    ort_session,
    release_after_run,
)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"
ORT_OPTIONS = frozenset(
    {"precision", "providers", "max_open_buckets", "threads", "prepack", "release_memory"}
)


class OrtBackend(Backend):
    """ONNX Runtime sessions opened lazily per bucket and kept in a bounded LRU.

    Every session allocates from one CPU arena per process (runtime/backends/sessions.py
    `shared_cpu_arena`): the pages one batch used serve the next, whatever its bucket, so RSS
    stays at the largest batch's peak however many sizes go through, and no batch pays for
    mapping fresh pages (80,000 page faults per 512x512 image without it). `release_memory`
    hands that memory back to the OS after every batch instead (RSS between batches drops to
    the weights; 8% slower at 512x512 on the 2-core CPU, 22% for a Winograd engine;
    bench/RESULTS.md). `prepack` lets ORT keep its own reordered copy of the weights per
    session: a little faster, but every open bucket then costs a copy of them.
    `precision`: "fp32" only (ONNX Runtime runs the exported graphs' own types).
    """

    name = "ort"
    options = ORT_OPTIONS

    @classmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """None: the `ort` backend needs onnxruntime only, a hard dependency."""
        return None

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        precision: str = "fp32",
        providers: list[Any] | None = None,
        max_open_buckets: int = 4,
        threads: int = 0,
        prepack: bool = False,
        release_memory: bool = False,
    ) -> None:
        self.precision = self.check_precision(precision)
        self.manifest = manifest
        self.providers = providers or default_providers()
        self.threads = threads
        self.prepack = prepack
        self.release_memory = release_memory
        self._run_options = release_after_run() if release_memory else None
        self._sessions: BucketCache[Any] = BucketCache(max_open_buckets, self._open_session)

    def session(self, bucket: tuple[int, int]) -> Any:
        return self._sessions.get(bucket)

    def _open_session(self, bucket: tuple[int, int]) -> Any:
        """The bucket's session; a graph file ONNX Runtime cannot load is a BadBucketError
        (an EngineError carrying the bucket), so a job can fail that bucket's images only."""
        try:
            return ort_session(
                self.manifest.bucket_path(bucket, cpu=self.runs_on_cpu),
                engine_initializers(self.manifest),
                providers=self.providers,
                threads=self.threads,
                prepack=self.prepack,
            )
        except BadGraphError as err:
            raise BadBucketError(
                f"bucket {format_size(bucket)}: {err}; the file is damaged: restore it from a "
                "good copy of the engine or export the engine again into a new --out directory",
                bucket,
            ) from err

    @property
    def runs_on_cpu(self) -> bool:
        """Only the CPU provider: the sessions open the engine's CPU graphs (Winograd steps,
        where it has them); any other provider takes the direct-convolution graphs."""
        return all(_provider_name(p) == CPU_PROVIDER for p in self.providers)

    @property
    def open_buckets(self) -> list[tuple[int, int]]:
        return self._sessions.buckets

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.manifest.outputs
        feed = {self.manifest.input_name: images}
        values = self.session(bucket).run(outputs, feed, self._run_options)
        if self.release_memory:
            release_freed_memory()
        return dict(zip(outputs, values, strict=True))

    def close(self) -> None:
        self._sessions.clear()


def _provider_name(provider: Any) -> str:
    """A provider as onnxruntime takes it: a name, or a (name, options) pair."""
    return str(provider[0] if isinstance(provider, (tuple, list)) else provider)


class OrtBoundBackend(OrtBackend):
    """OrtBackend whose `run` goes through IO binding (see the module docstring).

    Takes OrtBackend's options (`providers`, `max_open_buckets`, `threads`, `prepack`,
    `release_memory`); not registered itself: `ort-cuda` and `ort-tensorrt` are its GPU forms.
    """

    name = "ort-bound"

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_batch(bucket, images)
        session = self.session(bucket)
        binding = session.io_binding()
        binding.bind_cpu_input(self.manifest.input_name, images)
        outputs: dict[str, np.ndarray] = {}
        for meta in session.get_outputs():
            # Every dimension but the batch is static in an exported bucket graph.
            shape = [len(images), *(int(d) for d in meta.shape[1:])]
            out = outputs[meta.name] = np.empty(shape, dtype=np.float32)
            binding.bind_output(meta.name, "cpu", 0, np.float32, shape, out.ctypes.data)
        session.run_with_iobinding(binding, self._run_options)
        if self.release_memory:
            release_freed_memory()
        return {name: outputs[name] for name in self.manifest.outputs}


def _direct_reason(label: str, manifest: EngineManifest | None) -> str | None:
    """GPU providers get direct convolutions: an engine with Winograd steps (for CPUs) is refused
    (export/winograd.py; the engine's manifest records them)."""
    return None if manifest is None else manifest.direct_convolutions_reason(label)


def _gpu_reason(provider: str, label: str) -> str | None:
    available = onnxruntime_module().get_available_providers()
    if provider not in available:
        return (
            f"{label} needs onnxruntime-gpu ({provider}); this onnxruntime has "
            f"{', '.join(available)}: pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    if cuda_device_count() == 0:
        return f"{label}: no CUDA GPU (the CUDA driver finds none)"
    return None


class OrtCudaBackend(OrtBoundBackend):
    """ONNX Runtime's CUDA provider, float32 (the exported graphs' own precision).

    Options: `device` ("cuda" or "cuda:N", default "cuda"), `precision` ("fp32" only: ORT runs
    the graph's types), and OrtBackend's (`providers` replaces the CUDA provider this sets up).
    """

    name = "ort-cuda"
    options = ORT_OPTIONS | {"device"}

    @classmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """onnxruntime-gpu's CUDA provider and a CUDA GPU; an engine of direct convolutions."""
        return _direct_reason(cls.name, manifest) or _gpu_reason(CUDA_PROVIDER, cls.name)

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        device: str = "cuda",
        **options: Any,
    ) -> None:
        self.device = check_device(device, GPU_DEVICES)
        # TF32 (on by default in the CUDA provider) alone approaches fp32's 1e-3 tolerance.
        settings = {
            "device_id": cuda_index(device),
            "use_tf32": "0",
            "cudnn_conv_use_max_workspace": "1",
        }
        options.setdefault("providers", [(CUDA_PROVIDER, settings), CPU_PROVIDER])
        super().__init__(manifest, **options)


def _tensorrt_libraries_reason() -> str | None:
    """None when libnvinfer loads (from the system or the tensorrt wheel's tensorrt_libs)."""
    candidates = ["libnvinfer.so.11", "libnvinfer.so.10"]
    try:
        import tensorrt_libs  # the pip wheel's library folder

        for folder in tensorrt_libs.__path__:
            candidates = sorted(glob.glob(os.path.join(folder, "libnvinfer.so.*"))) + candidates
    except ImportError:
        pass
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return None
        except OSError:
            continue
    return "ort-tensorrt needs TensorRT's libraries (libnvinfer): pip install tensorrt"


class OrtTensorrtBackend(OrtBoundBackend):
    """ONNX Runtime's TensorRT provider (CUDA, then the CPU, for what TensorRT does not take).

    TensorRT builds its engine on a bucket's first session and caches it under `cache_dir`
    (default ENGINE_DIR/ort-tensorrt-cache), with one optimisation profile for batches
    1..`max_batch` (default 8). `precision`: "fp32" (TF32 off through NVIDIA_TF32_OVERRIDE=0,
    the provider having no option for it) or "fp16" (`trt_fp16_enable`: TensorRT's weakly typed
    mixed precision on the exported float32 graph, deprecated since TensorRT 10.12 but the only
    reduced-precision switch ORT's provider offers beside `trt_bf16_enable`; the `tensorrt`
    backend builds strongly typed networks instead). The conformance suite checks both against
    the tolerances of export/ALGORITHM.md.
    `device`: "cuda" or "cuda:N"; `workspace_gb`: TensorRT's builder workspace.
    """

    name = "ort-tensorrt"
    options = ORT_OPTIONS | {"device", "max_batch", "cache_dir", "workspace_gb"}
    precisions = ("fp32", "fp16")

    @classmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """onnxruntime-gpu's TensorRT provider, TensorRT's libraries and a CUDA GPU; an engine of
        direct convolutions."""
        return (
            _direct_reason(cls.name, manifest)
            or _gpu_reason(TENSORRT_PROVIDER, cls.name)
            or _tensorrt_libraries_reason()
        )

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        device: str = "cuda",
        precision: str = "fp32",
        max_batch: int = 8,
        cache_dir: str | os.PathLike[str] | None = None,
        workspace_gb: float = 4.0,
        **options: Any,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.device = check_device(device, GPU_DEVICES)
        self.device_id = cuda_index(device)
        self.cache_dir = Path(cache_dir or manifest.directory / "ort-tensorrt-cache")
        self.workspace_gb = workspace_gb
        # precision: TensorRT's, on the float32 graph
        super().__init__(manifest, precision=precision, **options)

    def session(self, bucket: tuple[int, int]) -> Any:
        # The profile names this bucket's shapes, so each bucket gets its own provider options.
        if bucket not in self._sessions:
            if self.precision == "fp32":
                # ORT's TensorRT provider has no TF32 option (its keys: trt_fp16_enable,
                # trt_bf16_enable, trt_int8_enable, ...), and TensorRT's builder allows TF32 by
                # default: NVIDIA's libraries read NVIDIA_TF32_OVERRIDE=0 to turn it off. It is
                # process-wide; a value the caller set is kept.
                os.environ.setdefault(TF32_OVERRIDE, "0")
            self.providers = [
                (TENSORRT_PROVIDER, self.provider_options(bucket)),
                (CUDA_PROVIDER, {"device_id": self.device_id}),
                CPU_PROVIDER,
            ]
        return super().session(bucket)

    def provider_options(self, bucket: tuple[int, int]) -> dict[str, Any]:
        """The TensorRT provider's options for one bucket (strings, as ORT documents them)."""
        width, height = bucket
        name = self.manifest.input_name

        def shape(n: int) -> str:
            return f"{name}:{n}x{height}x{width}x3"

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": self.device_id,
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(self.cache_dir),
            "trt_max_workspace_size": int(self.workspace_gb * 2**30),
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(self.max_batch),
            "trt_profile_max_shapes": shape(self.max_batch),
        }

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        if len(images) > self.max_batch:  # beyond the profile: run in profile-sized chunks
            parts = [super(OrtTensorrtBackend, self).run(bucket, images[i : i + self.max_batch])
                     for i in range(0, len(images), self.max_batch)]  # fmt: skip
            return {k: np.concatenate([p[k] for p in parts]) for k in self.manifest.outputs}
        return super().run(bucket, images)
