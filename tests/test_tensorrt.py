"""TensorRT: what runs without TensorRT for real (the graph TensorRT builds from, in ONNX Runtime on
the CPU against the reference; the CLI's errors; plan compatibility over build facts; the
manifest's build facts), and the plans themselves under the `tensorrt` marker."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from interactive_features.engines.tensorrt_build import (
    BuildSettings,
    build_plans,
    scale_seed,
    write_tensorrt_graph,
)
from interactive_features.engines.tensorrt_plans import (
    build_command,
    plan_facts,
    plan_incompatibility,
    tensorrt_section,
)
from interactive_features.export.exporter import export_engine
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec
from interactive_features.runtime.backends import (
    available_backends,
    backend_status,
    engine_initializers,
    open_backend,
    ort_session,
)
from interactive_features.runtime.cli import build_parser
from interactive_features.runtime.cli import main as cli_main
from interactive_features.runtime.conformance import conformance_report, relative_error
from interactive_features.runtime.manifest import (
    EngineError,
    EngineManifest,
    is_heatmap,
    write_manifest,
)

from conftest import NARROW, assert_close, narrow_request

SPEC = FeatureSpec("vgg16", "last", 2, PAPER_LAYERS, NARROW, heatmaps=True)
# The torch backend's bf16 measured 2.1e-2 on one layer's features of the narrow network (CPU).
BF16_FEATURES = "bf16's 8-bit mantissa: features near the 2e-2 limit (torch backend, CPU)"
NO_TENSORRT = backend_status("tensorrt") is not None
FACTS = {
    "tensorrt": "10.13.0.35",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "weights_sha256": "abc",
}


@pytest.fixture
def engine_copy(narrow_engine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engine"
    shutil.copytree(narrow_engine, copy)
    return copy


def _run_graph(model: onnx.ModelProto, path: Path, manifest: EngineManifest, images: np.ndarray):
    """Save `model` beside weights.bin and run it in ONNX Runtime on the CPU."""
    onnx.save(model, str(path))
    session = ort_session(path, engine_initializers(manifest), providers=["CPUExecutionProvider"])
    return dict(
        zip(manifest.outputs, session.run(manifest.outputs, {"images": images}), strict=True)
    )


def _images(seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


# --- the graph TensorRT builds from ----------------------------------------------------------


def test_fp32_graph_computes_what_the_export_does(engine_copy: Path, narrow_state_dict) -> None:
    manifest = EngineManifest.load(engine_copy)
    path = write_tensorrt_graph(manifest, (256, 256), "fp32")
    assert path.name == "bucket-256x256.fp32.trt.onnx" and path.stat().st_size < 200_000
    model = onnx.load(str(path), load_external_data=False)
    first = model.graph.node[0]
    assert (first.op_type, list(first.input)) == ("Cast", ["images"])  # uint8 is cast first
    assert not any(i == "images" for n in model.graph.node[1:] for i in n.input)
    images = _images(1)
    session = ort_session(path, engine_initializers(manifest), providers=["CPUExecutionProvider"])
    got = dict(
        zip(manifest.outputs, session.run(manifest.outputs, {"images": images}), strict=True)
    )
    assert_close(got, reference_features(SPEC, narrow_state_dict, torch.from_numpy(images)))


def test_seed_scale_is_undone_exactly(engine_copy: Path) -> None:
    """Scaling the seed by 256 in float32 changes no output beyond rounding: the scale enters
    where the backward pass starts and leaves at every output (a misplaced one shows as 256x)."""
    manifest = EngineManifest.load(engine_copy)
    model = onnx.load(str(manifest.bucket_path((256, 256))), load_external_data=False)
    images = _images(2)
    plain = _run_graph(model, engine_copy / "plain.onnx", manifest, images)
    scaled_model = onnx.ModelProto()
    scaled_model.CopyFrom(model)
    seeds, divided = scale_seed(scaled_model.graph, 256.0)
    assert (seeds, divided) == (1, len(manifest.outputs))  # config last: one seed, fc-7's
    scaled = _run_graph(scaled_model, engine_copy / "scaled.onnx", manifest, images)
    for name in manifest.outputs:
        assert relative_error(scaled[name], plain[name]) < 1e-5, name


def test_orig_configs_have_no_seed(tmp_path: Path) -> None:
    out = tmp_path / "orig"
    export_engine(
        narrow_request(out, buckets="256x256", config="orig-avg"),
        log=lambda line: None,
    )
    manifest = EngineManifest.load(out)
    model = onnx.load(str(manifest.bucket_path((256, 256))), load_external_data=False)
    assert scale_seed(model.graph, 256.0) == (0, 0)


def test_fp16_graph_is_within_reduced_tolerance(engine_copy: Path, narrow_state_dict) -> None:
    """The fp16 graph (convolutions, ReLUs and pools in half precision, seed scaled) run by ONNX
    Runtime's CPU half-precision kernels: 2e-2 and cosine 0.999 per feature (export/ALGORITHM.md).
    """
    manifest = EngineManifest.load(engine_copy)
    path = write_tensorrt_graph(manifest, (256, 256), "fp16", log=lambda line: None)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Div"] >= len(manifest.outputs) and ops["Cast"] > 20
    reduced = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert len(reduced) > 20  # the weights are fp16 initializers, mostly in weights.fp16.bin
    images = _images(3, n=3)
    session = ort_session(path, engine_initializers(manifest), providers=["CPUExecutionProvider"])
    got = dict(
        zip(manifest.outputs, session.run(manifest.outputs, {"images": images}), strict=True)
    )
    want = reference_features(SPEC, narrow_state_dict, torch.from_numpy(images))
    report = conformance_report(got, want, "fp16", "fp16 TensorRT graph in ONNX Runtime")
    assert not [c for c in report.failures if not is_heatmap(c.name)], report.table()


@pytest.mark.parametrize("precision, onnx_type", [("fp16", 10), ("bf16", 16)])
def test_reduced_graphs_lower_the_convolutions_only(
    engine_copy: Path, precision: str, onnx_type: int
) -> None:
    """Lowered nodes take reduced-precision initializers (no Cast of a weight, which TensorRT
    would fold into unstrippable constants), the large ones in weights.PRECISION.bin."""
    manifest = EngineManifest.load(engine_copy)
    model = onnx.load(str(manifest.bucket_path((256, 256))), load_external_data=False)
    original = Counter(n.op_type for n in model.graph.node)
    path = write_tensorrt_graph(manifest, (256, 256), precision, log=lambda line: None)
    onnx.checker.check_model(str(path), full_check=True)  # types and shapes infer
    prepared = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in prepared.graph.initializer}
    assert not [n.name for n in prepared.graph.node if n.op_type == "Cast" and n.input[0] in inits]
    boxes = sum(1 for n in model.graph.node if any(i.startswith("box_") for i in n.input))
    lowered = [n for n in prepared.graph.node if n.op_type in ("Conv", "ConvTranspose")
               and inits[n.input[1]].data_type == onnx_type]  # fmt: skip
    convs = original["Conv"] + original["ConvTranspose"]
    assert len(lowered) == convs - boxes  # every convolution with weights, none of the box sums
    table = manifest.data["weights"]["tensors"]
    for node in lowered:
        for name in node.input[1:]:
            init = inits[name]
            assert name.endswith(f".{precision}") and init.data_type == onnx_type
            location = {e.key: e.value for e in init.external_data}
            if name.removesuffix(f".{precision}") in table:  # large: in the reduced file
                assert location["location"] == f"weights.{precision}.bin"
            else:  # small: inside the graph, converted there
                assert init.data_location != onnx.TensorProto.EXTERNAL and init.raw_data
    fp32_weights = {n for n, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT}
    assert fp32_weights <= {i for n in prepared.graph.node for i in n.input}  # no dead weights
    assert {o.name for o in prepared.graph.output} == {o.name for o in model.graph.output}
    if precision == "bf16":  # ONNX Runtime's CPU provider has no bfloat16 convolution
        try:
            ort_session(path, engine_initializers(manifest), providers=["CPUExecutionProvider"])
        except EngineError as err:
            assert "NOT_IMPLEMENTED" in str(err) and "Conv(22)" in str(err), err


def test_reduced_weights_file_is_shared_and_verified(engine_copy: Path) -> None:
    """One weights.fp16.bin for every bucket, written once, 64 KiB-aligned, its sha256s in the
    manifest and checked; a flipped byte is refused and the next build rewrites the file."""
    from interactive_features.engines.tensorrt_backend import verify_refit_sources
    from interactive_features.engines.tensorrt_build import ALIGNMENT, bfloat16_bits
    from interactive_features.engines.tensorrt_plans import file_sha256, verify_reduced_weights

    manifest = EngineManifest.load(engine_copy)
    verify_refit_sources(manifest, "fp32")  # weights.bin only
    with pytest.raises(EngineError, match="records no weights.fp16.bin.*interactive build"):
        verify_refit_sources(manifest, "fp16")
    quiet = lambda line: None  # noqa: E731
    first = write_tensorrt_graph(manifest, (256, 256), "fp16", log=quiet)
    reduced = engine_copy / "weights.fp16.bin"
    stamp = reduced.stat().st_mtime_ns
    second = write_tensorrt_graph(manifest, (288, 224), "fp16", log=quiet)
    assert reduced.stat().st_mtime_ns == stamp  # the second bucket reuses the file
    assert sorted(p.name for p in engine_copy.glob("weights*.bin")) == [
        "weights.bin",
        "weights.fp16.bin",
    ]
    locations = []
    for graph in (first, second):
        assert graph.stat().st_size < 200_000
        model = onnx.load(str(graph), load_external_data=False)
        locations.append(
            {t.name: tuple(e.value for e in t.external_data) for t in model.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL and t.name.endswith(".fp16")}
        )  # fmt: skip
    assert locations[0] and locations[0] == locations[1]  # same tensors, same offsets
    entry = EngineManifest.load(engine_copy).data["tensorrt"]["reduced_weights"]["fp16"]
    assert entry["bytes"] == reduced.stat().st_size and entry["sha256"] == file_sha256(reduced)
    table = manifest.data["weights"]["tensors"]
    data = reduced.read_bytes()
    fp32 = engine_initializers(manifest)
    for name, tensor in entry["tensors"].items():
        assert (
            tensor["offset"] % ALIGNMENT == 0 and tensor["source_sha256"] == table[name]["sha256"]
        )
        raw = data[tensor["offset"] : tensor["offset"] + tensor["length"]]
        assert hashlib.sha256(raw).hexdigest() == tensor["sha256"]
        want = fp32[name].numpy()
        np.testing.assert_array_equal(
            np.frombuffer(raw, "<f2").reshape(want.shape), want.astype(np.float16)
        )
    lengths = [t["length"] for t in entry["tensors"].values()]
    assert 2 * sum(lengths) == sum(table[n]["length"] for n in entry["tensors"])  # half of fp32
    assert entry["bytes"] == max(t["offset"] + t["length"] for t in entry["tensors"].values())
    verify_reduced_weights(EngineManifest.load(engine_copy), "fp16")
    # a flipped byte: refused at load, rewritten by the next build
    name, tensor = next(iter(entry["tensors"].items()))
    with open(reduced, "r+b") as f:
        f.seek(tensor["offset"] + 3)
        byte = f.read(1)
        f.seek(tensor["offset"] + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(EngineError, match="weights.fp16.bin"):
        verify_refit_sources(EngineManifest.load(engine_copy), "fp16")  # what a load checks
    lines: list[str] = []
    write_tensorrt_graph(EngineManifest.load(engine_copy), (256, 256), "fp16", log=lines.append)
    assert any("rewriting weights.fp16.bin" in line for line in lines), lines
    again = verify_reduced_weights(EngineManifest.load(engine_copy), "fp16")
    assert again["tensors"] == entry["tensors"] and again["sha256"] == entry["sha256"]
    # bf16: its own file, the same layout, the values within bf16's rounding of fp32
    write_tensorrt_graph(EngineManifest.load(engine_copy), (256, 256), "bf16", log=quiet)
    entry16 = verify_reduced_weights(EngineManifest.load(engine_copy), "bf16")
    data16 = (engine_copy / "weights.bf16.bin").read_bytes()
    for name, tensor in entry16["tensors"].items():
        raw = data16[tensor["offset"] : tensor["offset"] + tensor["length"]]
        np.testing.assert_array_equal(
            np.frombuffer(raw, "<u2"), bfloat16_bits(fp32[name].numpy()).ravel()
        )


def test_bfloat16_bits_round_like_torch() -> None:
    """float32 -> bfloat16 by round to nearest even on the upper 16 bits, as torch converts."""
    from interactive_features.engines.tensorrt_build import bfloat16_bits

    rng = np.random.default_rng(7)
    values = np.concatenate([
        (rng.standard_normal(100_000) * 10.0 ** rng.integers(-40, 38, 100_000)).astype(np.float32),
        rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.integers(0, 2**16, 1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),  # ties
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 65504.0], np.float32),
    ])  # fmt: skip
    finite = ~np.isnan(values)
    got = bfloat16_bits(values)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got[finite], want[finite])
    nan = ~finite
    assert (
        nan.any()
        and torch.isnan(torch.from_numpy(got[nan].view(np.int16)).view(torch.bfloat16)).all()
    )
    assert bfloat16_bits(np.float32(np.nan)) == 0x7FC0


# --- the CLI and the registry without TensorRT -----------------------------------------------


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_build_without_tensorrt_names_what_to_install(
    engine_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (engine_copy / "manifest.json").read_text()
    code = cli_main(["build", "--engine", str(engine_copy), "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 1
    assert "TensorRT" in err and "pip install" in err
    assert (engine_copy / "manifest.json").read_text() == before  # nothing recorded


def test_build_rejects_bad_options(engine_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["build", "--engine", str(engine_copy), "--backend", "tensorrt", "--precision", "int8"]
        )
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # a bad number is bad usage (exit 2)
        cli_main(
            ["build", "--engine", str(engine_copy), "--backend", "tensorrt", "--max-batch", "0"]
        )
    assert (
        exit_info.value.code == 2 and "--max-batch: must be at least 1" in capsys.readouterr().err
    )
    code = cli_main(
        ["build", "--engine", str(engine_copy), "--backend", "tensorrt", "--buckets", "512x512"]
    )
    assert code == 1 and "interactive export" in capsys.readouterr().err


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_registry_skips_tensorrt_without_it(narrow_engine: Path) -> None:
    manifest = EngineManifest.load(narrow_engine)
    reason = backend_status("tensorrt", manifest)
    assert reason is not None and "TensorRT" in reason
    assert available_backends(manifest)["tensorrt"] == reason
    with pytest.raises(EngineError, match="cannot run here"):
        open_backend(manifest, "tensorrt")
    assert open_backend(manifest, "auto").name != "tensorrt"


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")
def test_self_check_records_why_it_could_not_run(engine_copy: Path) -> None:
    from interactive_features.engines.tensorrt_build import self_check_plan

    lines: list[str] = []
    record = self_check_plan(EngineManifest.load(engine_copy), (256, 256), "fp16", lines.append)
    assert record["passed"] is False and "TensorRT" in record["error"]
    assert lines and "self-check could not run" in lines[0]
    json.dumps(record)  # fits the manifest


# --- plan compatibility and build facts ------------------------------------------------------


def test_a_plan_runs_only_where_it_was_built() -> None:
    assert plan_incompatibility(FACTS, dict(FACTS)) is None
    other_name = {**FACTS, "gpu": "NVIDIA H200"}  # same architecture: TensorRT loads it
    assert plan_incompatibility(FACTS, other_name) is None
    why = plan_incompatibility(FACTS, {**FACTS, "tensorrt": "11.4.0.106"})
    assert why == "built for TensorRT 10.13.0.35 (this host has 11.4.0.106)"
    why = plan_incompatibility(FACTS, {**FACTS, "gpu": "NVIDIA A100", "compute_capability": "8.0"})
    assert why is not None and "compute capability 9.0" in why and "NVIDIA A100, 8.0" in why
    why = plan_incompatibility(FACTS, {**FACTS, "weights_sha256": "def"})
    assert why is not None and "other weights" in why
    assert plan_incompatibility({}, FACTS) is not None  # a plan without facts is refused


def test_rebuild_command_is_a_valid_build_command(narrow_engine: Path) -> None:
    manifest = EngineManifest.load(narrow_engine)
    command = build_command(manifest, "bf16", [(288, 224), (256, 256)], max_batch=16, force=True)
    argv = shlex.split(command)
    assert argv[:2] == ["interactive", "build"]
    args = build_parser().parse_args(argv[1:])
    assert (args.engine, args.precision, args.buckets) == (narrow_engine, "bf16", "288x224,256x256")
    assert (args.max_batch, args.force, args.backend) == (16, True, "tensorrt")


def test_build_facts_survive_the_manifest_round_trip_and_new_exports(engine_copy: Path) -> None:
    manifest = EngineManifest.load(engine_copy)
    facts = {**FACTS, "precision": "fp16", "batch": {"min": 1, "opt": 8, "max": 8}}
    manifest.data["tensorrt"] = {
        "settings": {"precision": "fp16", "max_batch": 8, "workspace_gb": 2.0, "lazy": True},
        "plans": {"256x256": {"fp16": facts}},
    }
    write_manifest(engine_copy, manifest.data)
    export_engine(  # adding a bucket keeps the TensorRT section
        narrow_request(engine_copy, buckets="288x256", heatmaps=True),
        log=lambda line: None,
    )
    again = EngineManifest.load(engine_copy)
    assert (288, 256) in again.buckets
    assert plan_facts(again, (256, 256), "fp16") == facts
    assert plan_facts(again, (256, 256), "bf16") is None
    assert plan_facts(again, (288, 256), "fp16") is None
    settings = BuildSettings.from_manifest(again, precision="bf16")
    assert (settings.precision, settings.max_batch, settings.workspace_gb) == ("bf16", 8, 2.0)
    assert settings.lazy and not settings.force
    assert json.loads((engine_copy / "manifest.json").read_text())["tensorrt"]["plans"]


def test_tensorrt_section_of_an_unbuilt_engine_is_empty(narrow_engine: Path) -> None:
    section = tensorrt_section(EngineManifest.load(narrow_engine))
    assert section == {"settings": {}, "plans": {}}


# --- real TensorRT (skipped without it and a GPU) --------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT, reason=f"{backend_status('tensorrt')}")
@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        "fp16",
        pytest.param("bf16", marks=pytest.mark.xfail(reason=BF16_FEATURES, strict=False)),
    ],
)
def test_plans_match_the_reference(engine_copy: Path, narrow_state_dict, precision: str) -> None:
    manifest = build_plans(
        engine_copy, BuildSettings(precision=precision, max_batch=4), [(256, 256)]
    )
    facts = plan_facts(manifest, (256, 256), precision)
    assert facts is not None and facts["weight_stripped"] and facts["batch"]["max"] == 4
    check = facts["self_check"]  # the build's own run against ONNX Runtime
    assert "error" not in check and check["refit_missing"] == [] and check["features_passed"]
    images = _images(4, n=6)  # 6 > max batch 4: two chunks through both streams
    backend = open_backend(manifest, "tensorrt", precision=precision)
    got = backend.run((256, 256), images)
    # Weight-stripped: the refitter had weights to fill and none is left missing (a plan's
    # size says little: a stripped plan holding many kernels may still be large).
    refit = backend.plan((256, 256)).refit_report
    assert refit["weights"] and refit["missing"] == [], refit
    backend.close()
    want = reference_features(SPEC, narrow_state_dict, torch.from_numpy(images))
    report = conformance_report(got, want, precision, f"tensorrt {precision}")
    # Reduced precision: features must conform; heatmaps may not (ReLU masks that flip in a
    # half-precision forward pass show in full there, as with the torch backend).
    failed = [c for c in report.failures if precision == "fp32" or not is_heatmap(c.name)]
    assert not failed, report.table()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT, reason=f"{backend_status('tensorrt')}")
def test_foreign_plans_are_refused_and_lazy_plans_built(engine_copy: Path) -> None:
    manifest = build_plans(engine_copy, BuildSettings(precision="fp32", max_batch=2), [(256, 256)])
    manifest.data["tensorrt"]["plans"]["256x256"]["fp32"]["tensorrt"] = "1.0.0"
    write_manifest(engine_copy, manifest.data)
    backend = open_backend(
        EngineManifest.load(engine_copy), "tensorrt", precision="fp32", lazy=True
    )
    with pytest.raises(EngineError, match="interactive build .* --force"):
        backend.run((256, 256), _images(5, n=1))
    got = backend.run((288, 224), np.zeros((1, 224, 288, 3), np.uint8) + 7)  # built lazily
    assert plan_facts(EngineManifest.load(engine_copy), (288, 224), "fp32") is not None
    assert set(got) == set(manifest.outputs)
    backend.close()


# --- the backend's CUDA plumbing, on an emulated CUDA runtime -------------------------------


def test_plumbing_chunks_and_synchronises_every_batch() -> None:
    """_BucketPlan.run (pinned buffers, two streams, events, chunks through both slots) around a
    copying context on HostRuntime, whose copies run only when the host waits on an event: every
    output byte checked, every buffer freed; a collect that skips the wait reads stale bytes."""
    from interactive_features.bench.cuda_plumbing import HostRuntime, exercise
    from interactive_features.engines import tensorrt_backend

    runtime = HostRuntime()
    report = exercise(runtime, batches=(1, 4, 9, 3))
    assert report["mismatches"] == [] and report["chunks"] == 1 + 1 + 3 + 1
    assert runtime.buffers == {} and runtime.queue == []

    def no_wait(self, slot, results):  # type: ignore[no-untyped-def]
        if slot.rows is not None:
            start, stop = slot.rows
            for name, pinned in slot.pinned_out.items():
                results[name][start:stop] = pinned.array[: stop - start]
            slot.rows = None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensorrt_backend._BucketPlan, "_collect", no_wait)
        assert exercise(HostRuntime(), batches=(2,))["mismatches"]


@pytest.mark.parametrize("refuse", ["shape", "address"])
def test_refused_shapes_and_addresses_are_errors(refuse: str) -> None:
    from interactive_features.bench.cuda_plumbing import (
        INPUT,
        ROWS,
        CopyContext,
        HostRuntime,
        runtime_in_use,
    )
    from interactive_features.engines.tensorrt_backend import _BucketPlan

    runtime = HostRuntime()
    with runtime_in_use(runtime), pytest.raises(EngineError, match="refused"):
        context = CopyContext(runtime, (32, 32), refuse=refuse)
        plan = _BucketPlan.for_context(context, (32, 32), INPUT, list(ROWS), 2)
        plan.run(np.zeros((1, 32, 32, 3), np.uint8), 1, 2)
