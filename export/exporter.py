"""`interactive export`: one static ONNX graph per bucket sharing one weights.bin, and a manifest.

Every bucket is exported, checked by `onnx.checker`, run in ONNX Runtime through the runtime's own
session factory and compared with the autograd reference before it is recorded. The manifest is
rewritten after each bucket, so an interrupted export keeps what it finished and a rerun (or a
later export of more buckets into the same directory) continues from there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from interactive_features.runtime.atomic import atomic_path
from interactive_features.runtime.backends import ort_session, shared_initializers
from interactive_features.runtime.buckets import (
    all_buckets,
    common_buckets,
    format_size,
    parse_size,
)
from interactive_features.runtime.conformance import FP32_TOLERANCE, conformance_report
from interactive_features.runtime.locks import ENGINE_LOCK, exclusive_lock
from interactive_features.runtime.manifest import (
    FORMAT,
    MANIFEST_FILE,
    EngineError,
    EngineManifest,
    package_version,
    write_manifest,
)
from interactive_features.runtime.settings import LEGACY_IDENTITY, ExportSettings

from .graph import AnalyticGraph, backward_convs, buffer_key
from .reference import IMAGENET_MEAN, IMAGENET_STD, reference_features
from .spec import FeatureSpec, load_state_dict
from .weights_file import WEIGHTS_FILE, SharedWeights, write_error
from .winograd import LAYOUT, conv_plan

OPSET = 18
INPUT_NAME = "images"


class ExportValidationError(RuntimeError):
    """An exported bucket disagrees with the autograd reference beyond the tolerance."""


@dataclass
class ExportRequest:
    """What `interactive export` was asked for: the engine's settings, where to put it, which
    buckets (`common`, `all` or `WxH,WxH`), and whether to validate each against the reference."""

    out: Path
    settings: ExportSettings = field(default_factory=ExportSettings)
    buckets: str = "common"
    validate: bool = True

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_settings(self.settings)


def resolve_buckets(text: str, area: int, fixed: str | None) -> list[tuple[int, int]]:
    """`common`, `all` or a `WxH,WxH` list, checked against the bucket rule."""
    if fixed is not None:
        size = parse_size(fixed)
        if text not in ("common", "all", fixed):
            raise ValueError(f"--fixed {fixed} has exactly one bucket; drop --buckets {text}")
        return [size]
    table = all_buckets(area * area)
    if text == "all":
        return table
    if text == "common":
        return common_buckets(area * area)
    sizes = [parse_size(item) for item in text.split(",") if item.strip()]
    if not sizes:
        raise ValueError("--buckets is empty")
    for size in sizes:
        if size not in table:
            raise ValueError(
                f"--buckets {format_size(size)} is not a bucket of the area-{area} rule; "
                f"`interactive buckets --area {area}` lists them"
            )
    return sizes


def export_engine(request: ExportRequest, log: Callable[[str], None] = print) -> EngineManifest:
    """Export every requested bucket missing from `request.out`; returns the final manifest.

    One writer per engine directory: the whole export holds an exclusive lock on
    OUT/.interactive.lock (runtime/locks.py), and a second export (or `interactive build`) of
    the same directory is refused at once with a LockedError naming the holder. Creating that
    lock file is also the probe that OUT can be written, before any work.
    """
    spec, settings = request.spec, request.settings
    buckets = resolve_buckets(request.buckets, settings.area, settings.fixed)
    out = Path(request.out)
    if (out / MANIFEST_FILE).exists():  # nothing to do needs no lock (e.g. a read-only engine)
        manifest = _load_or_start(out, request, spec, log)
        if all(format_size(b) in manifest["buckets"] for b in buckets):
            log(f"{len(buckets)} of {len(buckets)} buckets already in {out}")
            return EngineManifest(out, manifest)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EngineError(f"--out {out}: cannot create the directory: {err.strerror}") from err
    if not out.is_dir():
        raise EngineError(f"--out {out}: not a directory")
    with exclusive_lock(out / ENGINE_LOCK, f"engine directory {out}"):
        try:
            return _export_locked(request, spec, out, buckets, log)
        except BaseException:
            if created:  # a failed first step (download, bad weights) leaves no directory
                _remove_if_only_lock(out)
            raise


def _export_locked(
    request: ExportRequest,
    spec: FeatureSpec,
    out: Path,
    buckets: list[tuple[int, int]],
    log: Callable[[str], None],
) -> EngineManifest:
    settings = request.settings
    _remove_stale_temporaries(out)
    manifest = _load_or_start(out, request, spec, log)
    todo = [b for b in buckets if format_size(b) not in manifest["buckets"]]
    if len(todo) < len(buckets):
        log(f"{len(buckets) - len(todo)} of {len(buckets)} buckets already in {out}")
    if not todo:
        return EngineManifest(out, manifest)
    log(f"loading weights {settings.weights} ({spec.arch}, width 1/{spec.width_div})")
    if settings.weights.startswith("random:"):
        log("NOTE: random weights: the features are for tests and smoke runs, not for retrieval")
    state_dict = load_state_dict(settings.weights, spec.arch, spec.width_div)
    graphs = _graphs(spec, state_dict, manifest)
    if manifest["winograd"]:
        where = " (the CPU graphs)" if manifest.get("cpu_graphs") else ""
        log(
            f"Winograd convolutions{where} (--conv {settings.conv}): "
            f"{_describe(manifest['winograd'])}"
        )
    _check_free_space(out, graphs, manifest, len(todo))
    weights = SharedWeights(out, manifest["weights"]["tensors"])
    try:
        weights.truncate_to_table()  # bytes a crash appended but never recorded
    except OSError as err:
        raise EngineError(write_error(weights.path, err)) from err
    for n, bucket in enumerate(todo, 1):
        started = time.perf_counter()
        entry = _export_bucket(graphs, spec, state_dict, bucket, weights, out, request.validate)
        entry["export_seconds"] = round(time.perf_counter() - started, 2)
        _record(manifest, weights, bucket, entry)
        try:
            write_manifest(out, manifest)
        except OSError as err:
            raise EngineError(write_error(out / MANIFEST_FILE, err)) from err
        log(f"[{n}/{len(todo)}] {format_size(bucket)}: {_bucket_line(entry)}")
    return EngineManifest(out, manifest)


# Files an interrupted export leaves: atomic.temporary_name's hidden names of what it writes.
_TEMPORARY = re.compile(r"\.(manifest\.json|bucket-.+|tensorrt-.+)\.\d+\.[0-9a-f]{8}\.tmp")


def _remove_stale_temporaries(out: Path) -> None:
    """Under the lock no other writer is at work: temporaries left here are a killed writer's."""
    for path in out.iterdir():
        if _TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


def _remove_if_only_lock(out: Path) -> None:
    try:
        if {p.name for p in out.iterdir()} <= {ENGINE_LOCK}:
            (out / ENGINE_LOCK).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass


def _interrupted_first_export(out: Path) -> bool:
    """A weights.bin and no manifest.json is what a first export leaves when it is killed before
    recording its first bucket: only weights.bin, unrecorded bucket graphs, the lock file."""
    return all(
        p.name in (WEIGHTS_FILE, ENGINE_LOCK)
        or re.fullmatch(r"bucket-\d+x\d+(\.cpu)?\.onnx", p.name)
        for p in out.iterdir()
    )


def _winograd_plan(manifest: dict[str, Any], spec: FeatureSpec) -> dict[str, dict[str, str]]:
    """The engine's Winograd steps: the manifest's record once it has one (so that buckets added
    later write the same steps over the same stored kernels), else export/winograd.py's plan for
    its `conv` setting, recorded now with the layout of its kernels. An engine whose Winograd
    kernels were stored in another layout keeps its graphs, but takes no new bucket."""
    if "winograd" not in manifest:
        conv = ExportSettings.from_identity(manifest["export"]).conv
        manifest["winograd"] = conv_plan(spec, conv, backward_convs(spec))
        if manifest["winograd"]:
            manifest["winograd_layout"] = LAYOUT
            # `auto` is for every backend: direct graphs beside the CPU's Winograd ones
            manifest["cpu_graphs"] = conv == "auto"
    elif manifest["winograd"] and manifest.get("winograd_layout", 1) != LAYOUT:
        raise EngineError(
            "this engine's Winograd kernels are stored in layout "
            f"{manifest.get('winograd_layout', 1)} (written before 2026-12-02), this exporter "
            f"writes layout {LAYOUT}: its buckets still run, but a new bucket needs a new engine: "
            "export into a new --out directory"
        )
    return manifest["winograd"]


@dataclass(frozen=True)
class BucketGraphs:
    """What a bucket's files are exported from: `main` (the `file` every backend takes) and,
    for an engine with `cpu_graphs`, `cpu` (the `cpu_file` with Winograd steps)."""

    main: AnalyticGraph
    cpu: AnalyticGraph | None = None

    def all(self) -> list[AnalyticGraph]:
        return [self.main] if self.cpu is None else [self.main, self.cpu]


def _graphs(spec: FeatureSpec, state_dict: dict[str, torch.Tensor], manifest: dict) -> BucketGraphs:
    plan = _winograd_plan(manifest, spec)
    if manifest.get("cpu_graphs"):
        cpu = AnalyticGraph(spec, state_dict, winograd=plan).eval()
        return BucketGraphs(AnalyticGraph(spec, state_dict).eval(), cpu)
    return BucketGraphs(AnalyticGraph(spec, state_dict, winograd=plan).eval())


def _bucket_line(entry: dict[str, Any]) -> str:
    """`12.3 s, max rel err 1.4e-04, bucket-512x512.onnx (36 KiB)[, CPU graph ...]`."""
    parts = [f"{entry['export_seconds']:.1f} s"]
    for prefix, what in (("", ""), ("cpu_", "CPU graph ")):
        if f"{prefix}file" not in entry:
            continue
        err = entry.get(f"{prefix}validation", {}).get("max_rel_err")
        check = f"max rel err {err:.1e}" if err is not None else "not validated"
        size = entry[f"{prefix}bytes"] / 1024
        parts.append(f"{what}{check}, {entry[f'{prefix}file']} ({size:.0f} KiB)")
    return ", ".join(parts)


def _describe(plan: dict[str, dict[str, str]]) -> str:
    return ", ".join(
        f"{unit} {'/'.join(f'{d} {m}' for d, m in steps.items())}" for unit, steps in plan.items()
    )


def _check_free_space(
    out: Path, graphs: BucketGraphs, manifest: dict[str, Any], buckets: int
) -> None:
    """Refuse before the work when OUT's filesystem cannot hold what the export writes: at most
    every buffer of the graphs (the weights, the flipped or Winograd-transformed kernels of the
    backward pass, the forward's Winograd kernels; when weights.bin holds nothing yet) and about
    1 MiB per bucket graph (written beside its temporary)."""
    needed = len(graphs.all()) * buckets << 20
    if not manifest["weights"]["tensors"]:
        buffers = {n: b for g in graphs.all() for n, b in g.named_buffers()}
        needed += sum(b.numel() * b.element_size() for b in buffers.values())
    try:
        stat = os.statvfs(out)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if stat.f_blocks and free < needed:
        raise EngineError(
            f"--out {out}: {free / 1e6:.1f} MB free on its filesystem, the export needs up to "
            f"{needed / 1e6:.1f} MB; free some space or choose another --out"
        )


def _load_or_start(
    out: Path, request: ExportRequest, spec: FeatureSpec, log: Callable[[str], None] = print
) -> dict[str, Any]:
    if (out / MANIFEST_FILE).exists():
        manifest = EngineManifest.load(out).data
        # settings newer than the manifest: the value its engine was made with (LEGACY_IDENTITY)
        mine, theirs = request.settings.identity(), {**LEGACY_IDENTITY, **manifest["export"]}
        different = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if different:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in different.items())
            fix = "export into another --out directory"
            if set(different) == {"conv"}:
                fix = f"pass --conv {different['conv'][0]} to add buckets to it, or {fix}"
            raise EngineError(
                f"{out} holds an engine exported with other settings ({detail}); {fix}"
            )
        return manifest
    if (out / WEIGHTS_FILE).exists():
        if not _interrupted_first_export(out):
            raise EngineError(
                f"{out} has a {WEIGHTS_FILE} but no {MANIFEST_FILE}, and files an export does "
                "not write; use an empty --out"
            )
        log(
            f"{out}: {WEIGHTS_FILE} without {MANIFEST_FILE} is what an interrupted first export "
            "leaves; starting it again"
        )
        (out / WEIGHTS_FILE).unlink()
    settings = request.settings
    if settings.fixed is not None:
        width, height = parse_size(settings.fixed)
        rule: dict[str, Any] = {"kind": "fixed", "width": width, "height": height}
    else:
        rule = {"kind": "area", "area_side": settings.area, "area": settings.area**2}
    return {
        "format": FORMAT,
        "package_version": package_version(),
        "created": _now(),
        "arch": spec.arch,
        "width_div": spec.width_div,
        "config": spec.config,
        "p": spec.p,
        "layers": [{"name": t, "dim": d} for t, d in spec.layer_dims().items()],
        "heatmaps": spec.heatmaps,
        "outputs": spec.output_names(),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "normalisation": {"divide": 255.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "bucket_rule": rule,
        "opset": OPSET,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
        "export": settings.identity(),
        "weights": {"file": WEIGHTS_FILE, "source": settings.weights, "tensors": {}},
        "buckets": {},
    }


def _export_bucket(
    graphs: BucketGraphs,
    spec: FeatureSpec,
    state_dict: dict[str, torch.Tensor],
    bucket: tuple[int, int],
    weights: SharedWeights,
    out: Path,
    validate: bool,
) -> dict[str, Any]:
    """Write the bucket's graph (and its CPU graph), each checked, and each validated against
    one run of the reference; the manifest entry, not yet recorded."""
    entry: dict[str, Any] = {"width": bucket[0], "height": bucket[1]}
    image, want = _validation_case(spec, state_dict, bucket) if validate else (None, None)
    for prefix, graph in (("", graphs.main), ("cpu_", graphs.cpu)):
        if graph is None:
            continue
        name = f"bucket-{format_size(bucket)}{'.cpu' if prefix else ''}.onnx"
        entry[f"{prefix}file"] = name
        model = to_onnx(graph, spec, bucket)
        weights.externalize(model)
        if graph is graphs.main:  # a CPU graph's raw weights are its direct twin's
            _keep_raw_weights(graph, model, weights)
        try:
            with atomic_path(out / name) as tmp:
                onnx.save(model, tmp)
                onnx.checker.check_model(str(tmp))
                if image is not None and want is not None:
                    report = validate_bucket(tmp, weights, spec, image, want, bucket, name)
                    entry[f"{prefix}validation"] = report
        except OSError as err:  # disk full, read-only: the temporary is gone, nothing recorded
            raise EngineError(write_error(out / name, err)) from err
        entry[f"{prefix}bytes"] = (out / name).stat().st_size
    entry["exported_at"] = _now()
    return entry


def _keep_raw_weights(graph: AnalyticGraph, model: onnx.ModelProto, weights: SharedWeights) -> None:
    """Store the weights of every unit even where the graph reads only their Winograd kernels:
    the torch backend (and a later `--conv direct` view of the engine) rebuilds the direct
    network from them."""
    present = {init.name for init in model.graph.initializer}
    for i in sorted(graph.winograd):
        for what in ("weight", "bias"):
            name = buffer_key(graph.units[i].name, what)
            if name not in present:
                weights.store(name, graph.get_buffer(name).numpy())


def to_onnx(graph: AnalyticGraph, spec: FeatureSpec, bucket: tuple[int, int]) -> onnx.ModelProto:
    """The graph at one (W, H), batch dimension dynamic, weights still inside the proto."""
    width, height = bucket
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8)  # 2: a 1 would specialise
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and the like
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=spec.output_names(),
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,
            optimize=True,
        )
    quiet.setLevel(level)
    model = program.model_proto
    _strip_debug_info(model)
    return model


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces and metadata: they are most of a graph file's size."""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in list(model.graph.value_info):
        del value.metadata_props[:]


def _validation_case(
    spec: FeatureSpec, state_dict: dict[str, torch.Tensor], bucket: tuple[int, int]
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """A random image of the bucket (seeded by its size) and the autograd reference's outputs."""
    width, height = bucket
    rng = np.random.default_rng(width * 10007 + height)
    image = rng.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
    return image, reference_features(spec, state_dict, torch.from_numpy(image))


def validate_bucket(
    model: Path,
    weights: SharedWeights,
    spec: FeatureSpec,
    image: np.ndarray,
    want: dict[str, torch.Tensor],
    bucket: tuple[int, int],
    name: str,
) -> dict[str, Any]:
    """Run the file in ONNX Runtime on `image` and compare with the reference's `want`; errors
    name the bucket and the graph `name` (the file it is written to, not its temporary)."""
    where = f"bucket {format_size(bucket)}: {name}"
    initializers = shared_initializers(weights.path, weights.tensors)
    session = ort_session(model, initializers, providers=["CPUExecutionProvider"])
    outputs = spec.output_names()
    got = dict(zip(outputs, session.run(outputs, {INPUT_NAME: image}), strict=True))
    for output, value in got.items():
        if not np.isfinite(value).all():
            raise ExportValidationError(
                f"{where}: output {output!r} has NaN or infinite values "
                f"({int((~np.isfinite(value)).sum())} of {value.size}); nothing recorded"
            )
    report = conformance_report(got, want, "fp32", label=where)
    if not report.ok:
        raise ExportValidationError(
            f"{where}: {', '.join(c.name for c in report.failures)} differ from the autograd "
            f"reference beyond the tolerance ({report.summary()}); all: "
            + ", ".join(f"{k} {v:.1e}" for k, v in report.errors.items())
        )
    return {
        "max_rel_err": report.max_feature_error,
        "per_layer": report.errors,
        "tolerance": FP32_TOLERANCE,
    }


def _record(
    manifest: dict[str, Any], weights: SharedWeights, bucket: tuple[int, int], entry: dict
) -> None:
    info = manifest["weights"]
    if info["tensors"] != weights.tensors or "sha256" not in info:
        info["tensors"] = dict(weights.tensors)
        info["sha256"] = weights.file_sha256()
        info["bytes"] = weights.path.stat().st_size
    manifest["buckets"][format_size(bucket)] = entry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
