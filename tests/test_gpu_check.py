"""The GPU check's dry run on the CPU (bench/gpu_check.py --dry-run): the same steps with tiny
sizes, the narrow engine and an emulated CUDA runtime, so CI proves the plumbing and that the
check fails when it should: a failing case, a step that raises, a required backend that did not
run. (What only a GPU can settle is listed in the README's GPU section.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from interactive_features.bench.gpu_engine import restore_weights, strip, weights_ok
from interactive_features.runtime.manifest import EngineError, EngineManifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(tmp_path: Path, engine: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "results"
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out",
               str(out), "--engine", str(engine), "--precisions", "fp32", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    (json_file,) = out.glob("gpu-check-dry-*.json")
    (md_file,) = out.glob("gpu-check-dry-*.md")
    assert md_file.read_text().startswith("# GPU check")
    return done.returncode, json.loads(json_file.read_text()), done.stderr


@pytest.fixture
def stripped(narrow_engine: Path, tmp_path: Path) -> Path:
    """The narrow engine without weights.bin (what travels to a GPU host)."""
    return strip(narrow_engine, tmp_path / "engine")


def steps(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in results["steps"]}


def test_weights_are_rebuilt_and_checked(stripped: Path) -> None:
    assert not (stripped / "weights.bin").exists()
    done = restore_weights(stripped)
    assert weights_ok(EngineManifest.load(stripped)) and done["tensors"] > 20
    manifest = EngineManifest.load(stripped)
    manifest.data["weights"]["source"] = "random:1"  # other weights: the sha256 says so
    write_manifest(stripped, manifest.data)
    with pytest.raises(EngineError, match="differs from the export"):
        restore_weights(stripped)


def test_dry_run_passes_and_says_what_ran(stripped: Path, tmp_path: Path) -> None:
    code, results, stderr = gpu_check(tmp_path, stripped, "--require", "torch-cpu,host-plumbing")
    by_name = steps(results)
    assert code == 0, stderr
    assert {n: s["status"] for n, s in by_name.items()} == {
        "machine": "passed", "engine": "passed", "torch": "passed", "plumbing": "passed",
        "tensorrt": "skipped", "benchmark": "passed",
    }  # fmt: skip
    assert (
        by_name["engine"]["details"]["restored"]["sha256"]
        == results["steps"][1]["details"]["weights_sha256"]
    )
    torch_cases = by_name["torch"]["cases"]
    assert {tuple(c["bucket"]) for c in torch_cases} == {(256, 256), (288, 224), (224, 288)}
    assert all(c["repeat_ok"] for c in torch_cases if c["call"] == 2)  # the A-B-A repeat
    assert by_name["plumbing"]["ran"] == ["host-plumbing"]
    assert "device-to-device copy" in by_name["plumbing"]["details"]["note"]
    bench = [c for c in by_name["benchmark"]["cases"] if c["status"] == "passed"]
    assert bench and all(c["images_per_s"] > 0 and c["tflops"] > 0 for c in bench)
    assert results["problems"] == []


def test_a_failing_case_or_step_fails_the_check(stripped: Path, tmp_path: Path) -> None:
    """An absurdly tight tolerance fails the torch step's cases (run in this process: the step
    is a function); a step that raises fails the whole check (its exit status)."""
    import time

    from interactive_features.bench.gpu_steps import step_torch

    restore_weights(stripped)
    config = {"device": "cpu", "engine": str(stripped), "precisions": ["fp32"],
              "batches": [1, 2, 1], "compile_precisions": [], "compile_s": 60,
              "deadline": time.time() + 120}  # fmt: skip
    assert step_torch(config)["status"] == "passed"
    tight = step_torch(config | {"tolerance_scale": 1e-12})
    assert tight["status"] == "failed" and tight["ran"] == ["torch-cpu"]
    assert {c["status"] for c in tight["cases"]} == {"failed"}
    assert step_torch(config | {"deadline": time.time()})["status"] == "skipped"  # no budget
    code, results, stderr = gpu_check(tmp_path, stripped, "--steps", "machine",
                                      "--fail-step", "machine")  # fmt: skip
    assert code == 1 and "injected failure" in steps(results)["machine"]["reason"], stderr


def test_a_required_backend_that_did_not_run_fails_the_check(
    stripped: Path, tmp_path: Path
) -> None:
    """Without --dry-run's CPU, the torch step wants CUDA: skipped here (never "passed"), and
    --require torch-cuda turns that skip into a failure."""
    restore_weights(stripped)
    out = tmp_path / "results"
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out),
               "--engine", str(stripped), "--steps", "torch,plumbing"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    (json_file,) = out.glob("gpu-check-*.json")
    by_name = steps(json.loads(json_file.read_text()))
    assert done.returncode == 0, done.stderr  # skips alone are not failures ...
    assert by_name["torch"]["status"] == "skipped" and by_name["torch"]["ran"] == []
    assert by_name["plumbing"]["status"] == "skipped"
    done = subprocess.run([*command, "--require", "torch-cuda"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1 and "--require torch-cuda: it did not run" in done.stderr
