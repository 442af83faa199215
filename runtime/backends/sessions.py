"""ONNX Runtime sessions over shared weights: what the ort backends, the exporter and the bench's
profiler open their sessions with."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from ..manifest import EngineManifest
from ..optional import optional_import
from ..weights import MappedWeights, mapped_weights


def onnxruntime_module() -> ModuleType:
    """The onnxruntime package (a hard dependency; MissingDependency says how to install it)."""
    return optional_import(
        "onnxruntime", "the ort backends need onnxruntime", "pip install onnxruntime"
    )


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, the CPU always."""
    available = onnxruntime_module().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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
    ort = onnxruntime_module()
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
        ort = onnxruntime_module()
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in mapped.arrays.items()}
        cached = _ortvalue_cache[path] = (mapped, values)
    return cached[1]


def engine_initializers(manifest: EngineManifest) -> dict[str, Any]:
    """`shared_initializers` of the engine directory's weights file."""
    weights = manifest.data["weights"]
    return shared_initializers(manifest.directory / weights["file"], weights["tensors"])
