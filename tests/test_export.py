"""Exported ONNX graphs: checker, operator allow-list, one shared weights file, ORT vs reference."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from interactive_features.export.exporter import (
    ExportValidationError,
    export_engine,
    resolve_buckets,
)
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec
from interactive_features.export.weights_file import SharedWeights, WeightsMismatchError
from interactive_features.runtime import Extractor, conformance
from interactive_features.runtime.backends import engine_initializers, ort_session
from interactive_features.runtime.manifest import EngineError, EngineManifest

from conftest import NARROW, assert_close, narrow_request

# Operators that both ONNX Runtime and TensorRT's ONNX parser support. No MaxUnpool, no MaxPool
# indices output: switches come from a space-to-depth reshape, ArgMax and Equal.
ALLOWED_OPS = {
    "Abs", "Add", "ArgMax", "Cast", "Concat", "Constant", "Conv", "ConvTranspose", "Div",
    "Equal", "Expand", "Gather", "Greater", "MaxPool", "Mul", "ReduceMax", "ReduceMean",
    "ReduceSum", "Relu", "Reshape", "Shape", "Sign", "Squeeze", "Sub", "Transpose",
    "Unsqueeze", "Where",
}  # fmt: skip


def graphs(engine: Path) -> list[Path]:
    return sorted(engine.glob("bucket-*.onnx"))


def test_manifest_describes_the_engine(narrow_engine: Path) -> None:
    m = EngineManifest.load(narrow_engine)
    assert m.layers == list(PAPER_LAYERS)
    assert m.buckets == [(224, 288), (256, 256), (288, 224)]
    assert m.outputs[: len(PAPER_LAYERS)] == list(PAPER_LAYERS)
    d = m.data
    assert d["arch"] == "vgg16" and d["config"] == "last" and d["p"] == 2
    assert d["weights"]["source"] == "random:0" and len(d["weights"]["sha256"]) == 64
    assert d["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"}
    for entry in d["buckets"].values():
        assert entry["validation"]["max_rel_err"] <= 1e-3
        assert entry["export_seconds"] > 0


def test_graphs_pass_the_checker_with_external_data(narrow_engine: Path) -> None:
    for path in graphs(narrow_engine):
        onnx.checker.check_model(str(path))  # resolves weights.bin
        model = onnx.load(str(path), load_external_data=False)
        external = [
            t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        assert external, "the weights must live in weights.bin"
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        offsets = [int(e.value) for t in external for e in t.external_data if e.key == "offset"]
        assert all(o % (64 * 1024) == 0 for o in offsets)


def test_operators_are_on_the_allow_list(narrow_engine: Path) -> None:
    for path in graphs(narrow_engine):
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
        assert "ArgMax" in ops and "ConvTranspose" in ops


def test_weights_are_stored_once(narrow_engine: Path) -> None:
    m = EngineManifest.load(narrow_engine)
    tensors = m.data["weights"]["tensors"]
    payload = sum(t["length"] for t in tensors.values())
    size = (narrow_engine / "weights.bin").stat().st_size
    assert payload <= size <= payload + 64 * 1024 * len(tensors)
    assert all(p.stat().st_size < 100_000 for p in graphs(narrow_engine))
    assert [p.name for p in narrow_engine.iterdir() if p.suffix == ".bin"] == ["weights.bin"]


def test_sessions_use_the_shared_weights_not_the_file(narrow_engine: Path, tmp_path: Path) -> None:
    """A copy of a graph beside a zeroed weights.bin gives the right answer only if ORT takes
    the shared (memory-mapped) initializers handed to it."""
    m = EngineManifest.load(narrow_engine)
    shutil.copy(narrow_engine / "bucket-256x256.onnx", tmp_path)
    size = (narrow_engine / "weights.bin").stat().st_size
    (tmp_path / "weights.bin").write_bytes(b"\0" * size)
    image = np.random.default_rng(5).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    shared = ort_session(tmp_path / "bucket-256x256.onnx", engine_initializers(m))
    zeroed = ort_session(tmp_path / "bucket-256x256.onnx")
    real = ort_session(narrow_engine / "bucket-256x256.onnx")
    feed = {"images": image}
    got, bad, want = shared.run(None, feed), zeroed.run(None, feed), real.run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert not np.allclose(bad[0], want[0])


def test_ort_matches_reference_on_fresh_images(narrow_engine: Path, narrow_state_dict) -> None:
    spec = FeatureSpec("vgg16", "last", 2, PAPER_LAYERS, NARROW, heatmaps=True)
    rng = np.random.default_rng(2024)
    with Extractor.open(narrow_engine) as ex:
        for size in [(300, 300), (350, 270), (200, 260)]:  # one per bucket, batch of 3
            images = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(3)]
            feats = ex.extract(images, batch_size=3)
            assert not feats.errors
            batch = np.stack([ex.prepare(im).pixels for im in images])
            want = reference_features(spec, narrow_state_dict, torch.from_numpy(batch))
            got = {t: feats[t] for t in spec.layers}
            got.update({f"{t}.heatmap": np.stack(feats.heatmaps[t]) for t in spec.layers})
            assert_close(got, want)


def test_adding_buckets_reuses_the_weights(narrow_engine: Path, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(narrow_engine, engine)
    before = (engine / "weights.bin").stat().st_size
    lines: list[str] = []
    request = narrow_request(engine, buckets="256x256,288x256", heatmaps=True)
    export_engine(request, log=lines.append)
    assert (engine / "weights.bin").stat().st_size == before
    assert any("1 of 2 buckets already" in line for line in lines)
    assert (288, 256) in EngineManifest.load(engine).buckets
    sha = json.loads((engine / "manifest.json").read_text())["weights"]["sha256"]
    assert sha == EngineManifest.load(narrow_engine).data["weights"]["sha256"]


def test_other_settings_are_refused(narrow_engine: Path) -> None:
    request = narrow_request(narrow_engine, buckets="256x256", p=1)
    with pytest.raises(EngineError, match="p: 2 there, 1 asked"):
        export_engine(request, log=lambda line: None)


def test_other_weights_under_one_name_are_refused(tmp_path: Path) -> None:
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    weights = SharedWeights(tmp_path)
    tensor = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    model.graph.initializer.append(tensor)
    weights.externalize(model)
    other = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    other.graph.initializer.append(
        onnx.numpy_helper.from_array(np.zeros((64, 64), np.float32), "w")
    )
    with pytest.raises(WeightsMismatchError, match="other weights"):
        weights.externalize(other)


def test_a_failed_validation_stops_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conformance, "FP32_TOLERANCE", 0.0)
    out = tmp_path / "engine"
    request = narrow_request(out, buckets="256x256")
    with pytest.raises(ExportValidationError, match="256x256: .* beyond the tolerance"):
        export_engine(request, log=lambda line: None)
    manifest = (
        json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    )
    assert not manifest.get("buckets")
    assert not list(out.glob("*.onnx")) and not list(out.glob(".tmp-*"))


def test_bucket_lists() -> None:
    assert len(resolve_buckets("all", 512, None)) == 61
    assert resolve_buckets("common", 512, None)[:2] == [(512, 512), (576, 448)]
    assert resolve_buckets("common", 512, "224x224") == [(224, 224)]
    with pytest.raises(ValueError, match="not a bucket"):
        resolve_buckets("500x375", 512, None)


def test_only_needed_units_are_exported(tmp_path: Path) -> None:
    """`next` has no deep backward; ORIG stops at its deepest layer."""

    def ops(config: str, layers: str) -> Counter:
        out = tmp_path / f"{config}-{layers}"
        request = narrow_request(
            out, buckets="256x256", config=config, layers=tuple(layers.split(","))
        )
        export_engine(request, log=lambda line: None)
        model = onnx.load(str(out / "bucket-256x256.onnx"), load_external_data=False)
        return Counter(n.op_type for n in model.graph.node)

    orig = ops("orig-avg", "pool-2")
    assert orig["Conv"] == 4 and orig["ConvTranspose"] == 0
    nxt = ops("next", "conv-3-3,conv-5-1")  # next units pool-3 and conv-5-2
    assert nxt["Conv"] == 12 and nxt["ConvTranspose"] == 1  # the 3x3 box sum of conv-5-1 only
    last = ops("last", "conv-5-1")  # down through fc-7, fc-6, pool-5, conv-5-3 to conv-5-2
    # fc-7 and fc-6 by ConvTranspose, conv-5-3 by a flipped-kernel Conv, + the box sum
    assert last["ConvTranspose"] == 2 + 1
    assert last["Conv"] == 15 + 1  # 13 convs, fc-6 and fc-7 forward; conv-5-3 backward
