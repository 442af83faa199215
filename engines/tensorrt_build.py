"""`interactive build --backend tensorrt`: weight-stripped TensorRT plans from an engine directory.

The ONNX rewrite that decides what TensorRT computes in which precision (`tensorrt_graph`) needs
the onnx package only; building the plans (`build_plans`) needs TensorRT and a GPU.

Per bucket and precision the builder writes two small files beside `weights.bin`:
- `bucket-WxH.PRECISION.trt.onnx`: the bucket's graph prepared for TensorRT (below), its
  float32 initializers still pointing into `weights.bin`, for fp16/bf16 its reduced ones into
  `weights.PRECISION.bin`;
- `bucket-WxH.PRECISION.plan`: the engine, built weight-stripped (STRIP_PLAN + REFIT_IDENTICAL),
  so it holds kernels and no weights; the runtime refits it from the graph above at load.
and records the build facts in the manifest (`tensorrt.plans[bucket][precision]`): TensorRT
version, GPU and compute capability, precision, batch range, workspace, seconds, seed scale,
and a self-check (`self_check_plan`: the plan loaded and refitted as the runtime does, run
once, judged against ONNX Runtime on the CPU). One
timing cache per GPU architecture and TensorRT version is reused across buckets and builds.

For fp16/bf16, one more file per precision, shared by every bucket: `weights.PRECISION.bin`,
the weights.bin tensors that lowered nodes take, converted once to the reduced type (fp16: IEEE
half; bf16: float32's upper 16 bits rounded to nearest even), 64 KiB-aligned like weights.bin,
recorded in the manifest (`tensorrt.reduced_weights[precision]`: file, bytes, sha256, and per
tensor offset, length, dtype, shape, sha256, source_sha256). The graphs take these as
initializers of the reduced type, never as Casts of float32 weights: TensorRT folds a Cast of a
constant into a constant of its own, which a weight-stripped plan may keep (unstripped) or the
refitter may fail to fill.

The graph for TensorRT: the uint8 input is cast to float first (TensorRT takes uint8 only as a
network input). For fp16/bf16 the network is strongly typed (TensorRT 11 has no other kind):
convolutions, their ReLUs and the max pools run in the reduced type, their weights stored in
it; everything else (the seed, ReLU masks, routing, channel and box sums, means, outputs)
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

from interactive_features.runtime.atomic import atomic_path, write_bytes
from interactive_features.runtime.buckets import format_size
from interactive_features.runtime.locks import ENGINE_LOCK, exclusive_lock
from interactive_features.runtime.manifest import EngineError, EngineManifest, write_manifest
from interactive_features.runtime.settings import PRECISIONS, REDUCED_SEED_SCALE, seed_scale_for

from .tensorrt_plans import (
    REDUCED_DTYPES,
    graph_name,
    here_facts,
    plan_name,
    reduced_weights_entry,
    reduced_weights_name,
    tensorrt_module,
    tensorrt_section,
    verify_reduced_weights,
)

if TYPE_CHECKING:  # mypy checks the TensorRT calls against tensorrt-stubs
    import tensorrt as trt

# The work that reduced precision speeds up; every other node stays float32.
REDUCED_OPS = frozenset({"Conv", "ConvTranspose", "Relu", "MaxPool"})
BF16_OPSET = 22
REDUCED_ONNX_TYPES = {"fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT16, BFLOAT16
ALIGNMENT = 64 * 1024  # of every tensor in a reduced weights file, as in weights.bin
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


def tensorrt_graph(
    model: Any,
    precision: str,
    seed_scale: float = REDUCED_SEED_SCALE,
    reduced: dict[str, Any] | None = None,
) -> Any:
    """A copy of a bucket's ONNX model prepared for TensorRT at `precision` (module docstring).

    `seed_scale` applies to fp16/bf16 only; fp32 graphs compute exactly what the export did.
    `reduced` (fp16/bf16): the manifest's entry for the precision's reduced weights file
    (`write_reduced_weights`), where the lowered operations' external weights are read from.
    """
    import onnx

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    graph = prepared.graph
    _cast_input_first(graph)
    if precision != "fp32":
        scale_seed(graph, seed_scale)
        lower_precision(graph, REDUCED_ONNX_TYPES[precision], precision, reduced)
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


def _lowered(node: Any) -> bool:
    """Whether `lower_precision` runs `node` in the reduced type. The box sums of the activeness
    collection (all-ones kernels) add up to thousands of scaled gradients: float32, like the
    other sums."""
    return node.op_type in REDUCED_OPS and not any(i.startswith("box_") for i in node.input)


def lowered_initializers(graph: Any) -> set[str]:
    """The initializers that lowered nodes take (the weights a reduced graph needs reduced)."""
    initializers = {t.name for t in graph.initializer}
    return {i for n in graph.node if _lowered(n) for i in n.input if i in initializers}


def lower_precision(
    graph: Any, low: int, suffix: str, reduced: dict[str, Any] | None = None
) -> int:
    """Run REDUCED_OPS nodes in type `low` and cast their results back to float32 where another
    node or an output takes them. Their weights are initializers of type `low`, never casts:
    small ones (inside the graph) converted in place, the others read from `reduced`'s file
    (external data; `reduced` is the manifest entry of `write_reduced_weights`). Their other
    inputs are cast once each. Returns the number of nodes lowered."""
    import onnx

    initializers = {t.name: t for t in graph.initializer}
    native: set[str] = set()  # tensors a lowered node produced (type `low`)
    casts: dict[str, str] = {}  # tensor -> its cast twin
    twins: dict[str, Any] = {}  # initializer -> its reduced twin
    nodes = []

    def cast(name: str, to: int, tag: str) -> str:
        if name not in casts:
            casts[name] = f"{name}.{tag}"
            nodes.append(
                onnx.helper.make_node("Cast", [name], [casts[name]], to=to, name=casts[name])
            )
        return casts[name]

    def twin(name: str) -> str:
        if name not in twins:
            twins[name] = reduced_initializer(initializers[name], low, suffix, reduced)
        return str(twins[name].name)

    lowered = 0
    for node in graph.node:
        if _lowered(node):
            for k, name in enumerate(node.input):
                if name in initializers:
                    node.input[k] = twin(name)
                elif name and name not in native:
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
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in used]  # fp32 weights no node takes: gone
    del graph.initializer[:]
    graph.initializer.extend(kept + list(twins.values()))
    return lowered


def reduced_initializer(init: Any, low: int, suffix: str, reduced: dict[str, Any] | None) -> Any:
    """`init`'s twin of type `low`, named NAME.SUFFIX: inside the graph when `init` is, else
    pointing into the reduced weights file."""
    import onnx

    precision = {v: k for k, v in REDUCED_ONNX_TYPES.items()}[low]
    twin = onnx.TensorProto(name=f"{init.name}.{suffix}", data_type=low, dims=list(init.dims))
    if init.data_location != onnx.TensorProto.EXTERNAL:
        twin.raw_data = reduced_bytes(onnx.numpy_helper.to_array(init), precision)
        return twin
    entry = reduced.get("tensors", {}).get(init.name) if reduced else None
    if reduced is None or entry is None:
        raise ValueError(
            f"weight {init.name!r} of a lowered node is not in "
            f"{(reduced or {}).get('file', reduced_weights_name(precision))}"
        )
    twin.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (
        ("location", str(reduced["file"])),
        ("offset", str(entry["offset"])),
        ("length", str(entry["length"])),
    ):
        item = twin.external_data.add()
        item.key, item.value = key, value
    return twin


def bfloat16_bits(array: Any) -> Any:
    """float32 values as bfloat16 bit patterns (uint16): the upper 16 bits of each float32,
    rounded to nearest, ties to even; NaNs stay (quiet) NaNs, infinities infinities."""
    import numpy as np

    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(array, np.float32))
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def reduced_bytes(array: Any, precision: str) -> bytes:
    """float32 `array` in fp16 (IEEE half, numpy's round to nearest even) or bf16, as ONNX raw
    data (little-endian)."""
    import numpy as np

    if precision == "fp16":
        return bytes(np.ascontiguousarray(array, np.float32).astype("<f2").tobytes())
    if precision == "bf16":
        return bytes(bfloat16_bits(array).astype("<u2").tobytes())
    raise ValueError(f"no reduced type for precision {precision!r}")


def reduced_tensor_names(manifest: EngineManifest) -> list[str]:
    """The weights.bin tensors that some bucket's lowered nodes take, in weights.bin's order."""
    import onnx

    table = manifest.data["weights"]["tensors"]
    names: set[str] = set()
    for bucket in manifest.buckets:
        model = onnx.load(str(manifest.bucket_path(bucket)), load_external_data=False)
        names |= lowered_initializers(model.graph) & set(table)
    return sorted(names, key=lambda n: int(table[n]["offset"]))


def write_reduced_weights(
    manifest: EngineManifest, precision: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Make sure weights.PRECISION.bin holds, in the reduced type, every weights.bin tensor the
    directory's lowered nodes take, and that the manifest records it
    (`tensorrt.reduced_weights[precision]`); returns that entry. Written once and shared by
    every bucket's graph; rewritten (atomically) only when a tensor is missing or its weights.bin
    source changed, keeping the recorded tensors first so their offsets stay. The caller holds
    the engine lock (build_plans does) and the manifest is rewritten when the file is."""
    import hashlib

    from interactive_features.runtime.weights import mapped_weights

    table = manifest.data["weights"]["tensors"]
    wanted = reduced_tensor_names(manifest)
    entry = reduced_weights_entry(manifest, precision)
    if entry is not None:
        recorded = entry.get("tensors", {})
        fresh = all(
            n in recorded and recorded[n].get("source_sha256") == table[n].get("sha256")
            for n in wanted
        )
        if fresh:
            try:
                return verify_reduced_weights(manifest, precision)
            except EngineError as err:
                log(f"rewriting {reduced_weights_name(precision)}: {err}")
        else:
            log(f"rewriting {reduced_weights_name(precision)}: new or changed weights")
        wanted = [n for n in recorded if n in table] + [n for n in wanted if n not in recorded]
    arrays = mapped_weights(manifest.weights_path, table).arrays
    name = reduced_weights_name(precision)
    tensors: dict[str, dict[str, Any]] = {}
    file_digest = hashlib.sha256()
    size = 0
    with atomic_path(manifest.directory / name) as tmp, open(tmp, "wb") as f:
        for tensor in wanted:
            data = reduced_bytes(arrays[tensor], precision)
            offset = -(-size // ALIGNMENT) * ALIGNMENT
            pad = b"\0" * (offset - size)
            f.write(pad)
            f.write(data)
            file_digest.update(pad)
            file_digest.update(data)
            size = offset + len(data)
            tensors[tensor] = {
                "offset": offset,
                "length": len(data),
                "dtype": REDUCED_DTYPES[precision],
                "shape": list(table[tensor]["shape"]),
                "sha256": hashlib.sha256(data).hexdigest(),
                "source_sha256": table[tensor].get("sha256"),
            }
        f.flush()
    entry = {
        "file": name,
        "bytes": size,
        "sha256": file_digest.hexdigest(),
        "alignment": ALIGNMENT,
        "source": manifest.data["weights"]["file"],
        "source_sha256": manifest.data["weights"].get("sha256"),
        "tensors": tensors,
    }
    section = tensorrt_section(manifest)
    section.setdefault("reduced_weights", {})[precision] = entry
    manifest.data["tensorrt"] = section
    write_manifest(manifest.directory, manifest.data)
    log(f"{name}: {len(tensors)} tensors in {precision}, {size / 2**20:.1f} MiB")
    return entry


def write_tensorrt_graph(
    manifest: EngineManifest,
    bucket: tuple[int, int],
    precision: str,
    log: Callable[[str], None] = print,
) -> Path:
    """bucket-WxH.PRECISION.trt.onnx beside the bucket's graph. Its float32 weights stay in
    weights.bin; for fp16/bf16 the lowered nodes' weights are read from weights.PRECISION.bin,
    written first if needed (`write_reduced_weights`: the caller holds the engine lock)."""
    import onnx

    model = onnx.load(str(manifest.bucket_path(bucket)), load_external_data=False)
    reduced = None if precision == "fp32" else write_reduced_weights(manifest, precision, log)
    path = manifest.directory / graph_name(bucket, precision)
    with atomic_path(path) as tmp:
        onnx.save(tensorrt_graph(model, precision, reduced=reduced), str(tmp))
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
    manifest = EngineManifest.load(directory)  # no engine: that error, not the lock's
    reason = manifest.direct_convolutions_reason("a TensorRT build")
    if reason is not None:  # Winograd graphs are for CPUs; TensorRT picks its own conv kernels
        raise EngineError(reason)
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
        graph = write_tensorrt_graph(manifest, bucket, settings.precision, log)
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
        facts["self_check"] = self_check_plan(manifest, bucket, settings.precision, log)
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


SELF_CHECK_IMAGES = 2
SELF_CHECK_SEED = 1234


def self_check_plan(
    manifest: EngineManifest,
    bucket: tuple[int, int],
    precision: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load a plan just built as the runtime does (sources verified, deserialised, refitted,
    the refitter's missing weights listed), run it once on seeded random images, and judge it
    with conformance_report at `precision`'s tolerance against ONNX Runtime (CPU) running the
    same .trt.onnx graph; for bf16, whose convolutions ONNX Runtime's CPU provider does not
    implement, against the bucket's exported float32 graph. Returns the record build_plans
    keeps in the plan's facts (`self_check`). A check that cannot run is recorded and logged
    with its error, not raised: the plan is built either way."""
    import numpy as np
    from interactive_features.runtime.backends.sessions import (
        BadGraphError,
        engine_initializers,
        ort_session,
    )
    from interactive_features.runtime.conformance import conformance_report
    from interactive_features.runtime.manifest import is_heatmap

    from .tensorrt_backend import TensorRTBackend

    label = f"{format_size(bucket)} {precision}"
    record: dict[str, Any] = {
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": SELF_CHECK_IMAGES,
        "seed": SELF_CHECK_SEED,
    }
    try:
        width, height = bucket
        rng = np.random.default_rng(SELF_CHECK_SEED)
        images = rng.integers(0, 256, (SELF_CHECK_IMAGES, height, width, 3), dtype=np.uint8)
        backend = TensorRTBackend(manifest, precision=precision, lazy=False, max_open_buckets=1)
        try:
            refit = backend.plan(bucket).refit_report
            record["refit_weights"] = len(refit.get("weights", []))
            record["refit_missing"] = list(refit.get("missing", []))[:20]
            got = backend.run(bucket, images)
        finally:
            backend.close()
        graph = manifest.directory / graph_name(bucket, precision)
        initializers = engine_initializers(manifest)
        try:
            session = ort_session(graph, initializers, providers=["CPUExecutionProvider"])
        except BadGraphError:
            if precision != "bf16":
                raise
            graph = manifest.bucket_path(bucket)
            session = ort_session(graph, initializers, providers=["CPUExecutionProvider"])
        record["reference"] = f"onnxruntime CPU, {graph.name}"
        names = manifest.outputs
        want = dict(zip(names, session.run(names, {manifest.input_name: images}), strict=True))
        report = conformance_report(got, want, precision, f"TensorRT {label} self-check")
        features_ok = not [c for c in report.failures if not is_heatmap(c.name)]
        record.update(
            passed=report.ok,
            features_passed=features_ok,
            summary=report.summary(),
            errors={name: float(f"{err:.3e}") for name, err in report.errors.items()},
        )
        log(f"{label} self-check against {record['reference']}: {report.summary()}")
        if record["refit_missing"]:
            log(f"{label}: the refitter misses {len(refit['missing'])} weights")
    except Exception as err:  # a diagnostic: recorded, never fatal to the build
        record.update(passed=False, error=f"{type(err).__name__}: {err}")
        log(f"{label} self-check could not run: {record['error']}")
    return record
