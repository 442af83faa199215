"""`interactive index`: sharded Parquet output, equality with the API, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import Extractor
from interactive_features.runtime.index import (
    IndexJobError,
    IndexOptions,
    iter_sources,
    read_index,
    run_index,
)
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.manifest import EngineError
from interactive_features.runtime.parquet import layer_matrix, shrink_heatmap
from PIL import Image

import imagegen
from conftest import photos

# Aspect ratios that land in the narrow engine's buckets (area 256): 256x256, 288x224, 224x288.
RATIOS = [(1, 1), (4, 3), (3, 4), (13, 10)]
INLINE = LocalExecutor(workers=0)  # decoding in the test's process


def make_collection(root: Path, n: int) -> list[Path]:
    """n small real-photo derivatives (crops of tests/data, several aspect ratios) in subfolders,
    plus bad and exotic inputs (truncated_jpeg leaves its whole original too: 12 files)."""
    sources = [Image.open(p).convert("RGB") for p in photos()]
    files = []
    for i in range(n):
        im = sources[i % len(sources)]
        rw, rh = RATIOS[i % len(RATIOS)]
        side = min(im.width // rw, im.height // rh)
        crop = im.crop((i % 7, i % 5, i % 7 + rw * side, i % 5 + rh * side))
        crop = crop.resize((rw * 60 + i % 11, rh * 60 + i % 13))
        folder = root / f"set{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:04d}.jpg"
        crop.save(path, quality=85)
        files.append(path)
    bad = root / "bad"
    bad.mkdir()
    for make in (imagegen.empty_file, imagegen.truncated_jpeg, imagegen.not_an_image,
                 imagegen.bomb_png, imagegen.cmyk_jpeg, imagegen.grey16_png, imagegen.grey_jpeg,
                 imagegen.rgba_png, imagegen.palette_png, imagegen.animated_gif,
                 imagegen.exif_rotated_jpeg):  # fmt: skip
        files.append(make(bad))
    return files


def read_output(out: Path) -> pa.Table:
    """Every row, failed ones included: the dataset reader (`pq.read_table(out)`) sees the ok
    rows only since failed rows went to OUTDIR/_errors/ (tests/test_readers.py)."""
    return read_index(out)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    make_collection(root, 160)
    return root


def test_index_equals_the_api(narrow_engine: Path, collection: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = IndexOptions(batch_size=4, shard_size=7)
    executor = LocalExecutor(workers=2)
    report = run_index(collection, narrow_engine, out, options, executor, progress=False)
    paths = list(iter_sources(collection))
    assert report.images == len(paths) == 172 and report.written_shards == 25
    table = read_output(out).sort_by("path")
    assert sorted(table["path"].to_pylist()) == sorted(paths)
    assert len(set(table["id"].to_pylist())) == len(paths)
    status = dict(zip(table["path"].to_pylist(), table["status"].to_pylist(), strict=True))
    unreadable = {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb_20000x20000.png"}
    failed = {Path(p).name: s for p, s in status.items() if s != "ok"}
    assert unreadable <= set(failed)
    # the others failed because the engine lacks their bucket: a status row, not an abort
    others = [s for name, s in failed.items() if name not in unreadable]
    assert others and all("has no exported graph" in s for s in others)
    assert report.errors == len(failed)
    with Extractor.open(narrow_engine) as ex:
        want = ex.extract(table["path"].to_pylist())
    for layer in ex.layers:  # batches differ (shards), so fp32 sums may round differently
        got, expected = layer_matrix(table, layer), want[layer]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.nanmax(expected))
    assert table["bucket"].to_pylist() == [f"{b[0]}x{b[1]}" if b else None for b in want.buckets]


def test_layers_concat_and_sources(narrow_engine: Path, collection: Path, tmp_path: Path) -> None:
    paths = list(iter_sources(collection))[:10]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    pq.write_table(pa.table({"file": paths}), tmp_path / "list.parquet")
    pacsv.write_csv(pa.table({"path": paths}), tmp_path / "list.csv")
    assert list(iter_sources(listing)) == paths
    assert list(iter_sources(tmp_path / "list.parquet", "file")) == paths
    assert list(iter_sources(tmp_path / "list.csv")) == paths
    options = IndexOptions(layers=["pool-2", "fc-6"], normalize="l2", concat=True)
    run_index(listing, narrow_engine, tmp_path / "o", options, INLINE, progress=True)
    table = read_output(tmp_path / "o")
    assert "features" in table.column_names and "pool-1" not in table.column_names
    matrix = layer_matrix(table, "features")
    dims = Extractor.open(narrow_engine).manifest.layer_dims
    assert matrix.shape == (10, dims["pool-2"] + dims["fc-6"])
    norms = np.linalg.norm(matrix[:, : dims["pool-2"]], axis=1)
    np.testing.assert_allclose(norms[~np.isnan(norms)], 1.0, rtol=1e-5)


def test_other_options_are_refused_unless_overwrite(
    narrow_engine: Path, collection: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = IndexOptions(shard_size=50, limit=5)
    run_index(collection, narrow_engine, out, first, INLINE, progress=False)
    again = run_index(collection, narrow_engine, out, first, INLINE, progress=False)
    assert again.written_shards == 0 and again.skipped_shards == 1
    other = IndexOptions(shard_size=50, limit=5, normalize="l2")
    with pytest.raises(IndexJobError, match="another job"):
        run_index(collection, narrow_engine, out, other, INLINE, progress=False)
    report = run_index(collection, narrow_engine, out, other, INLINE, overwrite=True)
    assert report.written_shards == 1


def test_job_errors_come_before_any_work(narrow_engine: Path, tmp_path: Path) -> None:
    with pytest.raises(IndexJobError, match="does not exist"):
        run_index(tmp_path / "nowhere", narrow_engine, tmp_path / "o1", IndexOptions(), INLINE)
    assert not (tmp_path / "o1").exists()
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(IndexJobError, match="no column 'path'"):
        iter_sources(tmp_path / "list.parquet")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IndexJobError, match="cannot write"):
        run_index(tmp_path, narrow_engine, blocker / "out", IndexOptions(), INLINE)
    with pytest.raises(IndexJobError, match="not in this engine"):
        run_index(tmp_path, narrow_engine, tmp_path / "o", IndexOptions(layers=["x"]), INLINE)
    # A backend that cannot run here (no TensorRT in CI), refused before OUTDIR exists.
    with pytest.raises(EngineError, match="backend 'tensorrt' cannot run here"):
        executor = LocalExecutor(workers=0, backend="tensorrt")
        run_index(tmp_path, narrow_engine, tmp_path / "o2", IndexOptions(), executor)
    assert not (tmp_path / "o2").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "interactive_features.runtime.cli", "index", *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_dry_run_names_missing_buckets(narrow_engine: Path, tmp_path: Path) -> None:
    Image.new("RGB", (284, 250), "gray").save(tmp_path / "odd.jpg")  # bucket 288x256, missing
    Image.new("RGB", (300, 300), "gray").save(tmp_path / "square.jpg")
    result = cli(
        str(tmp_path), "--engine", str(narrow_engine), "-o", str(tmp_path / "o"), "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "288x256        1  (missing)" in result.stdout
    assert "--buckets 288x256" in result.stdout and not (tmp_path / "o").exists()


def processes_running_with(argument: str, wait_s: float) -> list[int]:
    """PIDs of live processes with `argument` in their command line, after up to `wait_s`."""
    deadline = time.time() + wait_s
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if argument.encode() in cmdline and state != "Z":
                found.append(int(proc.name))
        if not found or time.time() > deadline:
            return found
        time.sleep(0.1)


def test_resume_after_sigkill_is_exactly_once(
    narrow_engine: Path, collection: Path, tmp_path: Path
) -> None:
    args = [str(collection), "--engine", str(narrow_engine), "--batch-size", "1"]
    args += ["--shard-size", "16", "--workers", "1", "--no-progress"]
    whole = tmp_path / "whole"
    assert cli(*args, "-o", str(whole)).returncode == 3  # bad inputs included
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "interactive_features.runtime.cli",
        "index",
        *args,
        "-o",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "part-00001.parquet").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(out.glob("part-*.parquet")))
    assert 2 <= done_at_kill < 11, "the kill must land mid-run"
    assert not processes_running_with(str(out), wait_s=10), "decoding workers outlived the job"
    assert cli(*args, "-o", str(out)).returncode == 3
    resumed, reference = read_output(out), read_output(whole)
    assert resumed.num_rows == reference.num_rows == 172
    assert sorted(resumed["id"].to_pylist()) == sorted(set(reference["id"].to_pylist()))
    resumed, reference = resumed.sort_by("id"), reference.sort_by("id")
    assert resumed["status"].to_pylist() == reference["status"].to_pylist()
    for layer in ("pool-1", "fc-6"):
        np.testing.assert_array_equal(layer_matrix(resumed, layer), layer_matrix(reference, layer))
    assert not list(out.glob(".*.tmp"))


def test_small_heatmaps(narrow_engine: Path, tmp_path: Path) -> None:
    paths = [str(p) for p in photos()]
    options = IndexOptions(layers=["pool-1", "fc-6"], heatmaps=True)
    run_index(listing_of(tmp_path, paths), narrow_engine, tmp_path / "o", options, INLINE)
    table = read_output(tmp_path / "o")
    with Extractor.open(narrow_engine) as ex:
        want = ex.extract(paths)
    for i in range(len(paths)):
        stored = np.array(table["pool-1.heatmap"][i].as_py(), np.float32)
        full = want.heatmaps["pool-1"][i]
        f = -(-max(full.shape) // 32)
        assert stored.shape == (-(-full.shape[0] // f), -(-full.shape[1] // f))
        np.testing.assert_allclose(stored.mean(), full.mean(), rtol=0.05)
        fc6 = np.array(table["fc-6.heatmap"][i].as_py(), np.float32)
        np.testing.assert_allclose(fc6, want.heatmaps["fc-6"][i], rtol=1e-5)


def listing_of(directory: Path, paths: list[str]) -> Path:
    listing = directory / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def test_shrink_heatmap() -> None:
    m = np.arange(70, dtype=np.float32).reshape(7, 10)
    small = shrink_heatmap(m, max_side=4)  # factor 3: 3x4 blocks, edge blocks partial
    assert small.shape == (3, 4)
    assert small[0, 0] == m[:3, :3].mean() and small[2, 3] == m[6:, 9:].mean()
    assert shrink_heatmap(m, max_side=10) is not m and np.array_equal(shrink_heatmap(m, 10), m)
