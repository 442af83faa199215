"""One conformance suite for every backend (Polygraphy-style): the same images through the
backend and through the autograd reference, every output of every bucket of the narrow engine
judged by `conformance_report` against the tolerance of the backend's precision.

A backend that cannot run here is skipped with the registry's reason (`pytest -ra` lists them),
so the summary says which backends ran and which did not, and why.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from interactive_features.export.conformance import engine_reference, reference_outputs
from interactive_features.runtime.backends import backend_status, open_backend
from interactive_features.runtime.conformance import HEATMAP_TOLERANCE, conformance_report
from interactive_features.runtime.images import load_image, resize_to
from interactive_features.runtime.manifest import EngineManifest, is_heatmap

from conftest import photos

gpu = pytest.mark.gpu
tensorrt = pytest.mark.tensorrt
# Measured on the CPU: bf16's 8-bit mantissa puts conv-4-3's features of one image at 2.1e-2 on
# the narrow network (2.0e-2 on full-width VGG-16), just over export/ALGORITHM.md's 2e-2 (fp16: at
# most 7.9e-3). strict: the day it conforms, this mark must go.
BF16_FEATURES = "bf16 features beyond 2e-2 (measured 2.1e-2 on conv-4-3 of the narrow network)"
CPU = {"device": "cpu"}
CUDA = {"device": "cuda"}

# (backend, options, precision the tolerances follow)
CASES = [
    pytest.param("ort", {"providers": ["CPUExecutionProvider"]}, "fp32", id="ort-cpu"),
    pytest.param("torch", {**CPU, "compile": False}, "fp32", id="torch-cpu-fp32"),
    pytest.param(  # CUDA's default layout, checked on the CPU
        "torch", {**CPU, "channels_last": True}, "fp32", id="torch-cpu-fp32-channels-last"
    ),
    pytest.param(
        "torch",
        {**CPU, "compile": True},
        "fp32",
        id="torch-cpu-fp32-compiled",
        marks=pytest.mark.slow,  # ~40 s of torch.compile per bucket on 2 cores
    ),
    pytest.param(
        "torch",
        {**CPU, "precision": "bf16"},
        "bf16",
        id="torch-cpu-bf16",
        marks=pytest.mark.xfail(reason=BF16_FEATURES, strict=True),
    ),
    pytest.param("torch", {**CPU, "precision": "fp16"}, "fp16", id="torch-cpu-fp16"),
    pytest.param("torch", {**CUDA, "precision": "fp32"}, "fp32", id="torch-cuda-fp32", marks=gpu),
    pytest.param(
        "torch",
        {**CUDA, "precision": "bf16"},
        "bf16",
        id="torch-cuda-bf16",
        marks=[gpu, pytest.mark.xfail(reason=BF16_FEATURES, strict=False)],
    ),
    pytest.param("torch", {**CUDA, "precision": "fp16"}, "fp16", id="torch-cuda-fp16", marks=gpu),
    pytest.param(
        "torch",
        {**CUDA, "precision": "fp16", "compile": False},
        "fp16",
        id="torch-cuda-fp16-eager",
        marks=gpu,
    ),
    pytest.param("ort-cuda", {}, "fp32", id="ort-cuda", marks=gpu),
    pytest.param("ort-tensorrt", {}, "fp32", id="ort-tensorrt", marks=[gpu, tensorrt]),
    pytest.param(
        "tensorrt", {"precision": "fp32"}, "fp32", id="tensorrt-fp32", marks=[gpu, tensorrt]
    ),
    pytest.param(
        "tensorrt", {"precision": "fp16"}, "fp16", id="tensorrt-fp16", marks=[gpu, tensorrt]
    ),
]


def skip_reason(name: str, options: dict[str, Any], manifest: EngineManifest) -> str | None:
    """Why this case cannot run here: the registry's reason, or the torch backend's device."""
    reason = backend_status(name, manifest)
    if reason is None and name == "torch" and "device" in options:
        from interactive_features.export.torch_backend import device_unavailable_reason

        reason = device_unavailable_reason(options["device"])
    return reason


def conformance_images(bucket: tuple[int, int], seed: int) -> np.ndarray:
    """Two fresh random images and one real photo, resized to the bucket: uint8 [3, H, W, 3]."""
    width, height = bucket
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    photo = resize_to(load_image(photos()[seed % len(photos())]), bucket)
    return np.concatenate([noise, photo[None]])


@pytest.mark.parametrize(("name", "options", "precision"), CASES)
def test_backend_conforms_to_reference(
    narrow_engine: Path,
    request: pytest.FixtureRequest,
    name: str,
    options: dict[str, Any],
    precision: str,
) -> None:
    manifest = EngineManifest.load(narrow_engine)
    reason = skip_reason(name, options, manifest)
    if reason is not None:
        pytest.skip(f"backend {name} {options}: {reason}")
    spec, state_dict = engine_reference(manifest)
    backend = open_backend(manifest, name, **options)
    heatmap_failures = []
    try:
        for bucket in manifest.buckets:
            seed = zlib.crc32(f"{request.node.name}{bucket}".encode())
            images = conformance_images(bucket, seed)
            got = backend.run(bucket, images)
            want = reference_outputs(spec, state_dict, images)
            report = conformance_report(got, want, precision, f"{request.node.name} {bucket}")
            assert list(got) == manifest.outputs
            failed = report.failures
            assert precision != "fp32" or not failed, report.table()
            assert all(is_heatmap(c.name) for c in failed), report.table()
            heatmap_failures += [f"{bucket} {c.name} {c.rel_err:.1e}" for c in failed]
    finally:
        backend.close()
    if heatmap_failures:
        # Reduced precision, features conform: the heatmaps do not. Measured (CPU fp16): the
        # half-precision forward pass flips ReLU masks at near-zero pre-activations, which shows
        # in full at those positions (3e-2 to 6e-2; with an fp32 forward and an fp16 backward,
        # 3e-4). Features average the flips out, and so do wide layers: full-width VGG-16 in fp16
        # conforms, heatmaps included (at most 1.5e-2). Reported, not hidden: see the reason.
        worst = sorted(heatmap_failures, key=lambda f: float(f.rsplit(" ", 1)[1]))[-1]
        pytest.xfail(
            f"{name} {precision}: features conform; {len(heatmap_failures)} heatmap outputs "
            f"beyond {HEATMAP_TOLERANCE:.0e} (worst {worst})"
        )


def test_report_fails_beyond_tolerance() -> None:
    """The verdict can fail: a 1% error passes fp16 but not fp32; a sign flip fails cosine."""
    rng = np.random.default_rng(0)
    want = {"pool-1": rng.random((2, 8)).astype(np.float32)}
    noisy = {"pool-1": (want["pool-1"] * 1.01).astype(np.float32)}
    assert conformance_report(noisy, want, "fp16").ok
    fp32 = conformance_report(noisy, want, "fp32")
    assert not fp32.ok and fp32.failures[0].name == "pool-1"
    assert "FAIL" in fp32.table()
    flipped = {"pool-1": want["pool-1"].copy()}
    flipped["pool-1"][1, :4] *= -1
    assert conformance_report(flipped, want, "bf16").failures[0].cosine < 0.999
    with pytest.raises(AssertionError, match="float64"):
        conformance_report({"pool-1": want["pool-1"].astype(np.float64)}, want)
