"""`interactive index --ray`: the local job's output on a local Ray instance, resume, killed actors.

One Ray instance (2 CPUs, no dashboard, a small object store) serves the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime.cli import EXIT_PARTIAL, main
from interactive_features.runtime.index import IndexJobError, IndexOptions, run_index, shard_files
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.parquet import layer_matrix
from interactive_features.runtime.ray_index import RayExecutor
from test_index import make_collection, read_output

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a dependency of ray

# Ray batches of 4 x batch_size rows: a shard of 10 arrives in pieces (8 + 2), in any order.
OPTIONS = dict(batch_size=2, shard_size=10, layers=["pool-1", "pool-3", "fc-6"], heatmaps=True)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        logging_level="WARNING",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    make_collection(root, 24)  # 24 photos + 12 bad or exotic files
    return root


@pytest.fixture(scope="module")
def local_output(narrow_engine: Path, collection: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    options = IndexOptions(**OPTIONS)
    run_index(collection, narrow_engine, out, options, LocalExecutor(workers=0), progress=False)
    return out


def index_args(collection: Path, engine: Path, out: Path) -> list[str]:
    args = ["index", str(collection), "--engine", str(engine), "-o", str(out)]
    args += ["--batch-size", "2", "--shard-size", "10", "--layers", "pool-1,pool-3,fc-6"]
    return [*args, "--heatmaps", "--no-progress", "--actors", "1", "--ray"]


def shard_names(out: Path) -> list[str]:
    return sorted(str(part.relative_to(out)) for part in shard_files(out))


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    """Same inputs, ids, sizes, buckets and statuses; features equal up to fp32 batch noise."""
    for column in ("id", "path", "width", "height", "bucket", "status"):
        assert got[column].to_pylist() == want[column].to_pylist(), column
    if "status" in got.column_names and set(got["status"].to_pylist()) - {"ok"}:
        assert got.column_names == want.column_names  # an error shard: no feature columns
        return
    for layer in OPTIONS["layers"]:
        # Batches are cut differently (Ray batches vs whole shards), so sums may round apart.
        expected = layer_matrix(want, layer)
        np.testing.assert_allclose(
            layer_matrix(got, layer), expected, rtol=1e-5, atol=1e-6 * np.nanmax(expected)
        )
        maps = (t[f"{layer}.heatmap"].to_pylist() for t in (got, want))
        for g, w in zip(*maps, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-6)


def test_ray_job_equals_the_local_job_and_resumes(
    ray_local: None, narrow_engine: Path, collection: Path, local_output: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray"
    assert main(index_args(collection, narrow_engine, out)) == EXIT_PARTIAL  # bad inputs
    shards = shard_names(out)  # features and errors (OUTDIR/_errors/) shards
    assert shards == shard_names(local_output)
    assert set(shard_files(out).values()) == {0, 1, 2, 3} and not list(out.glob(".*.tmp"))
    for name in shards:  # shard by shard: same rows in the same order, same schema and metadata
        got, want = pq.read_table(out / name), pq.read_table(local_output / name)
        assert got.schema.equals(want.schema, check_metadata=True)
        assert_same_rows(got, want)
    statuses = read_output(out)["status"].to_pylist()
    assert 0 < sum(s != "ok" for s in statuses) < len(statuses) == 36
    ray_run, local_run = (
        json.loads((d / "_manifest.json").read_text()) for d in (out, local_output)
    )
    for run in (ray_run, local_run):
        for key in ("seconds", "processed", "written_shards", "skipped_shards"):
            del run["result"][key]
    assert ray_run == local_run

    written = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    options = IndexOptions(**OPTIONS)
    again = run_index(collection, narrow_engine, out, options, RayExecutor(), progress=False)
    assert (again.written_shards, again.skipped_shards, again.images) == (0, 4, 36)
    assert {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == written

    for part, k in shard_files(out).items():  # as if the job had died before shards 1 and 2
        if k in (1, 2):  # both their files (features and errors): they are redone
            part.unlink()
    resumed = run_index(collection, narrow_engine, out, options, RayExecutor())
    assert (resumed.written_shards, resumed.processed, resumed.images) == (2, 20, 36)
    assert_same_rows(read_output(out), read_output(local_output))


def test_ray_continues_an_incremental_run_like_the_local_job(
    ray_local: None, narrow_engine: Path, collection: Path, tmp_path: Path
) -> None:
    """After SOURCE changed (files removed, renamed, added), a Ray rerun plans, rewrites and
    numbers exactly as a local rerun of the same OUTDIR does; --content-hash in both."""
    source = tmp_path / "c"
    shutil.copytree(collection, source)
    options = IndexOptions(**{**OPTIONS, "content_hash": True})
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_index(source, narrow_engine, local, options, LocalExecutor(workers=0), progress=False)
    shutil.copytree(local, remote)
    (source / "set0" / "img0000.jpg").unlink()
    (source / "bad" / "notes.jpg").unlink()
    (source / "set1" / "img0001.jpg").rename(source / "set1" / "zz0001.jpg")
    for name in ("img0002.jpg", "img0005.jpg"):
        shutil.copyfile(source / "set2" / name, source / "set2" / f"new-{name}")
    reports = [
        run_index(source, narrow_engine, out, options, executor, progress=False)
        for out, executor in ((local, LocalExecutor(workers=0)), (remote, RayExecutor()))
    ]
    changes = [(r.new, r.gone, r.processed, r.written_shards, r.rewritten_shards) for r in reports]
    assert changes[0] == changes[1] == (3, 3, 3, 1, 3)
    names = shard_names(remote)
    assert names == shard_names(local)
    for name in names:
        got, want = pq.read_table(remote / name), pq.read_table(local / name)
        assert_same_rows(got, want)
        assert got["sha256"].to_pylist() == want["sha256"].to_pylist()
    plans = [json.loads((d / "_manifest.json").read_text())["plan"] for d in (local, remote)]
    assert plans[0] == plans[1]


def extraction_actors() -> dict[int, str]:
    """pid -> title of Ray Data's extraction actors (Ray titles them after the actor class)."""
    actors = {}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and "ExtractFeatures" in title:
            actors[process.pid] = title
    return actors


def test_a_killed_actor_leaves_every_input_exactly_once(
    ray_local: None, narrow_engine: Path, collection: Path, local_output: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray"
    options = IndexOptions(**{**OPTIONS, "batch_size": 1, "shard_size": 6})  # 6 shards
    killed: list[tuple[int, str, int]] = []  # (pid, title, shards on disk when it was killed)
    restarted: list[int] = []

    def kill_the_actor_mid_job() -> None:
        deadline = time.time() + 60
        while not (out / "part-00000.parquet").exists() and time.time() < deadline:
            time.sleep(0.01)
        for pid, title in extraction_actors().items():
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, title, len(list(out.glob("part-*.parquet")))))
        while not restarted and time.time() < deadline:  # Ray starts a new one
            restarted.extend(set(extraction_actors()) - {pid for pid, _, _ in killed})
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor_mid_job)
    killer.start()
    executor = RayExecutor(actors=1)
    report = run_index(collection, narrow_engine, out, options, executor, progress=False)
    killer.join()
    assert len(killed) == 1 and killed[0][2] < 6, f"the kill must land mid-job: {killed}"
    assert "decode_block" not in killed[0][1], "decoding must run in CPU tasks, not in actors"
    assert restarted and not psutil.pid_exists(killed[0][0])
    assert (report.written_shards, report.images) == (6, 36)
    table, reference = read_output(out), read_output(local_output)
    assert sorted(table["id"].to_pylist()) == sorted(set(reference["id"].to_pylist()))
    assert_same_rows(table.sort_by("id"), reference.sort_by("id"))


def test_ray_reads_tar_members_and_carries_columns_like_the_local_job(
    ray_local: None, narrow_engine: Path, tmp_path: Path
) -> None:
    """A Parquet list of tar shards (one truncated) with --columns: same rows as locally."""
    from test_tar import make_shard

    for k in range(2):
        make_shard(tmp_path / f"t{k}.tar", 10 * k, 3)
    cut = (tmp_path / "t1.tar").read_bytes()
    (tmp_path / "t1.tar").write_bytes(cut[: len(cut) // 2])
    listing = pa.table({"path": ["t0.tar", "t1.tar"], "shard": [0, 1]})
    pq.write_table(listing, tmp_path / "l.parquet")
    options = IndexOptions(batch_size=2, shard_size=4, columns=["shard"])
    tables = []
    for name, executor in (("local", LocalExecutor(workers=0)), ("ray", RayExecutor())):
        run_index(tmp_path / "l.parquet", narrow_engine, tmp_path / name, options, executor,
                  progress=False)  # fmt: skip
        tables.append(read_output(tmp_path / name))
    got, want = tables
    assert_same_rows(got, want)
    for column in ("shard", "json", "cls", "txt"):
        assert got[column].to_pylist() == want[column].to_pylist(), column
    assert sum(s != "ok" for s in got["status"].to_pylist()) >= 1 and got["shard"][0].as_py() == 0


def test_actors_must_leave_a_cpu_for_decoding(
    ray_local: None, narrow_engine: Path, collection: Path, tmp_path: Path
) -> None:
    with pytest.raises(IndexJobError, match="leave none for decoding; use at most 1"):
        run_index(collection, narrow_engine, tmp_path / "o", IndexOptions(), RayExecutor(actors=2))


def test_only_the_ray_path_imports_ray() -> None:
    code = (
        "import sys, interactive_features.runtime.cli, interactive_features.runtime.index, "
        "interactive_features.runtime.index_local, interactive_features.runtime.ray_index; "
        "print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
