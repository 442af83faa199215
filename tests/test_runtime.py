"""The Python API on a narrow engine: bad inputs, order, missing buckets, LRU, no torch."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from interactive.runtime import Extractor
from interactive.runtime.backends import BucketCache
from interactive.runtime.cli import main as cli_main

import imagegen
from conftest import photos

BAD_INPUTS = {
    "missing": (imagegen.missing_file, "no such file"),
    "empty": (imagegen.empty_file, "empty"),
    "truncated": (imagegen.truncated_jpeg, "truncated"),
    "not an image": (imagegen.not_an_image, "not an image"),
    "bomb": (imagegen.bomb_png, "decompression bomb"),
}
EXOTIC_INPUTS = [
    imagegen.grey_jpeg,
    imagegen.rgba_png,
    imagegen.cmyk_jpeg,
    imagegen.grey16_png,
    imagegen.palette_png,
    imagegen.animated_gif,
    imagegen.exif_rotated_jpeg,
]


def test_bad_inputs_are_reported_and_the_rest_processed(
    narrow_engine: Path, tmp_path: Path
) -> None:
    good = [str(p) for p in photos()[:2]]
    bad = {name: str(make(tmp_path)) for name, (make, _) in BAD_INPUTS.items()}
    exotic = [str(make(tmp_path)) for make in EXOTIC_INPUTS]
    inputs = [good[0], *bad.values(), *exotic, good[1], b"", np.zeros((10, 10, 5), np.uint8)]
    with Extractor.open(narrow_engine) as ex:
        feats = ex.extract(inputs, batch_size=4)
    assert set(feats.errors) == {1, 2, 3, 4, 5, len(inputs) - 2, len(inputs) - 1}
    for i, (name, (_, reason)) in enumerate(BAD_INPUTS.items(), start=1):
        assert reason in feats.errors[i].lower(), (name, feats.errors[i])
        assert Path(inputs[i]).name in feats.errors[i]
        assert np.isnan(feats["pool-1"][i]).all()
    ok = feats.ok
    assert ok.sum() == len(inputs) - 7
    for layer in feats:
        assert np.isfinite(feats[layer][ok]).all()


def test_rows_follow_input_order(narrow_engine: Path) -> None:
    paths = [str(p) for p in photos()]
    with Extractor.open(narrow_engine) as ex:
        together = ex.extract(paths[::-1] + paths, batch_size=3)
        alone = [ex.extract([p])["fc-6"][0] for p in paths]
    n = len(paths)
    np.testing.assert_allclose(together["fc-6"][n:], np.stack(alone), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(together["fc-6"][:n], np.stack(alone)[::-1], rtol=1e-5, atol=1e-12)
    assert together.sizes[n] is not None and together.buckets[n] == ex.bucket_for(
        *together.sizes[n]
    )


def test_concat_and_heatmaps(narrow_engine: Path) -> None:
    with Extractor.open(narrow_engine) as ex:
        feats = ex.extract([str(photos()[0])])
    dims = ex.manifest.layer_dims
    both = feats.concat("l2")
    assert both.shape == (1, sum(dims.values()))
    start = 0
    for d in dims.values():
        assert np.linalg.norm(both[0, start : start + d]) == pytest.approx(1.0, rel=1e-5)
        start += d
    assert np.array_equal(feats.concat("none")[0, : dims["pool-1"]], feats["pool-1"][0])
    w, h = feats.buckets[0]
    assert feats.heatmaps["pool-1"][0].shape == (h // 2, w // 2)
    assert feats.heatmaps["fc-6"][0].shape == (h // 32 - 6, w // 32 - 6)
    with pytest.raises(KeyError, match="no layer 'conv-9-9'"):
        feats["conv-9-9"]


def test_missing_bucket_names_the_export_command(narrow_engine: Path, tmp_path: Path) -> None:
    image = np.full((250, 284, 3), 90, np.uint8)  # 284x250 -> bucket 288x256, not exported
    with Extractor.open(narrow_engine) as ex:
        feats = ex.extract([image])
    message = feats.errors[0]
    assert "bucket 288x256 has no exported graph" in message
    command = message.split("add it with: ", 1)[1]
    assert command.startswith("interactive export ")
    # the command is exact: run it (on a copy) and the image goes through
    copy = tmp_path / "engine"
    subprocess.run(["cp", "-r", str(narrow_engine), str(copy)], check=True)
    args = shlex.split(command.replace(str(narrow_engine), str(copy)))[1:]
    assert cli_main(args) == 0
    with Extractor.open(copy) as ex:
        assert not ex.extract([image]).errors


def test_sessions_are_bounded(narrow_engine: Path) -> None:
    sizes = [(256, 256), (288, 224), (224, 288)]
    images = [np.full((h, w, 3), 100, np.uint8) for w, h in sizes]
    with Extractor.open(narrow_engine, max_open_buckets=2) as ex:
        ex.extract(images)
        assert len(ex.backend.open_buckets) == 2


def test_bucket_cache_keeps_the_recent_and_discards_the_rest() -> None:
    made: list[tuple[int, int]] = []
    discarded: list[str] = []

    def make(bucket: tuple[int, int]) -> str:
        made.append(bucket)
        return f"plan {bucket}"

    cache = BucketCache(2, make, discard=discarded.append)
    a, b, c = (256, 256), (288, 224), (224, 288)
    assert cache.get(a) == "plan (256, 256)"
    cache.get(b)
    cache.get(a)  # a is now the most recent: c evicts b
    cache.get(c)
    assert made == [a, b, c]
    assert discarded == ["plan (288, 224)"]
    assert cache.buckets == [a, c] and a in cache and b not in cache
    cache.clear()
    assert discarded == ["plan (288, 224)", "plan (256, 256)", "plan (224, 288)"]
    with pytest.raises(ValueError, match="max_open_buckets must be at least 1, got 0"):
        BucketCache(0, make)


def test_runtime_never_imports_torch(narrow_engine: Path) -> None:
    code = f"""
import sys
from interactive.runtime import Extractor
from interactive.runtime.cli import main
ex = Extractor.open({str(narrow_engine)!r})
feats = ex.extract([{str(photos()[0])!r}])
assert not feats.errors, feats.errors
main(["buckets", "500x375"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
