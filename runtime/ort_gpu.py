"""`backend="ort-cuda"` and `backend="ort-tensorrt"`: ONNX Runtime on a GPU through IO binding.

IO binding hands ONNX Runtime the uint8 batch as it is (one copy to the device, 4x fewer bytes
than float pixels) and preallocated float32 numpy arrays for every output, which ONNX Runtime
fills directly: no output goes through `session.run`'s Python-side copies. The binding code is
the same for every provider, so `OrtBoundBackend` with the CPU provider (what the tests run)
exercises exactly the path that the CUDA and TensorRT providers take.

Both need onnxruntime-gpu (`pip install onnxruntime-gpu` in place of onnxruntime) and a CUDA
GPU; `ort-tensorrt` also needs TensorRT's libraries (`pip install tensorrt`).
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from .backends import OrtBackend, _ort, check_batch, cuda_device_count, release_freed_memory
from .manifest import EngineError, EngineManifest

CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


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
        session.run_with_iobinding(binding)
        if self.release_memory:
            release_freed_memory()
        return {name: outputs[name] for name in self.manifest.outputs}


def _gpu_reason(provider: str, label: str) -> str | None:
    available = _ort().get_available_providers()
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

    Options: `device_id` (default 0), `precision` ("fp32" only: ORT runs the graph's types),
    and OrtBackend's.
    """

    name = "ort-cuda"

    @staticmethod
    def unavailable_reason(manifest: EngineManifest | None = None) -> str | None:
        """onnxruntime-gpu's CUDA provider and a CUDA GPU."""
        return _gpu_reason(CUDA_PROVIDER, "ort-cuda")

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        device_id: int = 0,
        precision: str = "fp32",
        **options: Any,
    ) -> None:
        if precision != "fp32":
            raise EngineError(
                f"ort-cuda runs the exported float32 graphs only, not {precision!r}; "
                "use backend 'tensorrt', 'ort-tensorrt' (fp16) or 'torch' for reduced precision"
            )
        # TF32 (on by default in the CUDA provider) alone approaches fp32's 1e-3 tolerance.
        settings = {"device_id": device_id, "use_tf32": "0", "cudnn_conv_use_max_workspace": "1"}
        cuda = (CUDA_PROVIDER, settings)
        options.setdefault("providers", [cuda, "CPUExecutionProvider"])
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
    1..`max_batch` (default 8). `precision`: "fp32" or "fp16" (TensorRT's own mixed precision
    on the exported graph; the conformance suite checks it against ALGORITHM.md's tolerances).
    """

    name = "ort-tensorrt"

    @staticmethod
    def unavailable_reason(manifest: EngineManifest | None = None) -> str | None:
        """onnxruntime-gpu's TensorRT provider, TensorRT's libraries and a CUDA GPU."""
        return _gpu_reason(TENSORRT_PROVIDER, "ort-tensorrt") or _tensorrt_libraries_reason()

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        device_id: int = 0,
        precision: str = "fp32",
        max_batch: int = 8,
        cache_dir: str | os.PathLike[str] | None = None,
        workspace_gb: float = 4.0,
        **options: Any,
    ) -> None:
        if precision not in ("fp32", "fp16"):
            raise EngineError(f"ort-tensorrt precision must be fp32 or fp16, got {precision!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.precision = precision
        self.device_id = device_id
        self.cache_dir = Path(cache_dir or manifest.directory / "ort-tensorrt-cache")
        self.workspace_gb = workspace_gb
        super().__init__(manifest, **options)

    def session(self, bucket: tuple[int, int]) -> Any:
        # The profile names this bucket's shapes, so each bucket gets its own provider options.
        if bucket not in self._sessions:
            self.providers = [
                (TENSORRT_PROVIDER, self.provider_options(bucket)),
                (CUDA_PROVIDER, {"device_id": self.device_id}),
                "CPUExecutionProvider",
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


def unavailable_reason(manifest: EngineManifest | None = None) -> str | None:
    """The module's reason is ort-cuda's; each class has its own (`backend_status` uses it)."""
    return OrtCudaBackend.unavailable_reason(manifest)
