"""ONNX Runtime through IO binding (ort-cuda, ort-tensorrt): the binding path runs for real on the
CPU provider against the autograd reference; the GPU providers are checked where they exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec
from interactive_features.runtime import Extractor
from interactive_features.runtime.backends import backend_status, open_backend
from interactive_features.runtime.backends.ort import (
    OrtBoundBackend,
    OrtCudaBackend,
    OrtTensorrtBackend,
)
from interactive_features.runtime.manifest import EngineError, EngineManifest

from conftest import NARROW, assert_close

SPEC = FeatureSpec("vgg16", "last", 2, PAPER_LAYERS, NARROW, heatmaps=True)


def _random_batch(rng: np.random.Generator, bucket: tuple[int, int], n: int) -> np.ndarray:
    width, height = bucket
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_io_binding_matches_reference_on_cpu(narrow_engine: Path, narrow_state_dict) -> None:
    manifest = EngineManifest.load(narrow_engine)
    backend = OrtBoundBackend(manifest, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for bucket, n in [((256, 256), 2), ((288, 224), 1), ((224, 288), 3)]:
        images = _random_batch(rng, bucket, n)
        got = backend.run(bucket, images)
        assert list(got) == manifest.outputs
        assert all(v.dtype == np.float32 and v.shape[0] == n for v in got.values())
        assert_close(got, reference_features(SPEC, narrow_state_dict, torch.from_numpy(images)))


def test_io_binding_fills_fresh_arrays_each_run(narrow_engine: Path) -> None:
    """Outputs are bound to new arrays per run: a later batch never overwrites earlier results."""
    backend = OrtBoundBackend(
        EngineManifest.load(narrow_engine), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(8)
    first_images = _random_batch(rng, (256, 256), 1)
    first = backend.run((256, 256), first_images)
    kept = {k: v.copy() for k, v in first.items()}
    backend.run((256, 256), _random_batch(rng, (256, 256), 1))
    assert all(np.array_equal(first[k], kept[k]) for k in kept)
    again = backend.run((256, 256), first_images)
    assert all(np.array_equal(again[k], kept[k]) for k in kept)


def test_io_binding_rejects_bad_batches(narrow_engine: Path) -> None:
    backend = OrtBoundBackend(
        EngineManifest.load(narrow_engine), providers=["CPUExecutionProvider"]
    )
    with pytest.raises(ValueError, match="uint8"):
        backend.run((256, 256), np.zeros((1, 256, 256, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, 224, 288, 3\]"):
        backend.run((288, 224), np.zeros((1, 256, 256, 3), dtype=np.uint8))


def test_gpu_backends_say_what_is_missing_here(narrow_engine: Path) -> None:
    manifest = EngineManifest.load(narrow_engine)
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    for name, provider in [("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "Tensorrt")]:
        reason = backend_status(name, manifest)
        if not any(p.startswith(provider) for p in providers):
            assert reason is not None and "onnxruntime-gpu" in reason
            with pytest.raises(EngineError, match="cannot run here"):
                open_backend(manifest, name)


def test_tensorrt_provider_profile_names_the_bucket(narrow_engine: Path, tmp_path: Path) -> None:
    backend = OrtTensorrtBackend(
        EngineManifest.load(narrow_engine), precision="fp16", max_batch=4, cache_dir=tmp_path
    )
    options = backend.provider_options((288, 224))
    assert options["trt_profile_min_shapes"] == "images:1x224x288x3"
    assert options["trt_profile_max_shapes"] == "images:4x224x288x3"
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_path"] == str(tmp_path)


def test_reduced_precision_is_refused_where_unsupported(narrow_engine: Path) -> None:
    manifest = EngineManifest.load(narrow_engine)
    with pytest.raises(EngineError, match="float32 graphs only"):
        OrtCudaBackend(manifest, precision="bf16")
    with pytest.raises(EngineError, match="fp32 or fp16"):
        OrtTensorrtBackend(manifest, precision="bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-cuda", "ort-tensorrt"])
def test_gpu_provider_matches_reference(name: str, narrow_engine: Path, narrow_state_dict) -> None:
    manifest = EngineManifest.load(narrow_engine)
    reason = backend_status(name, manifest)
    if reason is not None:
        pytest.skip(reason)
    rng = np.random.default_rng(9)
    with Extractor.open(narrow_engine, backend=name) as ex:
        images = _random_batch(rng, (256, 256), 3)
        got = ex.backend.run((256, 256), images)
    assert_close(got, reference_features(SPEC, narrow_state_dict, torch.from_numpy(images)))


def test_fp32_promises_no_tf32(
    narrow_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ort-cuda: the provider's use_tf32 off. ort-tensorrt: its provider has no TF32 option, so
    fp32 sessions set NVIDIA_TF32_OVERRIDE=0 before TensorRT builds (a caller's value is kept);
    fp16 leaves it alone. The session itself is stubbed: no GPU here."""
    import os

    from interactive_features.runtime.backends.ort import TF32_OVERRIDE, OrtBackend

    manifest = EngineManifest.load(narrow_engine)
    cuda = OrtCudaBackend(manifest)
    assert cuda.providers[0][1]["use_tf32"] == "0"
    monkeypatch.setattr(OrtBackend, "session", lambda self, bucket: "session")
    for precision, preset, expected in (("fp16", None, None), ("fp32", None, "0"),
                                        ("fp32", "1", "1")):  # fmt: skip
        if preset is None:
            monkeypatch.delenv(TF32_OVERRIDE, raising=False)
        else:
            monkeypatch.setenv(TF32_OVERRIDE, preset)
        backend = OrtTensorrtBackend(manifest, precision=precision, cache_dir=tmp_path)
        assert backend.session((288, 224)) == "session"
        assert os.environ.get(TF32_OVERRIDE) == expected, (precision, preset)
        options = backend.provider_options((288, 224))
        assert options["trt_fp16_enable"] is (precision == "fp16")
        assert not any("tf32" in key for key in options)  # ORT documents no such key
