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

from interactive.runtime.atomic import atomic_path
from interactive.runtime.backends import ort_session, shared_initializers
from interactive.runtime.buckets import all_buckets, common_buckets, format_size, parse_size
from interactive.runtime.conformance import FP32_TOLERANCE, conformance_report
from interactive.runtime.manifest import (
    FORMAT,
    MANIFEST_FILE,
    EngineError,
    EngineManifest,
    package_version,
    write_manifest,
)
from interactive.runtime.settings import ExportSettings

from .graph import AnalyticGraph
from .reference import IMAGENET_MEAN, IMAGENET_STD, reference_features
from .spec import FeatureSpec, load_state_dict
from .weights_file import WEIGHTS_FILE, SharedWeights

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
    """Export every requested bucket missing from `request.out`; returns the final manifest."""
    spec, settings = request.spec, request.settings
    buckets = resolve_buckets(request.buckets, settings.area, settings.fixed)
    out = Path(request.out)
    manifest = _load_or_start(out, request, spec)
    todo = [b for b in buckets if format_size(b) not in manifest["buckets"]]
    if len(todo) < len(buckets):
        log(f"{len(buckets) - len(todo)} of {len(buckets)} buckets already in {out}")
    if not todo:
        return EngineManifest(out, manifest)
    log(f"loading weights {settings.weights} ({spec.arch}, width 1/{spec.width_div})")
    if settings.weights.startswith("random:"):
        log("NOTE: random weights: the features are for tests and smoke runs, not for retrieval")
    state_dict = load_state_dict(settings.weights, spec.arch, spec.width_div)
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed download leaves no directory
    graph = AnalyticGraph(spec, state_dict).eval()
    weights = SharedWeights(out, manifest["weights"]["tensors"])
    weights.truncate_to_table()  # bytes a crash appended but never recorded
    for n, bucket in enumerate(todo, 1):
        started = time.perf_counter()
        entry = _export_bucket(graph, spec, state_dict, bucket, weights, out, request.validate)
        entry["export_seconds"] = round(time.perf_counter() - started, 2)
        _record(manifest, weights, bucket, entry)
        write_manifest(out, manifest)
        err = entry.get("validation", {}).get("max_rel_err")
        check = f"max rel err {err:.1e}" if err is not None else "not validated"
        log(
            f"[{n}/{len(todo)}] {format_size(bucket)}: {entry['export_seconds']:.1f} s, {check}, "
            f"{entry['file']} ({entry['bytes'] / 1024:.0f} KiB)"
        )
    return EngineManifest(out, manifest)


def _load_or_start(out: Path, request: ExportRequest, spec: FeatureSpec) -> dict[str, Any]:
    if (out / MANIFEST_FILE).exists():
        manifest = EngineManifest.load(out).data
        mine, theirs = request.settings.identity(), manifest["export"]
        different = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if different:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in different.items())
            raise EngineError(
                f"{out} holds an engine exported with other settings ({detail}); "
                "export into another --out directory"
            )
        return manifest
    if (out / WEIGHTS_FILE).exists():
        raise EngineError(f"{out} has a {WEIGHTS_FILE} but no {MANIFEST_FILE}; use an empty --out")
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
    graph: AnalyticGraph,
    spec: FeatureSpec,
    state_dict: dict[str, torch.Tensor],
    bucket: tuple[int, int],
    weights: SharedWeights,
    out: Path,
    validate: bool,
) -> dict[str, Any]:
    name = f"bucket-{format_size(bucket)}.onnx"
    model = to_onnx(graph, spec, bucket)
    weights.externalize(model)
    with atomic_path(out / name) as tmp:
        onnx.save(model, tmp)
        onnx.checker.check_model(str(tmp))
        entry: dict[str, Any] = {"file": name, "width": bucket[0], "height": bucket[1]}
        if validate:
            entry["validation"] = validate_bucket(tmp, weights, spec, state_dict, bucket)
    entry["bytes"] = (out / name).stat().st_size
    entry["exported_at"] = _now()
    return entry


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


def validate_bucket(
    model: Path,
    weights: SharedWeights,
    spec: FeatureSpec,
    state_dict: dict[str, torch.Tensor],
    bucket: tuple[int, int],
) -> dict[str, Any]:
    """Run the file in ONNX Runtime on a random image and compare with the autograd reference."""
    width, height = bucket
    rng = np.random.default_rng(width * 10007 + height)
    image = rng.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
    initializers = shared_initializers(weights.path, weights.tensors)
    session = ort_session(model, initializers, providers=["CPUExecutionProvider"])
    names = spec.output_names()
    got = dict(zip(names, session.run(names, {INPUT_NAME: image}), strict=True))
    want = reference_features(spec, state_dict, torch.from_numpy(image))
    report = conformance_report(got, want, "fp32", label=f"bucket {format_size(bucket)}")
    if not report.ok:
        raise ExportValidationError(
            f"bucket {format_size(bucket)}: {', '.join(c.name for c in report.failures)} differ "
            f"from the autograd reference beyond the tolerance ({report.summary()}); all: "
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
