"""The Python API on a narrow engine: bad inputs, order, missing buckets, LRU, no torch."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from interactive_features.export.exporter import ExportRequest, export_engine
from interactive_features.runtime import Extractor
from interactive_features.runtime.backends import BucketCache
from interactive_features.runtime.cli import main as cli_main
from interactive_features.runtime.settings import ExportSettings

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


RSS_PROBE = """
import sys
import numpy as np
from interactive_features.runtime import Extractor

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

sizes = [(512, 512), (576, 448), (544, 480), (480, 544)]
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (h, w, 3), np.uint8) for w, h in sizes]
rounds = []
with Extractor.open(sys.argv[1], release_memory=sys.argv[2] == "1") as ex:
    for _ in range(3):
        for image in images:
            assert not ex.extract([image]).errors
        rounds.append(rss_mb())
print(rounds)
"""


@pytest.mark.slow
def test_memory_stays_at_one_batchs_peak_across_buckets(tmp_path: Path) -> None:
    """The shared ONNX Runtime arena (runtime/backends/sessions.py): RSS does not grow with the
    buckets that go through (a memory pattern per run made it grow by a block per size: +79 MB
    here, measured), and `release_memory=True` hands the arena back after each batch (210 MB
    against 114 MB, measured)."""
    engine = tmp_path / "quarter"
    settings = ExportSettings(weights="random:0", width_div=4)
    buckets = "512x512,576x448,544x480,480x544"
    export_engine(ExportRequest(engine, settings, buckets, validate=False), log=lambda _: None)
    rss = {}
    for release in ("0", "1"):
        command = [sys.executable, "-c", RSS_PROBE, str(engine), release]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        rss[release] = [float(v) for v in result.stdout.strip()[1:-1].split(",")]
    kept, released = rss["0"], rss["1"]
    assert kept[-1] - kept[0] < 20, kept  # flat after the first round of the four sizes
    assert released[-1] - released[0] < 20, released
    assert kept[-1] - released[-1] > 50, (kept, released)


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
from interactive_features.runtime import Extractor
from interactive_features.runtime.cli import main
ex = Extractor.open({str(narrow_engine)!r})
feats = ex.extract([{str(photos()[0])!r}])
assert not feats.errors, feats.errors
main(["buckets", "500x375"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_features_repr_arrow_and_pandas(narrow_engine: Path, tmp_path: Path) -> None:
    """repr says N, failures and each layer's width; to_arrow/to_pandas hold the Parquet
    output's columns (interactive extract), `path` from the inputs' names."""
    import pyarrow.parquet as pq
    from interactive_features.runtime.extract import extract_to_parquet

    images = [str(p) for p in photos()[:2]] + [str(tmp_path / "missing.jpg")]
    with Extractor.open(narrow_engine) as ex:
        feats = ex.extract(images)
    text = repr(feats)
    assert text.startswith("Features(N=3, failed=1, layers={pool-1: 8, pool-2: 16,")
    assert text.endswith(", heatmaps)")
    table = feats.to_arrow()
    written = pq.read_table(
        extract_to_parquet(narrow_engine, images, tmp_path / "x.parquet").output
    )
    assert table.column_names == written.column_names
    assert table.column("path").to_pylist() == images
    assert table.column("status").to_pylist()[:2] == ["ok", "ok"]
    np.testing.assert_array_equal(
        np.asarray(table.column("pool-3").to_pylist()[0]), feats["pool-3"][0]
    )
    frame = feats.to_pandas(["a", "b", "c"], concat=True, normalize="l2")
    assert list(frame.columns) == ["path", "path_bytes", "width", "height", "bucket", "features",
                                   "status"]  # fmt: skip
    assert list(frame["path"]) == ["a", "b", "c"] and frame["features"][2] is None
    with pytest.raises(ValueError, match="2 paths for 3 rows"):
        feats.to_arrow(["a", "b"])


def test_index_job_from_python(narrow_engine: Path, tmp_path: Path) -> None:
    from interactive_features.runtime import index_job

    source = tmp_path / "photos"
    source.mkdir()
    for p in photos()[:2]:
        (source / p.name).write_bytes(p.read_bytes())
    report = index_job(source, narrow_engine, tmp_path / "index", layers=["pool-3"], workers=0)
    assert (report.images, report.errors, report.new) == (2, 0, 2)
    again = index_job(source, narrow_engine, tmp_path / "index", layers=["pool-3"], workers=0)
    assert (again.images, again.processed) == (2, 0)


def test_plain_progress_lines_have_total_and_eta() -> None:
    import time

    from interactive_features.runtime.index_local import LiveProgress, format_duration

    progress = LiveProgress(False, lambda: 100)
    for _ in range(100):
        if progress.total is not None:
            break
        time.sleep(0.01)
    progress.done, progress.errors = 25, 2
    line = progress.line(progress.started + 10)
    assert line == "index: 25/100 images decoded (25%), 2 errors, 2.5 images/s, ETA 30 s"
    unknown = LiveProgress(False, lambda: 1 // 0)  # the count failed: no total, no ETA
    time.sleep(0.05)
    unknown.done = 5
    assert unknown.line(unknown.started + 1) == "index: 5 images decoded, 0 errors, 5.0 images/s"
    assert [format_duration(s) for s in (4, 600, 7300)] == ["4 s", "10 min", "2 h 02 min"]
