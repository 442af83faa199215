"""The torch backend's own contract: options, errors, where its weights come from, one module for
every bucket, compiled graphs per bucket. Conformance with the reference: test_conformance.py."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from interactive_features.export.torch_backend import (
    TorchBackend,
    device_unavailable_reason,
    engine_tensors,
    inline_initializers,
)
from interactive_features.runtime import Extractor
from interactive_features.runtime.backends import OrtBackend, backend_status, open_backend
from interactive_features.runtime.conformance import conformance_report
from interactive_features.runtime.manifest import (
    EngineError,
    EngineManifest,
    MissingBucketError,
    write_manifest,
)
from onnx import numpy_helper

from conftest import photos

BUCKET = (288, 224)


def images(n: int, bucket: tuple[int, int] = BUCKET, seed: int = 0) -> np.ndarray:
    width, height = bucket
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def manifest(narrow_engine: Path) -> EngineManifest:
    return EngineManifest.load(narrow_engine)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "device must be one of"),
        ({"device": "cuda:x"}, "device must be one of"),
        ({"precision": "fp8"}, r"precision must be one of \['fp32', 'fp16', 'bf16'\]"),
        ({"compile": "yes"}, "compile must be True, False or 'auto'"),
        ({"compile_mode": "fast"}, "compile_mode must be one of"),
        ({"channels_last": "on"}, "channels_last must be True, False or None"),
        ({"seed_scale": 0.0}, "seed_scale must be positive"),
    ],
)
def test_bad_options_name_the_option(
    manifest: EngineManifest, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TorchBackend(manifest, **options)


def test_unknown_option_is_named(narrow_engine: Path) -> None:
    with pytest.raises(TypeError, match="threads"):
        Extractor.open(narrow_engine, backend="torch", threads=2)


def test_cuda_without_a_gpu_says_why(manifest: EngineManifest) -> None:
    reason = device_unavailable_reason("cuda")
    if reason is None:
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(EngineError, match="device='cuda'.*(CPU-only|no CUDA GPU)"):
        TorchBackend(manifest, device="cuda")
    auto = TorchBackend(manifest)  # auto falls back to the CPU, eager, NCHW
    assert (auto.device.type, auto.compile, auto.channels_last) == ("cpu", False, False)


def test_outputs_follow_the_ort_contract(manifest: EngineManifest) -> None:
    """Same names, order, shapes and dtypes as OrtBackend, and the same values (fp32)."""
    batch = images(3)
    want = OrtBackend(manifest, providers=["CPUExecutionProvider"]).run(BUCKET, batch)
    got = open_backend(manifest, "torch", device="cpu").run(BUCKET, batch)
    assert list(got) == list(want) == manifest.outputs
    for name in want:
        assert (got[name].shape, got[name].dtype) == (want[name].shape, want[name].dtype), name
        assert got[name].flags.c_contiguous
    assert conformance_report(got, want, "fp32").ok


def test_bad_images_and_buckets_are_named(manifest: EngineManifest) -> None:
    backend = TorchBackend(manifest, device="cpu")
    with pytest.raises(ValueError, match="uint8 numpy array, got an array of float32"):
        backend.run(BUCKET, images(1).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 224, 288, 3\].*got shape \(1, 288, 224, 3\)"):
        backend.run(BUCKET, images(1, (224, 288)))
    with pytest.raises(MissingBucketError, match="bucket 320x224 has no exported graph"):
        backend.run((320, 224), images(1, (320, 224)))


def test_read_only_and_strided_images_are_accepted(manifest: EngineManifest) -> None:
    backend = TorchBackend(manifest, device="cpu")
    batch = images(2, seed=5)
    want = backend.run(BUCKET, np.ascontiguousarray(batch[:, ::-1]))
    read_only = batch[:, ::-1]  # negative strides, and not writeable
    read_only.flags.writeable = False
    got = backend.run(BUCKET, read_only)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_stays_on_the_input_device(manifest: EngineManifest, precision: str) -> None:
    """No constant is made on the CPU (which would fail on a GPU): run on the meta device."""
    import torch

    module = TorchBackend(manifest, device="cpu", precision=precision).module.to("meta")
    width, height = BUCKET
    with torch.inference_mode():
        outputs = module(torch.zeros((2, height, width, 3), dtype=torch.uint8, device="meta"))
    assert [(o.device.type, o.dtype) for o in outputs] == [("meta", torch.float32)] * len(outputs)


def test_seed_scale_divides_out(manifest: EngineManifest) -> None:
    """gamma is linear in the seed: a scaled fp32 run gives the same outputs."""
    batch = images(2, seed=1)
    plain = TorchBackend(manifest, device="cpu").run(BUCKET, batch)
    scaled = TorchBackend(manifest, device="cpu", seed_scale=256.0).run(BUCKET, batch)
    report = conformance_report(scaled, plain, "fp32")
    assert report.ok and report.max_feature_error < 1e-5, report.table()


def test_inline_initializers_match_onnx(manifest: EngineManifest) -> None:
    """The protobuf reader finds exactly the tensors the onnx package finds inside the file."""
    path = manifest.bucket_path(manifest.buckets[0])
    model = onnx.load(str(path), load_external_data=False)
    want = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL
    }
    got = inline_initializers(path)
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    assert "conv_1_1_bias" in got  # small biases live in the graph, not in weights.bin


def test_weights_come_from_the_engine_directory(manifest: EngineManifest, tmp_path: Path) -> None:
    """Change a tensor in a copy's weights.bin: torch and ORT both see it, nothing else does."""
    copy = tmp_path / "engine"
    shutil.copytree(manifest.directory, copy)
    changed = EngineManifest.load(copy)
    entry = changed.data["weights"]["tensors"]["conv_3_1_weight"]
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(entry["offset"])
        w = np.frombuffer(f.read(entry["length"]), dtype=np.float32)
        f.seek(entry["offset"])
        f.write((w * -1.5).astype(np.float32).tobytes())
    # other weights, recorded as such (the runtime refuses a tensor unlike its manifest sha256)
    entry["sha256"] = hashlib.sha256((w * -1.5).astype(np.float32).tobytes()).hexdigest()
    write_manifest(copy, changed.data)
    changed = EngineManifest.load(copy)
    assert engine_tensors(changed)["conv_3_1_weight"].ravel()[0] == -1.5 * w[0]
    batch = images(2, seed=2)
    original = TorchBackend(manifest, device="cpu").run(BUCKET, batch)
    got = TorchBackend(changed, device="cpu").run(BUCKET, batch)
    want = OrtBackend(changed, providers=["CPUExecutionProvider"]).run(BUCKET, batch)
    assert conformance_report(got, want, "fp32").ok
    assert not conformance_report(got, original, "fp32").ok


def test_missing_tensor_is_an_engine_error(manifest: EngineManifest, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(manifest.directory, copy)
    broken = EngineManifest.load(copy)
    del broken.data["weights"]["tensors"]["fc_7_weight"]
    with pytest.raises(EngineError, match="no tensor 'fc_7_weight' for fc-7"):
        TorchBackend(broken, device="cpu")


def test_one_module_for_every_bucket(manifest: EngineManifest) -> None:
    backend = TorchBackend(manifest, device="cpu")
    weight = backend.module.fc_6_weight
    for bucket in manifest.buckets:
        out = backend.run(bucket, images(1, bucket))
        assert out["fc-6"].shape == (1, manifest.layer_dims["fc-6"])
    assert backend.module.fc_6_weight is weight
    assert backend.compiled_shapes == []  # eager on the CPU by default


@pytest.mark.slow  # one torch.compile of the narrow graph: ~35 s on 2 cores
def test_compiled_graphs_are_cached_per_bucket_and_padded_batch(manifest: EngineManifest) -> None:
    eager = TorchBackend(manifest, device="cpu")
    compiled = TorchBackend(manifest, device="cpu", compile=True)
    three, four = images(3, seed=3), images(4, seed=4)
    report = conformance_report(compiled.run(BUCKET, three), eager.run(BUCKET, three))
    assert report.ok, report.table()
    compiled.run(BUCKET, four)  # pads 3 to 4: the same graph
    assert compiled.compiled_shapes == [(BUCKET, 4)]


def test_extractor_opens_the_torch_backend(narrow_engine: Path) -> None:
    paths = [str(p) for p in photos()]
    with Extractor.open(narrow_engine, backend="torch", device="cpu") as ex:
        assert ex.backend.name == "torch"
        got = ex.extract(paths, batch_size=2)
    with Extractor.open(narrow_engine, backend="ort") as ex:
        want = ex.extract(paths, batch_size=2)
    assert not got.errors and got.buckets == want.buckets
    report = conformance_report(got.layers, want.layers, "fp32")
    assert report.ok, report.table()
    assert got.heatmaps["pool-1"][0].shape == want.heatmaps["pool-1"][0].shape


def test_registry_reports_the_torch_backend(manifest: EngineManifest) -> None:
    unavailable_reason = TorchBackend.unavailable_reason
    assert unavailable_reason() is None and backend_status("torch", manifest) is None
    no_record = EngineManifest(manifest.directory, {**manifest.data})
    del no_record.data["export"]
    assert "no export record" in str(unavailable_reason(no_record))


def test_importing_the_module_imports_no_torch() -> None:
    code = (
        "import sys, interactive_features.export.torch_backend\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compiled_batches_pad_to_a_power_of_two_then_multiples_of_eight() -> None:
    from interactive_features.export.torch_backend import padded_rows

    assert [padded_rows(n) for n in (1, 2, 3, 5, 8, 9, 17, 33, 64)] == [
        1, 2, 4, 8, 8, 16, 24, 40, 64
    ]  # fmt: skip
    assert all(padded_rows(n) - n < 8 for n in range(8, 300))  # at most 7 wasted rows past 8


def test_fp32_math_turns_tf32_off_and_restores_it() -> None:
    """The flags are process-wide: set inside, the caller's values back afterwards (checked on
    the CPU build, whose torch has the same switches)."""
    from interactive_features.export.torch_backend import fp32_math, set_tf32_flags, tf32_flags

    before = tf32_flags()
    set_tf32_flags(dict.fromkeys(before, "tf32" if "precision" in next(iter(before)) else True))
    tf32_on = tf32_flags()
    with fp32_math() as wanted:
        assert tf32_flags() == wanted
        assert set(wanted.values()) <= {"ieee", False}
    assert tf32_flags() == tf32_on
    set_tf32_flags(before)


def test_compiled_graphs_run_under_no_grad(
    manifest: EngineManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile under inference_mode has a crash history: compiled runs use no_grad (a
    stand-in for the compiled graph records the grad mode it was called in)."""
    import torch

    backend = TorchBackend(manifest, device="cpu", compile=True)
    seen = []

    def fake_graph(bucket: tuple[int, int], rows: int):  # type: ignore[no-untyped-def]
        def run(x):  # type: ignore[no-untyped-def]
            seen.append((rows, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return backend.module(x)

        return run

    monkeypatch.setattr(backend, "_compiled_graph", fake_graph)
    backend.run(BUCKET, images(3))
    assert seen == [(4, False, False)]
