"""`interactive build --backend tensorrt`: weight-stripped TensorRT plans from an engine directory.

The ONNX rewrite that decides what TensorRT computes in which precision (`tensorrt_graph`) needs
the onnx package only; building the plans (`build_plans`) needs TensorRT and a GPU.

Per bucket and precision the builder writes two small files beside `weights.bin`:
- `bucket-WxH.PRECISION.trt.onnx`: the bucket's graph prepared for TensorRT (below), its
  initializers still pointing into `weights.bin`;
- `bucket-WxH.PRECISION.plan`: the engine, built weight-stripped (STRIP_PLAN + REFIT_IDENTICAL),
  so it holds kernels and no weights; the runtime refits it from the graph above at load.
and records the build facts in the manifest (`tensorrt.plans[bucket][precision]`): TensorRT
version, GPU and compute capability, precision, batch range, workspace, seconds, seed scale. One
timing cache per GPU architecture and TensorRT version is reused across buckets and builds.

The graph for TensorRT: the uint8 input is cast to float first (TensorRT takes uint8 only as a
network input). For fp16/bf16 the network is strongly typed (TensorRT 11 has no other kind):
convolutions, their ReLUs and the max pools run in the reduced type, weights cast once at build
time; everything else (the seed, ReLU masks, routing, channel and box sums, means, outputs)
stays float32, and the seed gradient is multiplied by REDUCED_SEED_SCALE where it enters the
backward pass and every output divided by it, so that no gradient underflows (export/ALGORITHM.md
section 6; everything after the seed is linear in it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interactive.runtime.atomic import atomic_path, write_bytes
from interactive.runtime.buckets import format_size
from interactive.runtime.locks import ENGINE_LOCK, exclusive_lock
from interactive.runtime.manifest import EngineError, EngineManifest, write_manifest
from interactive.runtime.settings import PRECISIONS, REDUCED_SEED_SCALE, seed_scale_for

from .tensorrt_plans import graph_name, here_facts, plan_name, tensorrt_module, tensorrt_section

if TYPE_CHECKING:  # mypy checks the TensorRT calls against tensorrt-stubs
    import tensorrt as trt

# The work that reduced precision speeds up; every other node stays float32.
REDUCED_OPS = frozenset({"Conv", "ConvTranspose", "Relu", "MaxPool"})
BF16_OPSET = 22
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"})


@dataclass
class BuildSettings:
    """`interactive build`'s options. `lazy`: record these settings and build each plan on its
    first use instead of now; `force`: build now, also under lazy, rebuilding plans that exist."""

    precision: str = "fp16"
    max_batch: int = 8
    workspace_gb: float = 4.0
    lazy: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.workspace_gb <= 0:
            raise ValueError(f"--workspace must be positive (GB), got {self.workspace_gb}")

    @classmethod
    def from_manifest(cls, manifest: EngineManifest, **overrides: Any) -> BuildSettings:
        """The settings of the directory's last build (what a lazy build reuses)."""
        recorded = {
            k: v
            for k, v in tensorrt_section(manifest)["settings"].items()
            if k in cls.__dataclass_fields__
        }
        return cls(**{**recorded, "force": False, **overrides})


# --- the graph TensorRT builds from (pure ONNX; tested on the CPU) ----------------------------


def tensorrt_graph(model: Any, precision: str, seed_scale: float = REDUCED_SEED_SCALE) -> Any:
    """A copy of a bucket's ONNX model prepared for TensorRT at `precision` (module docstring).

    `seed_scale` applies to fp16/bf16 only; fp32 graphs compute exactly what the export did.
    """
    import onnx

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    graph = prepared.graph
    _cast_input_first(graph)
    if precision != "fp32":
        scale_seed(graph, seed_scale)
        low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
        lower_precision(graph, low, precision)
    if precision == "bf16":  # ONNX allows bfloat16 convolutions and pools from opset 22 on
        for opset in prepared.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, BF16_OPSET)
    del graph.value_info[:]  # stale types; TensorRT and ONNX Runtime infer them again
    return prepared


def _replace_inputs(graph: Any, old: str, new: str, skip: Any = None) -> None:
    for node in graph.node:
        if node is not skip:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


def _cast_input_first(graph: Any) -> None:
    """images (uint8) -> Cast to float before any other node touches it."""
    import onnx

    name = graph.input[0].name
    cast = onnx.helper.make_node(
        "Cast", [name], [f"{name}.float"], to=onnx.TensorProto.FLOAT, name=f"{name}.float"
    )
    _replace_inputs(graph, name, f"{name}.float")
    graph.node.insert(0, cast)


def _static_tensors(graph: Any) -> set[str]:
    """Initializers, constants and shape arithmetic: values that depend on no pixel."""
    static = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in ("Constant", "Shape") or all(i in static for i in node.input if i):
            static.update(node.output)
    return static


def scale_seed(graph: Any, scale: float) -> tuple[int, int]:
    """Multiply each seed gradient by `scale` where the backward pass takes it, and divide every
    output that depends on it; returns (seeds scaled, outputs divided).

    A seed is what the graph computes from a reduction of forward values alone (the top unit's
    mean, then its slope or sign, times -1/positions): the tensors of that chain, taken where
    a node outside it first uses them. Everything downstream of a seed is linear in it.
    """
    import numpy as np
    import onnx

    static = _static_tensors(graph)
    seed: set[str] = set()  # tensors of a seed chain
    downstream: set[str] = set()  # tensors that depend on a seed through a backward node
    entries: list[tuple[Any, int]] = []  # (node, input index) where a seed enters
    for node in graph.node:
        live = [i for i in node.input if i and i not in static]
        if not live:
            continue
        if node.op_type in REDUCE_OPS and not any(i in seed or i in downstream for i in live):
            seed.update(node.output)  # a reduction of forward values: a seed chain starts
        elif all(i in seed for i in live):
            seed.update(node.output)
        elif any(i in seed or i in downstream for i in live):
            downstream.update(node.output)
            entries += [(node, k) for k, i in enumerate(node.input) if i in seed]
    scale_name = "seed_scale"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), scale_name))
    scaled: dict[str, str] = {}
    for node, k in entries:
        name = node.input[k]
        if name not in scaled:
            scaled[name] = f"{name}.scaled"
            mul = onnx.helper.make_node(
                "Mul", [name, scale_name], [scaled[name]], name=scaled[name]
            )
            graph.node.insert(list(graph.node).index(node), mul)
        node.input[k] = scaled[name]
    divided = [o.name for o in graph.output if o.name in downstream]
    for out in divided:
        _divide_output(graph, out, scale_name)
    return len(scaled), len(divided)


def _divide_output(graph: Any, output: str, divisor: str) -> None:
    import onnx

    producer = next(n for n in graph.node if output in n.output)
    unscaled = f"{output}.scaled"
    producer.output[list(producer.output).index(output)] = unscaled
    _replace_inputs(graph, output, unscaled)
    div = onnx.helper.make_node("Div", [unscaled, divisor], [output], name=f"{output}.unscale")
    graph.node.insert(list(graph.node).index(producer) + 1, div)


def lower_precision(graph: Any, low: int, suffix: str) -> int:
    """Run REDUCED_OPS nodes in type `low` (casting their inputs, weights included, once each)
    and cast their results back to float32 where another node or an output takes them.
    Returns the number of nodes lowered."""
    import onnx

    native: set[str] = set()  # tensors a lowered node produced (type `low`)
    casts: dict[str, str] = {}  # tensor -> its cast twin
    nodes = []

    def cast(name: str, to: int, tag: str) -> str:
        if name not in casts:
            casts[name] = f"{name}.{tag}"
            nodes.append(
                onnx.helper.make_node("Cast", [name], [casts[name]], to=to, name=casts[name])
            )
        return casts[name]

    lowered = 0
    for node in graph.node:
        # The box sums of the activeness collection (all-ones kernels) add up to thousands of
        # scaled gradients: float32, like the other sums.
        box = any(name.startswith("box_") for name in node.input)
        if node.op_type in REDUCED_OPS and not box:
            for k, name in enumerate(node.input):
                if name and name not in native:
                    node.input[k] = cast(name, low, suffix)
            native.update(node.output)
            lowered += 1
        else:
            for k, name in enumerate(node.input):
                if name in native:
                    node.input[k] = cast(name, onnx.TensorProto.FLOAT, "fp32")
        nodes.append(node)
    outputs = {o.name for o in graph.output}
    if outputs & native:
        raise ValueError(f"outputs {sorted(outputs & native)} would be reduced precision")
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered


def write_tensorrt_graph(manifest: EngineManifest, bucket: tuple[int, int], precision: str) -> Path:
    """bucket-WxH.PRECISION.trt.onnx beside the bucket's graph; its weights stay in weights.bin."""
    import onnx

    model = onnx.load(str(manifest.bucket_path(bucket)), load_external_data=False)
    path = manifest.directory / graph_name(bucket, precision)
    with atomic_path(path) as tmp:
        onnx.save(tensorrt_graph(model, precision), str(tmp))
    return path


# --- TensorRT (needs a GPU) -------------------------------------------------------------------


def timing_cache_name(here: dict[str, str]) -> str:
    """One timing cache per GPU architecture and TensorRT version (TensorRT rejects others)."""
    return (
        f"tensorrt-sm{here['compute_capability'].replace('.', '')}-{here['tensorrt']}.timing-cache"
    )


def build_plans(
    directory: Path,
    settings: BuildSettings,
    buckets: list[tuple[int, int]] | None = None,
    log: Callable[[str], None] = print,
) -> EngineManifest:
    """Build the missing (all with `force`) plans of `buckets` (default: every bucket of the
    directory); the manifest is rewritten after each. Returns the final manifest.

    Holds the engine directory's lock (runtime/locks.py) throughout, as `interactive export`
    does: a concurrent export or build of the same directory is refused at once (LockedError).
    """
    EngineManifest.load(directory)  # a directory that is no engine: that error, not the lock's
    with exclusive_lock(Path(directory) / ENGINE_LOCK, f"engine directory {directory}"):
        return _build_plans_locked(directory, settings, buckets, log)


def _build_plans_locked(
    directory: Path,
    settings: BuildSettings,
    buckets: list[tuple[int, int]] | None,
    log: Callable[[str], None],
) -> EngineManifest:
    manifest = EngineManifest.load(directory)  # under the lock: the latest manifest
    buckets = buckets or manifest.buckets
    for bucket in buckets:
        manifest.bucket_path(bucket)  # a bucket without a graph names the export command
    tensorrt_module()  # before touching the manifest: a lazy build needs TensorRT too
    import tensorrt as trt

    here = here_facts(manifest)
    section = tensorrt_section(manifest)
    section["settings"] = {k: v for k, v in asdict(settings).items() if k != "force"}
    manifest.data["tensorrt"] = section
    write_manifest(manifest.directory, manifest.data)
    if settings.lazy and not settings.force:
        log(f"lazy: plans of {directory} will be built on first use ({settings.precision})")
        return manifest
    logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_file = manifest.directory / timing_cache_name(here)
    cache_config = builder.create_builder_config()
    cache = cache_config.create_timing_cache(
        cache_file.read_bytes() if cache_file.exists() else b""
    )
    for n, bucket in enumerate(buckets, 1):
        existing = section["plans"].get(format_size(bucket), {}).get(settings.precision)
        if existing is not None and not settings.force:
            label = f"[{n}/{len(buckets)}] {format_size(bucket)} {settings.precision}"
            log(f"{label}: plan exists (--force rebuilds)")
            continue
        started = time.perf_counter()
        graph = write_tensorrt_graph(manifest, bucket, settings.precision)
        plan = _build_plan(builder, logger, graph, manifest.input_name, bucket, settings, cache)
        path = write_bytes(manifest.directory / plan_name(bucket, settings.precision), plan)
        write_bytes(cache_file, bytes(cache.serialize()))
        facts = {
            "file": path.name,
            "graph": graph.name,
            "bytes": len(plan),
            **here,
            "precision": settings.precision,
            "seed_scale": seed_scale_for(settings.precision),
            "batch": {"min": 1, "opt": settings.max_batch, "max": settings.max_batch},
            "workspace_gb": settings.workspace_gb,
            "weight_stripped": True,
            "build_seconds": round(time.perf_counter() - started, 1),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        section["plans"].setdefault(format_size(bucket), {})[settings.precision] = facts
        write_manifest(manifest.directory, manifest.data)
        log(
            f"[{n}/{len(buckets)}] {format_size(bucket)} {settings.precision}: "
            f"{facts['build_seconds']:.0f} s, {path.name} ({len(plan) / 2**20:.1f} MiB)"
        )
    return EngineManifest.load(directory)


def _build_plan(
    builder: trt.Builder,
    logger: trt.ILogger,
    graph: Path,
    input_name: str,
    bucket: tuple[int, int],
    settings: BuildSettings,
    cache: trt.ITimingCache,
) -> bytes:
    import tensorrt as trt

    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {graph.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * 2**30))
    config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if settings.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 products alone approach the 1e-3 tolerance
    if not config.set_timing_cache(cache, False):
        raise EngineError("TensorRT refused the timing cache")
    width, height = bucket
    profile = builder.create_optimization_profile()
    largest = trt.Dims([settings.max_batch, height, width, 3])
    smallest = trt.Dims([1, height, width, 3])
    profile.set_shape(input_name, smallest, largest, largest)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build {graph.name} (see its log above)")
    return bytes(plan)
