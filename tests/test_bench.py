"""`interactive bench`: smoke runs of both modes on the narrow engine (one bucket, two reps).

They check the run's JSON (keys, types, sample counts, ordered percentiles), that every ratio is
the one its own run's samples give, that a backend absent here is reported skipped with its
reason, --compare, the plots, and that the cost model and the torch peers are right.
Timings themselves are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from interactive.bench.cost import cost_per_image
from interactive.bench.harness import main as bench_main
from interactive.bench.peers import PEERS, forward_spec, make_peer
from interactive.bench.profile import aggregate_trace
from interactive.export.reference import reference_features
from interactive.export.spec import FeatureSpec
from interactive.runtime.cli import main as cli_main
from interactive.runtime.manifest import EngineError

from conftest import NARROW, assert_close

BUCKET = "256x256"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(out: Path, engine: Path, *args: str) -> dict[str, Any]:
    argv = ["--engine", str(engine), "--buckets", BUCKET, "--reps", "2", "--out", str(out)]
    argv += ["--cache", str(out / "cache"), "--threads", "2", *args]
    assert bench_main(argv) == 0
    (json_file,) = out.glob("bench-*.json")
    return dict(json.loads(json_file.read_text()))


@pytest.fixture(scope="module")
def engine_run(narrow_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-engine")
    peers = "reference,torch-forward,engine-forward"
    return run_bench(
        out, narrow_engine, "--backends", "ort,tensorrt", "--peers", peers, "--profile"
    )


@pytest.fixture(scope="module")
def e2e_run(narrow_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-e2e")
    args = ["--mode", "e2e", "--backends", "ort", "--peers", "reference", "--batch", "2"]
    return run_bench(out, narrow_engine, *args, "--no-plots")


def ok_cases(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in run["cases"] if c["status"] == "ok"]


def find(run: dict[str, Any], target: str, variant: str = "interactive") -> dict[str, Any]:
    (case,) = [c for c in run["cases"] if c["target"] == target and c["variant"] == variant]
    return case


def check_schema(run: dict[str, Any], reps: int) -> None:
    assert run["schema"] == "interactive-bench/1"
    assert run["argv"] and run["command"].startswith("interactive bench --engine")
    assert run["settings"]["threads"] == 2 and run["settings"]["reps"] == reps
    assert run["machine"]["cpu"] and isinstance(run["machine"]["flags"], list)
    assert run["machine"]["versions"]["onnxruntime"] and run["machine"]["versions"]["torch"]
    rates = run["matmul"]["gflops"]
    assert rates["torch-fp32"] > 0 and rates["torch-bf16"] > 0 and rates["numpy-fp32"] > 0
    assert run["cost"][BUCKET]["interactive"]["gflop"] > run["cost"][BUCKET]["forward"]["gflop"]
    for case in ok_cases(run):
        assert len(case["samples_s"]) == reps and all(s > 0 for s in case["samples_s"])
        assert case["load_s"] >= 0 and case["first_call_s"] > 0 and case["peak_rss_mb"] > 10
        assert case["gpu_peak_mb"] is None  # CPU run
        stats = case["stats"]
        for scale in ("batch_s", "image_s"):
            p = stats[scale]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"], p
        assert stats["image_s"]["p50"] == pytest.approx(stats["batch_s"]["p50"] / case["batch"])
        assert stats["images_per_s"] > 0 and stats["gflops"] > 0 and stats["matmul_fraction"] > 0


def test_engine_mode_schema_and_skips(engine_run: dict[str, Any]) -> None:
    check_schema(engine_run, reps=2)
    targets = {(c["target"], c["variant"]): c["status"] for c in engine_run["cases"]}
    assert targets == {
        ("ort", "interactive"): "ok",
        ("ort", "forward"): "ok",
        ("tensorrt", "interactive"): "skipped",
        ("tensorrt", "forward"): "skipped",
        ("reference", "interactive"): "ok",
        ("torch-forward", "forward"): "ok",
    }
    skipped = find(engine_run, "tensorrt")
    assert "tensorrt" in skipped["reason"] and "samples_s" not in skipped
    assert Path(engine_run["settings"]["forward_engine"], "manifest.json").is_file()


def test_ratios_come_from_the_same_run(engine_run: dict[str, Any]) -> None:
    ort, ref = find(engine_run, "ort"), find(engine_run, "reference")
    twin, floor = find(engine_run, "ort", "forward"), find(engine_run, "torch-forward", "forward")
    p50 = lambda case: float(np.percentile(case["samples_s"], 50))  # noqa: E731
    ratios = ort["ratios"]
    assert ratios["vs_reference"] == pytest.approx(p50(ref) / p50(ort), rel=1e-9)
    assert ratios["vs_torch_forward"] == pytest.approx(p50(floor) / p50(ort), rel=1e-9)
    cost = engine_run["cost"][BUCKET]
    efficiency = (cost["interactive"]["gflop"] / p50(ort)) / (cost["forward"]["gflop"] / p50(twin))
    assert ratios["backward_efficiency"] == pytest.approx(efficiency, rel=1e-9)
    listed = {(r["case"], r["ratio"]) for r in engine_run["ratios"]}
    assert (ort["id"], "vs_reference") in listed
    checked = {t["ratio"]: t for t in engine_run["targets"] if t["case"] == ort["id"]}
    assert set(checked) == {"vs_reference", "vs_torch_forward", "backward_efficiency"}
    assert checked["vs_reference"]["met"] == (ratios["vs_reference"] >= 1.8)


def test_profile_and_outputs(engine_run: dict[str, Any]) -> None:
    (profile, forward_profile) = engine_run["profiles"]
    assert profile["status"] == "ok" and profile["runs"] == 2
    assert sum(r["share"] for r in profile["by_op_type"]) == pytest.approx(1.0)
    assert {"Conv", "MaxPool"} & {r["name"] for r in profile["by_op_type"]}
    assert forward_profile["variant"] == "forward"
    for png in engine_run["plots"]:
        assert Path(png).read_bytes()[:8] == PNG_MAGIC
    results = (Path(engine_run["plots"][0]).parent / "results.md").read_text()
    assert "| engine | ort | 256x256 | 1 | fp32 |" in results
    assert "| engine | tensorrt | 256x256 | 1 | fp32 | skipped: " in results
    assert "ONNX Runtime profile" in results and "Targets" in results


def test_e2e_mode(e2e_run: dict[str, Any]) -> None:
    check_schema(e2e_run, reps=2)
    assert [(c["target"], c["status"]) for c in e2e_run["cases"]] == [
        ("ort", "ok"),
        ("reference", "ok"),
    ]
    ort = find(e2e_run, "ort")
    assert ort["mode"] == "e2e" and ort["batch"] == 2 and len(ort["files"]) == 2
    assert all(Path(f).is_file() for f in ort["files"])
    assert "plots" not in e2e_run


def test_compare(engine_run: dict[str, Any], e2e_run: dict[str, Any], tmp_path: Path,
                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(engine_run))
    b.write_text(json.dumps(e2e_run))
    assert cli_main(["bench", "--compare", str(a), str(a)]) == 0
    same = capsys.readouterr().out
    assert "| engine | ort | 256x256 | 1 | fp32 |" in same and "| 1.00x |" in same
    assert bench_main(["--compare", str(a), str(b)]) == 0
    assert "no case in both runs" in capsys.readouterr().out


def test_bad_settings_are_named(narrow_engine: Path, tmp_path: Path) -> None:
    base = ["--engine", str(narrow_engine), "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="--backends 'bogus'"):
        bench_main([*base, "--backends", "bogus"])
    with pytest.raises(ValueError, match="--peers 'gradcam'"):
        bench_main([*base, "--peers", "gradcam"])
    with pytest.raises(EngineError, match="interactive export"):
        bench_main([*base, "--buckets", "512x512"])


def test_cli_parser_imports_no_torch() -> None:
    code = (
        "import sys; from interactive.runtime.cli import build_parser; "
        "a = build_parser().parse_args(['bench', '--engine', 'E', '--batch', '1,8']); "
        "assert a.bench_args == ['--engine', 'E', '--batch', '1,8'], a; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cost_model_reproduces_algorithm_md() -> None:
    full = cost_per_image(FeatureSpec(), (512, 512)).as_dict()
    assert full["forward_gmac"] == pytest.approx(92, abs=0.5)
    assert full["backward_gmac"] == pytest.approx(77, abs=0.5)
    assert full["gflop"] == pytest.approx(338, abs=1.5)
    orig = cost_per_image(forward_spec(FeatureSpec()), (512, 512))
    assert orig.backward_mac == 0 and orig.forward_mac < 92e9  # stops at fc-6
    vgg19 = cost_per_image(FeatureSpec(arch="vgg19"), (512, 512)).as_dict()
    assert vgg19["gflop"] / full["gflop"] == pytest.approx(1.25, abs=0.03)
    other = cost_per_image(FeatureSpec(), (576, 448)).as_dict()
    assert other["gflop"] / full["gflop"] == pytest.approx(576 * 448 / 512**2, rel=0.02)


@pytest.mark.parametrize("peer", PEERS)
def test_peers_match_the_reference(peer: str, narrow_state_dict: dict[str, torch.Tensor]) -> None:
    spec = FeatureSpec(width_div=NARROW)
    images = np.random.default_rng(7).integers(0, 256, (2, 224, 288, 3), dtype=np.uint8)
    want_spec = forward_spec(spec) if peer == "torch-forward" else spec
    want = reference_features(want_spec, narrow_state_dict, torch.from_numpy(images))
    got = make_peer(peer, spec, narrow_state_dict, "cpu", "fp32")(images)
    assert set(got) == set(spec.layers)
    assert_close(got, want)


def test_profile_aggregation_drops_the_warm_up() -> None:
    trace = [
        {"name": "model_run", "cat": "Session", "ts": 0, "dur": 100},
        {"name": "a_kernel_time", "cat": "Node", "ts": 1, "dur": 90, "args": {"op_name": "Conv"}},
        {"name": "model_run", "cat": "Session", "ts": 200, "dur": 40},
        {"name": "a_kernel_time", "cat": "Node", "ts": 201, "dur": 30, "args": {"op_name": "Conv"}},
        {"name": "b_kernel_time", "cat": "Node", "ts": 231, "dur": 10, "args": {"op_name": "Mul"}},
    ]
    result = aggregate_trace(trace, skip_runs=1)
    assert result["runs"] == 1 and result["run_ms"] == pytest.approx(0.04)
    assert [(r["name"], r["share"]) for r in result["by_op_type"]] == [
        ("Conv", 0.75),
        ("Mul", 0.25),
    ]
    assert result["by_node"][0] == {"name": "a", "ms_per_run": 0.03, "share": 0.75, "op": "Conv"}
