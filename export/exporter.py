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
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from interactive.runtime.backends import ort_session, shared_initializers
from interactive.runtime.buckets import all_buckets, common_buckets, format_size, parse_size
from interactive.runtime.manifest import (
    FORMAT,
    MANIFEST_FILE,
    EngineError,
    EngineManifest,
    is_heatmap,
    package_version,
    write_manifest,
)

from .graph import AnalyticGraph
from .reference import IMAGENET_MEAN, IMAGENET_STD, reference_features
from .spec import PAPER_LAYERS, FeatureSpec, load_state_dict
from .weights_file import WEIGHTS_FILE, SharedWeights

OPSET = 18
INPUT_NAME = "images"
FP32_TOLERANCE = 1e-3  # ALGORITHM.md section 6, per layer feature
# Heatmaps are not averaged over space: one ReLU mask that flips at a near-zero pre-activation
# between two fp32 implementations shows in full around that position (measured on narrow random
# networks: median 1e-7, worst 8e-3 over 48 images), while features average such flips out. The
# fp32 reference itself differs from a float64 one by as much. (choice)
HEATMAP_TOLERANCE = 2e-2


class ExportValidationError(RuntimeError):
    """An exported bucket disagrees with the autograd reference beyond the tolerance."""


@dataclass
class ExportRequest:
    """What `interactive export` was asked for (the CLI flags, one field each)."""

    out: Path
    arch: str = "vgg16"
    weights: str = "random:0"
    config: str = "last"
    p: int = 2
    layers: tuple[str, ...] = PAPER_LAYERS
    heatmaps: bool = False
    width_div: int = 1
    area: int = 512  # the bucket rule's target area, as the side of a square
    fixed: str | None = None  # "224x224": the paper's ORIG baseline, one bucket for every image
    buckets: str = "common"  # "common", "all" or "WxH,WxH"
    validate: bool = True

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            self.arch, self.config, self.p, tuple(self.layers), self.width_div, self.heatmaps
        )

    def identity(self) -> dict[str, Any]:
        """Everything that must match for two exports to share one directory."""
        return {
            "arch": self.arch,
            "weights": self.weights,
            "config": self.config,
            "p": self.p,
            "layers": list(self.layers),
            "heatmaps": self.heatmaps,
            "width_div": self.width_div,
            "area": self.area,
            "fixed": self.fixed,
        }


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
    spec = request.spec
    buckets = resolve_buckets(request.buckets, request.area, request.fixed)
    out = Path(request.out)
    manifest = _load_or_start(out, request, spec)
    todo = [b for b in buckets if format_size(b) not in manifest["buckets"]]
    if len(todo) < len(buckets):
        log(f"{len(buckets) - len(todo)} of {len(buckets)} buckets already in {out}")
    if not todo:
        return EngineManifest(out, manifest)
    log(f"loading weights {request.weights} ({spec.arch}, width 1/{spec.width_div})")
    if request.weights.startswith("random:"):
        log("NOTE: random weights: the features are for tests and smoke runs, not for retrieval")
    state_dict = load_state_dict(request.weights, spec.arch, spec.width_div)
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
        mine, theirs = request.identity(), manifest["export"]
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
    if request.fixed is not None:
        width, height = parse_size(request.fixed)
        rule: dict[str, Any] = {"kind": "fixed", "width": width, "height": height}
    else:
        rule = {"kind": "area", "area_side": request.area, "area": request.area**2}
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
        "export": request.identity(),
        "weights": {"file": WEIGHTS_FILE, "source": request.weights, "tensors": {}},
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
    tmp = out / f".tmp-{name}"
    model = to_onnx(graph, spec, bucket)
    weights.externalize(model)
    onnx.save(model, tmp)
    try:
        onnx.checker.check_model(str(tmp))
        entry: dict[str, Any] = {"file": name, "width": bucket[0], "height": bucket[1]}
        if validate:
            entry["validation"] = validate_bucket(tmp, weights, spec, state_dict, bucket)
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)
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
    errors = {k: relative_error(got[k], want[k].numpy()) for k in names}
    failed = beyond_tolerance(errors)
    if failed:
        raise ExportValidationError(
            f"bucket {format_size(bucket)}: {', '.join(failed)} differ from the autograd "
            f"reference beyond the tolerance (relative L2; features {FP32_TOLERANCE:.0e}, "
            f"heatmaps {HEATMAP_TOLERANCE:.0e}); all: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )
    return {
        "max_rel_err": max(v for k, v in errors.items() if not is_heatmap(k)),
        "per_layer": errors,
        "tolerance": FP32_TOLERANCE,
    }


def beyond_tolerance(errors: dict[str, float]) -> dict[str, float]:
    """The outputs whose relative error exceeds their fp32 tolerance (features or heatmaps)."""
    limit = {k: HEATMAP_TOLERANCE if is_heatmap(k) else FP32_TOLERANCE for k in errors}
    return {k: v for k, v in errors.items() if v > limit[k]}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """|a - b| / |b| over the whole array (ALGORITHM.md section 6)."""
    denom = float(np.linalg.norm(want.astype(np.float64)))
    diff = float(np.linalg.norm(got.astype(np.float64) - want.astype(np.float64)))
    return diff / denom if denom > 0 else diff


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
