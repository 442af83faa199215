"""`interactive bench`: smoke runs of both modes on the narrow engine (one bucket, two reps).

They check the run's JSON (keys, types, sample counts, ordered percentiles), that every ratio is
the one its own run's samples give, that every case's outputs are judged against the run's own
reference case, that a backend absent here is reported skipped with its reason, that a failed
case fails the run, --compare, the plots, the generated e2e photos, and that the cost model and
the torch peers are right. Timings themselves are never asserted.
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
from interactive_features.bench import photos
from interactive_features.bench.cost import cost_per_image
from interactive_features.bench.harness import exit_status
from interactive_features.bench.harness import main as bench_main
from interactive_features.bench.judge import add_conformance
from interactive_features.bench.peers import PEERS, forward_spec, make_peer
from interactive_features.bench.profile import aggregate_trace
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import FeatureSpec
from interactive_features.runtime.cli import main as cli_main
from interactive_features.runtime.manifest import EngineError, heatmap_name

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
    assert rates["torch-fp32"] > 0 and rates["numpy-fp32"] > 0 and rates["onnxruntime-fp32"] > 0
    assert "torch-bf16" not in rates  # only the precisions benchmarked (fp32) are probed
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


def test_conformance_is_judged_against_the_runs_reference(
    engine_run: dict[str, Any], e2e_run: dict[str, Any]
) -> None:
    ref, floor = find(engine_run, "reference"), find(engine_run, "torch-forward", "forward")
    assert ref["conformance"] == {"ok": None, "verdict": "reference"}
    assert floor["conformance"]["verdict"] == "reference"
    ort, twin = find(engine_run, "ort"), find(engine_run, "ort", "forward")
    assert ort["conformance"]["ok"] is True and ort["conformance"]["against"] == ref["id"]
    assert twin["conformance"]["ok"] is True and twin["conformance"]["against"] == floor["id"]
    names = set(ort["conformance"]["errors"])
    assert {heatmap_name("pool-3"), "pool-3"} <= names  # every output, heatmaps included
    assert 0 <= ort["conformance"]["worst_feature_error"] < 1e-3
    assert "conformance" not in find(engine_run, "tensorrt")  # skipped: nothing to judge
    e2e_ort, e2e_ref = find(e2e_run, "ort"), find(e2e_run, "reference")
    assert e2e_ort["conformance"]["ok"] is True
    assert e2e_ort["conformance"]["against"] == e2e_ref["id"]
    results = (Path(engine_run["plots"][0]).parent / "results.md").read_text()
    assert "| conformance |" in results and "| ok " in results and "| reference |" in results


def fake_case(tmp_path: Path, i: int, kind: str, name: str, outputs: dict[str, Any]) -> dict:
    path = tmp_path / f"case-{i}.npz"
    np.savez(path, **outputs)
    key = "peer" if kind == "peer" else "backend"
    return {"id": i, "kind": kind, key: name, "target": name, "variant": "interactive",
            "mode": "engine", "bucket": [64, 64], "batch": 2, "device": "cpu",
            "precision": "fp32", "status": "ok", "outputs_file": str(path)}  # fmt: skip


def test_conformance_verdicts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    want = {"pool-3": rng.random((2, 8), dtype=np.float32)}
    want[heatmap_name("pool-3")] = rng.random((2, 4, 4), dtype=np.float32)
    off = {k: v * 1.1 for k, v in want.items()}
    features = {"pool-3": want["pool-3"]}
    run = {"cases": [
        fake_case(tmp_path, 0, "backend", "ort", dict(want)),
        fake_case(tmp_path, 1, "backend", "torch", off),
        fake_case(tmp_path, 2, "peer", "reference", want),
        fake_case(tmp_path, 3, "peer", "naive", features),  # no heatmaps: judged on features
        fake_case(tmp_path, 4, "backend", "ort", features),  # a backend lacking an output
    ]}  # fmt: skip
    run["cases"][4]["bucket"] = [32, 32]  # ... in a group without a reference
    add_conformance(run)
    verdicts = [c["conformance"] for c in run["cases"]]
    assert verdicts[0]["ok"] is True and verdicts[0]["worst_error"] == 0.0
    assert verdicts[1]["ok"] is False and "beyond tolerance" in verdicts[1]["summary"]
    assert verdicts[2]["verdict"] == "reference"
    assert verdicts[3]["ok"] is True and set(verdicts[3]["errors"]) == {"pool-3"}
    assert verdicts[4]["ok"] is None and verdicts[4]["verdict"] == "not judged"
    run["matmul"] = {"kind": "matmul", "status": "ok"}
    assert exit_status(run) == 1  # the torch case is beyond tolerance
    run["cases"][1]["conformance"]["ok"] = True
    assert exit_status(run) == 0
    run["cases"][3]["conformance"]["ok"] = False  # a peer's verdict does not gate the run
    assert exit_status(run) == 0
    run["targets"] = [{"case": 1, "target": "at least 1.8x", "ratio": "vs_reference",
                       "value": 1.2, "limit": 1.8, "met": False}]  # fmt: skip
    assert exit_status(run) == 0  # a missed speed target is reported, not a failure ...
    assert exit_status(run, fail_on_target=True) == 1  # ... unless --fail-on-target
    run["cases"][4]["bucket"] = [64, 64]  # now judged: the backend lacks the heatmap output
    add_conformance(run)
    assert run["cases"][4]["conformance"]["ok"] is False
    assert "missing" in run["cases"][4]["conformance"]["summary"]


def test_a_failed_case_fails_the_run(narrow_engine: Path, tmp_path: Path) -> None:
    argv = ["--engine", str(narrow_engine), "--buckets", BUCKET, "--out", str(tmp_path)]
    argv += ["--backends", "ort", "--peers", "reference", "--no-plots", "--timeout", "0.01"]
    assert bench_main(argv) == 1
    (json_file,) = tmp_path.glob("bench-*.json")
    run = json.loads(json_file.read_text())
    assert {c["status"] for c in run["cases"]} == {"failed"}
    assert all("timed out" in c["reason"] for c in run["cases"])


def test_generated_photos(tmp_path: Path) -> None:
    a, b = photos.photo(96, 64, seed=3), photos.photo(96, 64, seed=3)
    pixels = np.asarray(a)
    assert a.size == (96, 64) and np.array_equal(pixels, np.asarray(b))
    assert pixels.std() > 20  # textured, not flat
    assert not np.array_equal(pixels, np.asarray(photos.photo(96, 64, seed=4)))
    assert photos.main([str(tmp_path), "--images", "4"]) == 0
    written = sorted(tmp_path.glob("photo*.jpg"))
    assert len(written) == 4
    files = photos.bucket_inputs(tmp_path / "e2e", [[64, 48]], 2, seed=0)
    assert list(files) == ["64x48"] and len(files["64x48"]) == 2


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
        "import sys; from interactive_features.runtime.cli import build_parser; "
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


def test_peers_with_heatmaps(narrow_state_dict: dict[str, torch.Tensor]) -> None:
    """The reference outputs what a heatmaps engine outputs; the others their features only."""
    spec = FeatureSpec(width_div=NARROW, heatmaps=True)
    images = np.random.default_rng(7).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    for peer in PEERS:
        got = make_peer(peer, spec, narrow_state_dict, "cpu", "fp32")(images)
        heatmaps = set(spec.output_names()) - set(spec.layers)
        assert set(got) == (set(spec.output_names()) if peer == "reference" else set(spec.layers))
        assert heatmaps and all(got[t].dtype == np.float32 for t in got)


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


def test_matmul_probes_only_what_runs_natively() -> None:
    from interactive_features.bench.machine import PROBE_SIZES, probe_plan

    avx2 = ["avx2"]
    assert probe_plan("cpu", ["fp32", "bf16"], avx2)[0] == ["fp32"]
    assert "avx512_bf16" in probe_plan("cpu", ["fp32", "bf16"], avx2)[1]["bf16"]
    assert probe_plan("cpu", ["bf16"], ["avx2", "avx512_bf16"]) == (["bf16"], {})
    assert probe_plan("cpu", ["bf16"], ["amx_tile", "amx_bf16"]) == (["bf16"], {})
    assert probe_plan("cpu", ["fp32", "fp32"], avx2) == (["fp32"], {})
    assert probe_plan("cuda", ["fp32", "fp16", "bf16"], [])[0] == ["fp32", "fp16", "bf16"]
    assert PROBE_SIZES["cuda"] == 8192  # 2048^3 is launch-bound on a GPU


def test_reference_peer_runs_with_tf32_off_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peers' precision scope enters fp32_math on CUDA (as the torch backend does)."""
    import contextlib

    from interactive_features.bench import peers
    from interactive_features.export import torch_backend

    entered = []

    @contextlib.contextmanager
    def spy():  # type: ignore[no-untyped-def]
        entered.append(True)
        yield {}

    monkeypatch.setattr(torch_backend, "fp32_math", spy)
    # torch.device("cuda") may refuse on a CPU build
    with contextlib.suppress(RuntimeError), peers.precision_scope("cuda", "fp32"):
        pass
    with peers.precision_scope("cpu", "fp32"):
        pass
    assert entered == [True]


def test_latency_bars_need_samples_that_differ(tmp_path: Path) -> None:
    """p90 from 11 samples, p99 from 101 (below that they interpolate the two largest), max
    from 2; the plots of a run mixing such cases are written."""
    from interactive_features.bench.report import plots, shown_percentiles
    from interactive_features.bench.stats import percentiles

    assert shown_percentiles(1) == ["p50"]
    assert shown_percentiles(3) == shown_percentiles(10) == ["p50", "max"]
    assert shown_percentiles(11) == shown_percentiles(100) == ["p50", "p90", "max"]
    assert shown_percentiles(101) == ["p50", "p90", "p99", "max"]
    for n in (10, 100):  # just below the rule: the percentile lies between the top two samples
        samples = sorted(np.random.default_rng(n).random(n))
        q = 90 if n == 10 else 99
        assert samples[-2] <= percentiles(samples)[f"p{q}"] <= samples[-1]
    cases = []
    for k, n in enumerate((1, 3, 120)):
        samples = list(np.random.default_rng(k).random(n) + 1.0)
        stats = {"image_s": percentiles(samples), "images_per_s": 1.0 / np.mean(samples)}
        cases.append({"status": "ok", "kind": "backend", "target": "ort", "variant": "full",
                      "mode": "engine", "bucket": [256, 256 + 32 * k], "batch": 1 + k,
                      "precision": "fp32", "samples_s": samples, "stats": stats})  # fmt: skip
    for png in plots({"cases": cases}, tmp_path, "synthetic"):
        assert png.read_bytes()[:8] == PNG_MAGIC
