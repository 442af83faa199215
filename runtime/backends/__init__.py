"""Backends run one bucket's graph on a uint8 [N, H, W, 3] batch; `open_backend` picks one.

| module          | holds                                                                  |
|-----------------|------------------------------------------------------------------------|
| `base`          | `Backend` (the contract), the options vocabulary `OPTIONS`, devices     |
| `common`        | `check_batch`, `BucketCache`, `cuda_device_count`, `release_freed_memory` |
| `sessions`      | ONNX Runtime sessions over shared weights (`ort_session`, ...)          |
| `ort`           | `OrtBackend` (`ort`), `OrtCudaBackend`, `OrtTensorrtBackend`            |
| `loader`        | `backend_class`, `backend_status`, `available_backends`, `open_backend` |

The names and classes of every backend are in runtime/registry.py; `torch` lives in
export/torch_backend.py, `tensorrt` in engines/tensorrt_backend.py, each imported only when
asked for.
"""

from .base import OPTIONS, Backend, UnknownOption, check_device, cuda_index
from .common import BucketCache, check_batch, cuda_device_count, release_freed_memory
from .loader import available_backends, backend_class, backend_status, open_backend
from .ort import OrtBackend
from .sessions import (
    default_providers,
    engine_initializers,
    onnxruntime_module,
    ort_session,
    shared_initializers,
)

__all__ = [
    "OPTIONS",
    "Backend",
    "BucketCache",
    "OrtBackend",
    "UnknownOption",
    "available_backends",
    "backend_class",
    "backend_status",
    "check_batch",
    "check_device",
    "cuda_device_count",
    "cuda_index",
    "default_providers",
    "engine_initializers",
    "onnxruntime_module",
    "open_backend",
    "ort_session",
    "release_freed_memory",
    "shared_initializers",
]
