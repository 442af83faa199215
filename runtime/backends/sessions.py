"""ONNX Runtime sessions over shared weights: what the ort backends, the exporter and the bench's
profiler open their sessions with.

Telemetry: official onnxruntime builds record usage events (model file names included) under
~/.cache/Microsoft/DeveloperTools/.onnxruntime and upload them. ONNX Runtime reads
ORT_DISABLE_TELEMETRY=1 once, when it is first imported, so this module sets it (unless the user
set it) when it is imported itself, before any onnxruntime import of this package, and
`onnxruntime_module` also calls `disable_telemetry_events()` where the build has it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from ..manifest import EngineError, EngineManifest
from ..optional import optional_import
from ..weights import MappedWeights, mapped_weights

TELEMETRY_VARIABLE = "ORT_DISABLE_TELEMETRY"
os.environ.setdefault(TELEMETRY_VARIABLE, "1")


class BadGraphError(EngineError):
    """ONNX Runtime cannot open a graph file (missing, unreadable, not an ONNX model, invalid)."""


def onnxruntime_module() -> ModuleType:
    """The onnxruntime package (a hard dependency; MissingDependency says how to install it),
    with its telemetry off (see the module docstring)."""
    global _telemetry_off
    os.environ.setdefault(TELEMETRY_VARIABLE, "1")  # effective if onnxruntime is not loaded yet
    ort = optional_import(
        "onnxruntime", "the ort backends need onnxruntime", "pip install onnxruntime"
    )
    if not _telemetry_off:
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()  # the events of a process that imported it earlier
        _telemetry_off = True
    return ort


_telemetry_off = False


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
    arena: bool = True,
) -> Any:
    """An InferenceSession whose weights come from `initializers` (shared OrtValues), not copies.

    Activations come from one CPU arena for the whole process (`shared_cpu_arena`), not from
    malloc: a fresh allocation is fresh pages that the kernel maps and zeroes on first touch
    (80,000 page faults per 512x512 image, measured), while the arena reuses the same pages
    tensor after tensor, run after run and bucket after bucket, so it holds one run's peak
    however many sessions are open. `release_after_run` gives that memory back after a run;
    `arena=False` opens the session as before the arena (malloc per tensor: the bench's
    baseline).
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
    if arena:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        # A memory pattern is one block per run, sized by the bucket: the arena kept a block of
        # each size seen (RSS 1.5 -> 2.4 GB over 12 batches of 4 buckets, measured); per-tensor
        # allocations reuse the same chunks for every bucket (flat at 1.5 GB), and no slower.
        options.enable_mem_pattern = False
    else:
        options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(model), options, providers=providers or default_providers())
    except _graph_errors(ort) as err:
        raise BadGraphError(
            f"{model}: ONNX Runtime cannot open this graph ({_reason(err)})"
        ) from err


_arena_registered = False
_arena_lock = threading.Lock()  # two threads opening their first sessions register it once


def shared_cpu_arena() -> None:
    """Register (once per process) the CPU arena that every `ort_session` allocates from.

    It grows by what each allocation asks (not by powers of two); `release_after_run` hands its
    unused memory back.
    """
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        ort = onnxruntime_module()
        cpu = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # max_mem 0 (no cap), extend strategy 1 (kSameAsRequested), default chunk and dead bytes.
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, 1, -1, -1))
        _arena_registered = True


def release_after_run() -> Any:
    """RunOptions that shrink the shared CPU arena at the end of the run: its free memory goes
    back to the OS (and the next run maps fresh pages again)."""
    options = onnxruntime_module().RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


# What ONNX Runtime raises for a graph file it cannot load (missing, unreadable, garbage, empty,
# an invalid or unsupported graph); a failing device or provider (RuntimeException, EPFail) is
# not the file's fault and propagates as it is.
_GRAPH_ERRORS = ("InvalidProtobuf", "InvalidArgument", "NoSuchFile", "InvalidGraph", "Fail",
                 "NotImplemented")  # fmt: skip


def _graph_errors(ort: ModuleType) -> tuple[type[BaseException], ...]:
    state = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    found = [getattr(state, name, None) for name in _GRAPH_ERRORS]
    return (OSError, *(e for e in found if isinstance(e, type) and issubclass(e, Exception)))


def _reason(err: BaseException) -> str:
    """ORT's message in one line, without its "[ONNXRuntimeError] : 7 : Load model from X
    failed:" preamble."""
    text = " ".join(str(err).split())
    code = text.split(" : ")[2] if text.count(" : ") >= 3 else type(err).__name__
    detail = text.rsplit("failed:", 1)[-1].strip() if "failed:" in text else text
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return f"{code}: {detail}"


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
    return shared_initializers(manifest.weights_path, manifest.data["weights"]["tensors"])
