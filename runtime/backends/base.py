"""The backend contract: what every backend is, takes and returns.

A backend runs one bucket's graph on a batch of images. Every backend class

- is made as `Cls(manifest, **options)`, `manifest` an EngineManifest and `options` named from
  OPTIONS below (each class lists the ones it takes in `options`; `open_backend` refuses any
  other by name before making the backend);
- `run(bucket, images)`: `images` is one bucket's C-contiguous uint8 [N, H, W, 3] RGB batch
  (`check_batch` says what is wrong with anything else); returns {output name: float32 array
  [N, ...]} with the manifest's output names, in the manifest's order;
- `close()` frees what it holds (sessions, device memory); the backend is not used after it;
- `unavailable_reason(manifest=None)`, a classmethod: None when the backend can run here (and,
  given a manifest, on that engine directory, e.g. TensorRT plans built for this GPU), otherwise
  one line saying what is missing. It imports nothing heavy that it can avoid.

Options: one vocabulary for every backend (`OPTIONS`, name -> meaning). A backend takes the
subset in its `options`; every backend takes `precision` and refuses, with an EngineError, one it
cannot run (`check_backend_precision`). Devices are strings everywhere (`check_device`,
`cuda_index`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from ..manifest import EngineError
from ..settings import PRECISIONS

if TYPE_CHECKING:
    import numpy as np

    from ..manifest import EngineManifest

# The one vocabulary of backend options (a backend's `options` is a subset of these names).
OPTIONS: dict[str, str] = {
    "device": '"auto", "cpu", "cuda" or "cuda:N" (GPU-only backends: "cuda" or "cuda:N")',
    "precision": f"one of {', '.join(PRECISIONS)}; each backend refuses what it cannot run",
    "threads": "CPU threads of an ONNX Runtime session (0: every core)",
    "max_open_buckets": "sessions or plans kept open, least recently used closed first",
    "providers": "ONNX Runtime execution providers: names or (name, options) pairs",
    "prepack": "let ONNX Runtime keep its own reordered weights per session (faster, more memory)",
    "release_memory": "give memory back to the OS after every batch (arena shrink, malloc_trim)",
    "compile": 'torch.compile per bucket: True, False or "auto" (on for CUDA)',
    "compile_mode": "torch.compile's mode",
    "channels_last": "NHWC convolutions in torch (None: on for CUDA)",
    "seed_scale": "top-gradient scale of reduced precision (default: settings.seed_scale_for)",
    "max_batch": "largest batch of a TensorRT optimisation profile; larger batches run in chunks",
    "cache_dir": "where ONNX Runtime's TensorRT provider caches its engines",
    "workspace_gb": "TensorRT builder workspace, GB",
    "lazy": "build a missing TensorRT plan on its first use (default: the manifest's setting)",
}
CPU_DEVICES = ("auto", "cpu", "cuda")
GPU_DEVICES = ("cuda",)
_CUDA_N = re.compile(r"cuda:\d+")


class UnknownOption(EngineError, TypeError):
    """A backend was given an option it does not take (a TypeError too, as for any call with an
    unexpected keyword)."""


def check_device(device: object, choices: tuple[str, ...] = CPU_DEVICES) -> str:
    """`device` when it is one of `choices` or "cuda:N" (when "cuda" is a choice), else an
    EngineError naming the choices."""
    if isinstance(device, str) and (
        device in choices or ("cuda" in choices and _CUDA_N.fullmatch(device))
    ):
        return device
    named = ", ".join(repr(c) for c in choices)
    raise EngineError(f"device must be one of {named} or 'cuda:N', got {device!r}")


def cuda_index(device: str) -> int:
    """The CUDA device number of "cuda" (0) or "cuda:N" (N)."""
    check_device(device, GPU_DEVICES)
    return int(device.partition(":")[2] or 0)


def check_backend_precision(name: str, precision: str, supported: tuple[str, ...]) -> str:
    """`precision` when backend `name` runs it, else an EngineError saying what it runs."""
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision in supported:
        return precision
    if supported == ("fp32",):
        raise EngineError(
            f"{name} runs the exported float32 graphs only, not {precision!r}; use backend "
            "'tensorrt', 'ort-tensorrt' (fp16) or 'torch' for reduced precision"
        )
    raise EngineError(f"{name} precision must be {' or '.join(supported)}, got {precision!r}")


class Backend(ABC):
    """One bucket's graph run on uint8 batches (the contract: this module's docstring)."""

    name: ClassVar[str]
    # The OPTIONS this backend takes as keyword arguments.
    options: ClassVar[frozenset[str]]
    # The PRECISIONS it runs.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    manifest: EngineManifest

    @abstractmethod
    def __init__(self, manifest: EngineManifest, **options: Any) -> None:
        """Open on `manifest` with `options` (keyword arguments, named in `options`)."""

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """None when this backend can run here (on `manifest`, if given), else why not."""

    @abstractmethod
    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        """{output name: float32 [N, ...]} of one bucket's uint8 [N, H, W, 3] batch."""

    @abstractmethod
    def close(self) -> None:
        """Free sessions, plans and device memory."""

    @classmethod
    def check_precision(cls, precision: str) -> str:
        return check_backend_precision(cls.name, precision, cls.precisions)

    @classmethod
    def check_options(cls, options: dict[str, object]) -> None:
        """Refuse, by name, an option this backend does not take."""
        unknown = sorted(set(options) - cls.options)
        if unknown:
            names = ", ".join(repr(n) for n in unknown)
            raise UnknownOption(
                f"backend {cls.name!r} takes no option {names} "
                f"(it takes: {', '.join(sorted(cls.options))})"
            )
