"""What TensorRT's builder and backend share: the plan files' names, the manifest's `tensorrt`
section and build facts, whether a plan runs here, the rebuild command, and the tensorrt and
cuda-python modules (imported when first asked for, with an EngineError saying what to install).

Imports no other module of engines/, so that the builder (tensorrt_build) and the
backend (tensorrt_backend) both depend on this one and never on each other at import time.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from interactive_features.runtime import weights
from interactive_features.runtime.buckets import format_size
from interactive_features.runtime.manifest import EngineError, EngineManifest

INSTALL = (
    "pip install 'interactive-features[gpu]' tensorrt (TensorRT's wheels; NVIDIA's index: "
    "--extra-index-url https://pypi.nvidia.com)"
)


def tensorrt_module() -> Any:
    """The real `tensorrt` package, or an EngineError saying what to install.

    tensorrt-stubs alone (the type-checking stubs) import as an empty namespace package.
    """
    try:
        import tensorrt
    except ImportError as err:
        raise EngineError(f"TensorRT is not installed ({err}): {INSTALL}") from err
    if not hasattr(tensorrt, "Builder"):
        raise EngineError(f"only TensorRT's type stubs are installed, not TensorRT: {INSTALL}")
    return tensorrt


def cudart_module() -> Any:
    """cuda-python's CUDA runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` before
    cuda-python 12.6), or an EngineError saying what to install."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as err:
            raise EngineError(f"cuda-python is not installed ({err}): {INSTALL}") from err
    return runtime


def cuda_call(result: Any) -> Any:
    """cuda-python calls return (error, *values): raise on an error, else the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        _, name = cudart_module().cudaGetErrorName(error)
        raise RuntimeError(
            f"CUDA error {int(error)}: {name.decode() if isinstance(name, bytes) else name}"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_facts(device: int = 0) -> dict[str, str]:
    """What a plan is tied to on this host: TensorRT version, GPU name, compute capability."""
    version = tensorrt_module().__version__
    props = cuda_call(cudart_module().cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt": str(version),
        "gpu": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def plan_name(bucket: tuple[int, int], precision: str) -> str:
    return f"bucket-{format_size(bucket)}.{precision}.plan"


def graph_name(bucket: tuple[int, int], precision: str) -> str:
    return f"bucket-{format_size(bucket)}.{precision}.trt.onnx"


def tensorrt_section(manifest: EngineManifest) -> dict[str, Any]:
    """manifest["tensorrt"]: {"settings": last build's options, "plans": {bucket: {precision:
    build facts}}}; empty sections when nothing was built."""
    section: dict[str, Any] = manifest.data.get("tensorrt") or {}
    section.setdefault("settings", {})
    section.setdefault("plans", {})
    return section


def plan_facts(manifest: EngineManifest, bucket: tuple[int, int], precision: str) -> dict | None:
    found: dict | None = (
        tensorrt_section(manifest)["plans"].get(format_size(bucket), {}).get(precision)
    )
    return found


def build_command(
    manifest: EngineManifest,
    precision: str,
    buckets: list[tuple[int, int]] | None = None,
    max_batch: int | None = None,
    force: bool = False,
) -> str:
    """The `interactive build` command that (re)builds these plans."""
    args = ["interactive", "build", "--engine", str(manifest.directory), "--backend", "tensorrt"]
    args += ["--precision", precision]
    if buckets:
        args += ["--buckets", ",".join(format_size(b) for b in buckets)]
    if max_batch:
        args += ["--max-batch", str(max_batch)]
    if force:
        args.append("--force")
    return shlex.join(args)


def plan_incompatibility(facts: dict[str, Any], here: dict[str, str]) -> str | None:
    """Why a plan built with `facts` cannot run `here` (gpu_facts() plus the engine's
    `weights_sha256`), or None. Same TensorRT version and compute capability are required
    (TensorRT refuses anything else); the same weights too, since plans are refitted from the
    directory's weights under REFIT_IDENTICAL."""
    problems = []
    if facts.get("tensorrt") != here.get("tensorrt"):
        problems.append(f"TensorRT {facts.get('tensorrt')} (this host has {here.get('tensorrt')})")
    if facts.get("compute_capability") != here.get("compute_capability"):
        problems.append(
            f"{facts.get('gpu')}, compute capability {facts.get('compute_capability')} (this "
            f"host has {here.get('gpu')}, {here.get('compute_capability')})"
        )
    if "weights_sha256" in here and facts.get("weights_sha256") != here["weights_sha256"]:
        problems.append("other weights than this directory's weights.bin")
    return "built for " + " and ".join(problems) if problems else None


def here_facts(manifest: EngineManifest, device: int = 0) -> dict[str, str]:
    facts = gpu_facts(device)
    sha = manifest.data.get("weights", {}).get("sha256")
    if sha:
        facts["weights_sha256"] = str(sha)
    return facts


# --- the reduced-precision weights files (one per precision, shared by every bucket) ----------

REDUCED_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def reduced_weights_name(precision: str) -> str:
    """weights.fp16.bin / weights.bf16.bin: the weights that fp16/bf16 TensorRT graphs' reduced
    operations take, in that type, converted once from weights.bin."""
    if precision not in REDUCED_DTYPES:
        raise ValueError(f"no reduced weights file for precision {precision!r}")
    return f"weights.{precision}.bin"


def reduced_weights_entry(manifest: EngineManifest, precision: str) -> dict[str, Any] | None:
    """manifest["tensorrt"]["reduced_weights"][precision] (file, bytes, sha256, tensors), or
    None when that precision's file was never written."""
    found: dict[str, Any] | None = (
        tensorrt_section(manifest).get("reduced_weights", {}).get(precision)
    )
    return found


_file_digests: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered per process while its size and modification time hold."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = weights.file_sha256(path)
    return _file_digests[key]


def verify_reduced_weights(manifest: EngineManifest, precision: str) -> dict[str, Any]:
    """The manifest's entry for `precision`'s reduced weights file, after checking the file
    against it: its name, size and sha256, and every tensor's bytes (EngineError naming the file
    and the fix otherwise)."""
    from interactive_features.runtime.weights import verify_weights

    expected = reduced_weights_name(precision)
    rebuild = build_command(manifest, precision, force=True)
    entry = reduced_weights_entry(manifest, precision)
    if entry is None:
        raise EngineError(
            f"{manifest.directory}: the manifest records no {expected}; rebuild with `{rebuild}`"
        )
    if entry.get("file") != expected:
        raise EngineError(
            f"{manifest.directory}: tensorrt.reduced_weights.{precision}.file must be "
            f"{expected!r}, got {entry.get('file')!r}"
        )
    path = manifest.directory / expected
    if not path.is_file():
        raise EngineError(f"{path} is missing; rebuild the plans with `{rebuild}`")
    if path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
        raise EngineError(
            f"{path} does not match the size and sha256 in the manifest (corrupt or changed "
            f"after the build); rebuild with `{rebuild}`"
        )
    verify_weights(path, entry["tensors"])  # each tensor's bytes (cached per file state)
    return entry
