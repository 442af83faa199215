"""Winograd 3x3 convolutions (export/winograd.py, `interactive export --conv`): the subgraph against
direct convolution, the per-unit plan, whole engines against the autograd reference within the
fp32 tolerance (export/ALGORITHM.md section 6), and GPU paths refusing Winograd engines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from interactive_features.engines.tensorrt_build import BuildSettings, build_plans
from interactive_features.export.exporter import export_engine
from interactive_features.export.graph import AnalyticGraph, backward_convs
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import FeatureSpec, engine_spec, load_state_dict
from interactive_features.export.winograd import (
    conv_plan,
    transform_kernels,
    transformed_weights,
    winograd_conv3x3,
)
from interactive_features.runtime import Extractor
from interactive_features.runtime.backends import engine_initializers, ort_session
from interactive_features.runtime.backends.ort import OrtCudaBackend, OrtTensorrtBackend
from interactive_features.runtime.conformance import FP32_TOLERANCE, conformance_report
from interactive_features.runtime.manifest import EngineError, EngineManifest
from interactive_features.runtime.settings import (
    ExportSettings,
    add_export_arguments,
)
from test_export import ALLOWED_OPS

from conftest import NARROW, narrow_request, photos

BUCKET = "288x224"  # 18x14 at block 4: F(4,3) pads the map up to whole tiles there


@pytest.mark.parametrize("mode,m", [("f2", 2), ("f4", 4)])
@pytest.mark.parametrize("shape", [(2, 8, 16, 14, 10), (1, 16, 8, 32, 32), (1, 24, 24, 7, 9)])
def test_winograd_conv_equals_direct_convolution(mode: str, m: int, shape: tuple) -> None:
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, generator=gen)
    g = torch.randn(k, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    b = torch.randn(k, generator=gen)
    exact = F.conv2d(x.double(), g.double(), b.double(), padding=1)
    t = transform_kernels(m)
    got = winograd_conv3x3(x, transformed_weights(g, m), t["bt"], t["at"], m, b)
    assert got.shape == exact.shape
    err = float((got.double() - exact).norm() / exact.norm())
    assert err < 1e-5, (mode, shape, err)


def test_plans() -> None:
    narrow, full = FeatureSpec(width_div=NARROW), FeatureSpec()
    assert conv_plan(full, "direct", backward_convs(full)) == {}
    assert conv_plan(narrow, "auto", backward_convs(narrow)) == {}  # 64 channels at most
    every = conv_plan(narrow, "f4", backward_convs(narrow))
    assert len(every) == 13 and every["conv-1-1"] == {"forward": "f4"}
    assert every["conv-2-2"] == {"forward": "f4", "backward": "f4"}
    auto = conv_plan(full, "auto", backward_convs(full))
    # every step with 256 channels on one side, forward and backward: conv-3-1 (128 -> 256) on;
    # conv-2-2 (128 -> 128 @ 256x256) and above stay direct
    assert list(auto) == [f"conv-{b}-{k}" for b in (3, 4, 5) for k in (1, 2, 3)]
    assert all(steps == {"forward": "f4", "backward": "f4"} for steps in auto.values())


def test_conv_setting_round_trips_through_the_command_line_and_the_manifest() -> None:
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    assert ExportSettings().conv == "auto"
    settings = ExportSettings(weights="random:0", conv="f2")
    again = ExportSettings.from_args(parser.parse_args(settings.export_args()))
    assert again == settings
    assert ExportSettings.from_identity(settings.identity()) == settings
    legacy = {k: v for k, v in settings.identity().items() if k != "conv"}
    assert ExportSettings.from_identity(legacy).conv == "direct"  # written before --conv
    with pytest.raises(ValueError, match="unknown conv"):
        ExportSettings(conv="f6")


@pytest.fixture(scope="module", params=["f2", "f4"])
def winograd_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("winograd") / f"narrow-{request.param}"
    export_engine(narrow_request(out, BUCKET, conv=request.param, heatmaps=True), log=print)
    return request.param, out


def test_manifest_records_the_plan_and_the_graph_writes_it(winograd_engine) -> None:
    mode, out = winograd_engine
    manifest = EngineManifest.load(out)
    assert manifest.settings.conv == mode
    assert len(manifest.winograd) == 13
    assert all(set(s.values()) == {mode} for s in manifest.winograd.values())
    model = onnx.load(str(out / f"bucket-{BUCKET}.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and ops <= ALLOWED_OPS | {"MatMul", "Pad", "Slice"}
    weights = {i.name for i in model.graph.initializer}
    assert not any(w.endswith("_weight_flipped") for w in weights)  # Winograd's own kernels
    assert f"conv_4_2_winograd_{mode}_flipped" in weights
    # raw weights stay in weights.bin for the torch backend, though no graph reads them
    assert "conv_4_2_weight" in manifest.data["weights"]["tensors"]
    assert "conv_4_2_weight" not in weights
    entry = manifest.data["buckets"][BUCKET]["validation"]
    assert entry["max_rel_err"] <= FP32_TOLERANCE


def test_winograd_engine_matches_the_reference_per_layer(winograd_engine, narrow_state_dict):
    """Fresh random images and real photos (resized to the bucket) through the runtime: every
    layer's feature and heatmap within the fp32 tolerance of the autograd reference."""
    mode, out = winograd_engine
    spec = FeatureSpec(width_div=NARROW, heatmaps=True)
    rng = np.random.default_rng(21)
    images = list(rng.integers(0, 256, size=(2, 224, 288, 3), dtype=np.uint8))
    with Extractor.open(out) as ex:
        photo = [ex.prepare(p).pixels for p in photos()[:4]]
        images += [p for p in photo if p.shape == (224, 288, 3)]
        feats = ex.extract(images, batch_size=len(images))
    assert not feats.errors and len(images) >= 3
    want = reference_features(spec, narrow_state_dict, torch.from_numpy(np.stack(images)))
    got = {t: feats[t] for t in spec.layers}
    got.update({f"{t}.heatmap": np.stack(feats.heatmaps[t]) for t in spec.layers})
    report = conformance_report(got, want, "fp32")
    assert report.ok, report.summary()
    print(mode, json.dumps({k: f"{v:.1e}" for k, v in report.errors.items()}))


def test_torch_backend_runs_a_winograd_engine_direct(winograd_engine) -> None:
    _, out = winograd_engine
    image = np.random.default_rng(5).integers(0, 256, size=(1, 224, 288, 3), dtype=np.uint8)
    with Extractor.open(out, backend="ort") as ort, Extractor.open(out, backend="torch") as tb:
        a, b = ort.extract([image[0]]), tb.extract([image[0]])
    for layer in EngineManifest.load(out).layers:
        err = np.linalg.norm(a[layer] - b[layer]) / np.linalg.norm(b[layer])
        assert err < FP32_TOLERANCE, layer


def test_gpu_paths_refuse_winograd_engines(winograd_engine, narrow_engine: Path) -> None:
    _, out = winograd_engine
    manifest = EngineManifest.load(out)
    for cls in (OrtCudaBackend, OrtTensorrtBackend):
        reason = cls.unavailable_reason(manifest)
        assert reason is not None and "--conv direct" in reason and cls.name in reason
        assert "\n" not in reason
    with pytest.raises(
        EngineError, match="TensorRT build takes direct convolutions.*--conv direct"
    ):
        build_plans(out, BuildSettings())
    direct = EngineManifest.load(narrow_engine)  # area-256 narrow: `auto` wrote no Winograd
    assert direct.winograd == {} and direct.direct_convolutions_reason("x") is None


def test_graph_module_matches_direct_graph(narrow_state_dict) -> None:
    """The analytic graph itself, Winograd against direct, in torch (no export)."""
    spec = FeatureSpec(width_div=NARROW)
    image = torch.from_numpy(
        np.random.default_rng(3).integers(0, 256, size=(1, 224, 224, 3), dtype=np.uint8)
    )
    want = reference_features(spec, narrow_state_dict, image)
    for mode in ("f2", "f4"):
        plan = conv_plan(spec, mode, backward_convs(spec))
        graph = AnalyticGraph(spec, narrow_state_dict, winograd=plan).eval()
        with torch.no_grad():
            got = dict(zip(spec.output_names(), graph(image), strict=True))
        report = conformance_report({k: v.numpy() for k, v in got.items()}, want, "fp32")
        assert report.ok, (mode, report.summary())


def test_bench_times_a_winograd_engine_beside_its_direct_twin(winograd_engine, tmp_path: Path):
    """`interactive bench`'s engine-direct peer: the same engine exported with --conv direct,
    timed in the same backend and run, judged against the reference, and the ratio reported."""
    mode, out = winograd_engine
    if mode != "f4":
        pytest.skip("one bench run is enough")
    from interactive_features.bench.harness import main as bench_main
    from interactive_features.bench.report import markdown

    argv = ["--engine", str(out), "--buckets", BUCKET, "--reps", "2", "--out", str(tmp_path)]
    argv += ["--cache", str(tmp_path / "cache"), "--threads", "2", "--backends", "ort"]
    argv += ["--peers", "reference,engine-direct", "--no-plots"]
    assert bench_main(argv) == 0
    (json_file,) = tmp_path.glob("bench-*.json")
    run = json.loads(json_file.read_text())
    cases = {c["variant"]: c for c in run["cases"] if c.get("backend") == "ort"}
    assert set(cases) == {"interactive", "direct"}
    direct = EngineManifest.load(cases["direct"]["engine"])
    assert direct.settings.conv == "direct" and direct.winograd == {}
    for case in cases.values():
        assert case["status"] == "ok" and case["conformance"]["ok"] is True
    assert cases["interactive"]["ratios"]["vs_direct"] > 0
    text = markdown(run)
    assert "ort direct-conv" in text and "x the direct-convolution engine" in text


def test_engine_comparison_with_the_malloc_baseline(winograd_engine, narrow_engine: Path):
    """bench/winograd.py --engines DIRECT WINOGRAD --malloc: the direct engine once more with
    sessions as before the shared arena, first; the same graph gives the same numbers whatever
    the allocator, and every row has its speed-up and fraction of the matmul rate."""
    mode, out = winograd_engine
    if mode != "f4":
        pytest.skip("one comparison is enough")
    from interactive_features.bench.winograd import compare_engines, engines_markdown

    result = compare_engines([narrow_engine, out], (288, 224), reps=2, threads=2, malloc=True)
    rows = result["engines"]
    assert [r["conv"] for r in rows] == ["malloc", "auto", "f4"]  # narrow `auto`: direct only
    assert rows[0]["engine"] == rows[1]["engine"] == str(narrow_engine)
    assert rows[1]["max_rel_diff_vs_first"] == 0.0  # the allocator changes no number
    assert 0 < rows[2]["max_rel_diff_vs_first"] < FP32_TOLERANCE
    assert all(r["seconds"] > 0 and r["of_matmul"] > 0 for r in rows)
    assert "onnxruntime-fp32" in result["matmul"]["before"]
    assert "| malloc |" in engines_markdown(result)


def test_an_engine_from_before_conv_is_direct_and_takes_more_buckets(narrow_engine, tmp_path):
    """A manifest without `export.conv` and `winograd` (written before the option) reads as
    `--conv direct`, so its export command names it; adding a bucket with the default (`auto`)
    is refused, naming both and the flag that adds it; with `--conv direct` it works."""
    import shutil

    engine = tmp_path / "old"
    shutil.copytree(narrow_engine, engine)
    data = json.loads((engine / "manifest.json").read_text())
    del data["export"]["conv"], data["winograd"]
    (engine / "manifest.json").write_text(json.dumps(data))
    manifest = EngineManifest.load(engine)
    assert manifest.settings.conv == "direct" and manifest.winograd == {}
    assert "--conv direct" in manifest.export_command([(288, 256)])
    match = "conv: 'direct' there, 'auto' asked\\); pass --conv direct to add buckets to it"
    with pytest.raises(EngineError, match=match):
        export_engine(narrow_request(engine, "288x256", heatmaps=True), log=print)
    export_engine(narrow_request(engine, "288x256", heatmaps=True, conv="direct"), log=print)
    assert (288, 256) in EngineManifest.load(engine).buckets


@pytest.fixture(scope="module")
def dual_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default `--conv auto` where its plan has steps: the half-width network (256 channels
    from conv-4-1 on), area 256, one bucket."""
    out = tmp_path_factory.mktemp("dual") / "half"
    export_engine(narrow_request(out, "256x256", width_div=2, heatmaps=True), log=print)
    return out


def test_auto_writes_direct_graphs_for_every_backend_and_winograd_graphs_for_the_cpu(
    dual_engine: Path, tmp_path: Path
) -> None:
    manifest = EngineManifest.load(dual_engine)
    assert manifest.settings.conv == "auto" and manifest.cpu_graphs
    assert list(manifest.winograd) == [f"conv-{b}-{k}" for b in (4, 5) for k in (1, 2, 3)]
    direct, cpu = manifest.bucket_path((256, 256)), manifest.bucket_path((256, 256), cpu=True)
    assert (direct.name, cpu.name) == ("bucket-256x256.onnx", "bucket-256x256.cpu.onnx")
    ops = {
        p: {n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node}
        for p in (direct, cpu)
    }
    assert ops[direct] <= ALLOWED_OPS and "MatMul" not in ops[direct] and "MatMul" in ops[cpu]
    assert "conv_4_1_weight" in manifest.data["weights"]["tensors"]  # the direct graph's
    entry = manifest.data["buckets"]["256x256"]
    for key in ("validation", "cpu_validation"):
        assert entry[key]["max_rel_err"] <= FP32_TOLERANCE
    # GPU backends and TensorRT builds take the direct graphs: nothing to refuse
    assert manifest.direct_convolutions_reason("a TensorRT build") is None
    # the CPU backend runs the Winograd graph; both within the tolerance of the reference
    image = np.random.default_rng(5).integers(0, 256, (1, 256, 256, 3), np.uint8)
    state_dict = load_state_dict("random:0", "vgg16", 2)
    want = reference_features(engine_spec(manifest), state_dict, torch.from_numpy(image))
    with Extractor.open(dual_engine) as ex:
        assert ex.backend.runs_on_cpu
        got_cpu = ex.backend.run((256, 256), image)
    session = ort_session(direct, engine_initializers(manifest), providers=["CPUExecutionProvider"])
    values = session.run(manifest.outputs, {manifest.input_name: image})
    got_direct = dict(zip(manifest.outputs, values, strict=True))
    for got in (got_cpu, got_direct):
        report = conformance_report(got, want, "fp32", label="dual")
        assert report.ok, report.summary()
    diff = max(conformance_report(got_cpu, got_direct, "fp32", label="x").errors.values())
    assert 0 < diff < FP32_TOLERANCE  # not the same graph


def test_a_missing_cpu_graph_is_that_buckets_error_and_a_manifest_without_it_is_refused(
    dual_engine: Path, tmp_path: Path
) -> None:
    """The CPU graph is a file like the others: missing, the bucket's images are error rows
    naming it (the direct graph is not silently used instead); a `cpu_graphs` manifest whose
    bucket lacks `cpu_file` is refused, naming the key."""
    import shutil

    engine = tmp_path / "dual"
    shutil.copytree(dual_engine, engine)
    (engine / "bucket-256x256.cpu.onnx").unlink()
    image = np.full((256, 256, 3), 120, np.uint8)
    with Extractor.open(engine) as ex:
        features = ex.extract([image])
    assert "bucket-256x256.cpu.onnx" in features.errors[0] and not features.ok.any()
    data = json.loads((engine / "manifest.json").read_text())
    del data["buckets"]["256x256"]["cpu_file"]
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=r"buckets\.256x256\.cpu_file: missing"):
        EngineManifest.load(engine)


def test_an_engine_of_the_first_winograd_layout_keeps_its_graphs_but_takes_no_bucket(
    winograd_engine, tmp_path
):
    """Engines of 2026-12-01 stored their Winograd kernels in layout 1 (no `winograd_layout`
    record): their graphs still run, and adding a bucket is refused in one sentence, before
    anything is written."""
    import shutil

    mode, out = winograd_engine
    engine = tmp_path / "layout-1"
    shutil.copytree(out, engine)
    data = json.loads((engine / "manifest.json").read_text())
    assert data["winograd_layout"] == 2
    del data["winograd_layout"]
    (engine / "manifest.json").write_text(json.dumps(data))
    before = sorted(p.name for p in engine.iterdir())
    weights = (engine / "weights.bin").stat().st_size
    image = np.random.default_rng(0).integers(0, 256, (224, 288, 3), np.uint8)  # BUCKET's size
    with Extractor.open(engine) as ex:
        assert not ex.extract([image]).errors
    request = narrow_request(engine, "256x256", heatmaps=True, conv=mode)
    with pytest.raises(EngineError, match="stored in layout 1 .* export into a new --out"):
        export_engine(request, log=print)
    assert sorted(p.name for p in engine.iterdir()) == before
    assert (engine / "weights.bin").stat().st_size == weights


def test_a_malformed_winograd_record_is_refused(narrow_engine, tmp_path):
    import shutil

    engine = tmp_path / "bad"
    shutil.copytree(narrow_engine, engine)
    data = json.loads((engine / "manifest.json").read_text())
    data["winograd"] = {"conv-5-1": {"backward": "f6"}}
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=r"winograd.conv-5-1.backward: expected"):
        EngineManifest.load(engine)
