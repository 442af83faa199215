"""`interactive index` under change and concurrency: the output is always the current SOURCE.

Every image comes from one pool whose features are computed once (batch 1, so an image's features
do not depend on what it is batched with): each check compares a job's output, id -> features,
bitwise with that reference, and asks for every current input exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import index as index_module
from interactive_features.runtime.index import (
    IndexJobError,
    IndexOptions,
    IndexReport,
    run_index,
    source_id,
)
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.locks import LockedError, exclusive_lock
from interactive_features.runtime.parquet import layer_matrix

import imagegen

LAYERS = ["pool-1", "fc-6"]
POOL = 60
SIZES = [(40, 40), (48, 36), (36, 48)]  # the narrow engine's three buckets
NUMBER = re.compile(r"(\d{4})\.jpg$")  # a placed file's name ends with its pool number
INLINE = LocalExecutor(workers=0)
OPTIONS = IndexOptions(batch_size=1, shard_size=5, layers=LAYERS)
FAST = ["--batch-size", "1", "--shard-size", "5", "--layers", ",".join(LAYERS)]
FAST += ["--workers", "0", "--no-progress"]

Reference = dict[int, tuple[bytes, ...]]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for i in range(POOL):
        imagegen.jpeg(root, *SIZES[i % len(SIZES)], name=f"img{i:04d}.jpg", seed=i)
    return root


@pytest.fixture(scope="module")
def reference(pool: Path, narrow_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """pool number -> the bytes of each layer's feature vector (one uninterrupted run)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    options = IndexOptions(batch_size=1, shard_size=POOL, layers=LAYERS)
    run_index(pool, narrow_engine, out, options, INLINE, progress=False)
    return features_by_number(pq.read_table(out))


def features_by_number(table) -> Reference:
    matrices = [layer_matrix(table, layer) for layer in LAYERS]
    numbers = [number_of(p) for p in table["path"].to_pylist()]
    return {n: tuple(m[r].tobytes() for m in matrices) for r, n in enumerate(numbers)}


def number_of(path: str) -> int:
    match = NUMBER.search(path)
    assert match, path
    return int(match.group(1))


def place(pool: Path, folder: Path, i: int, name: str | None = None) -> Path:
    """Pool image i as folder/name (its name must end with the 4-digit number)."""
    target = folder / (name or f"img{i:04d}.jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pool / f"img{i:04d}.jpg", target)
    return target


def check(out: Path, current: list[Path], reference: Reference) -> None:
    """Every current input exactly once, its id from its absolute path, its features bitwise
    those of the reference run; no temporary file left."""
    table = pq.read_table(out)
    paths = table["path"].to_pylist()
    assert sorted(paths) == sorted(str(p) for p in current)
    assert table["id"].to_pylist() == [source_id(p) for p in paths]
    assert len(set(paths)) == len(paths)
    got = features_by_number(table)
    assert got == {n: reference[n] for n in got}
    assert set(table["status"].to_pylist()) == {"ok"}
    assert not list(out.glob(".*.tmp"))


def index_args(source: Path, engine: Path, out: Path, *more: str) -> list[str]:
    return [str(source), "--engine", str(engine), "-o", str(out), *FAST, *more]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "interactive_features.runtime.cli", "index", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


def start(args: list[str], log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "interactive_features.runtime.cli", "index", *args]
    stderr = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the process owns it)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


def shards(out: Path) -> set[str]:
    return {p.name for p in out.glob("part-*.parquet")}


def kill_after(process: subprocess.Popen, out: Path, n: int, before: set[str]) -> int:
    """SIGKILL `process` once n shards not in `before` exist; how many there were then."""
    deadline = time.time() + 90
    while len(shards(out) - before) < n and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the kill must land mid-run"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return len(shards(out) - before)


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Case 1: a rerun after SOURCE changed


def test_resume_after_the_source_changed(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path
) -> None:
    """Killed after 4 shards, 5 files that sort first added, rerun: every input once."""
    source, out = tmp_path / "photos", tmp_path / "out"
    files = [place(pool, source, i) for i in range(40)]
    args = index_args(source, narrow_engine, out)
    done = kill_after(start(args), out, 4, set())
    assert 4 <= done < 8
    early = [place(pool, source, i, f"a{i:04d}.jpg") for i in range(40, 45)]  # sort first
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{45 - 5 * done} new, 0 gone" in result.stderr  # said at the start, and at the end
    assert f"{45 - 5 * done} new, 0 gone" in result.stdout
    check(out, files + early, reference)
    # Removed and renamed files: their rows go, the renamed ones come back under the new name.
    for path in files[:3]:
        path.unlink()
    renamed = [files[5].rename(source / "b0005.jpg"), files[6].rename(source / "b0006.jpg")]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "2 new, 5 gone" in result.stderr
    check(out, files[3:5] + renamed + files[7:] + early, reference)
    plan = json.loads((out / "_manifest.json").read_text())["plan"]
    assert (plan["inputs"], plan["new"], plan["gone"], plan["kept"]) == (42, 2, 5, 40)


def test_kill_during_an_incremental_run(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path
) -> None:
    """The second run (30 new, 4 gone) killed after 1 of its shards, its rerun after 2 more."""
    source, out = tmp_path / "photos", tmp_path / "out"
    files = [place(pool, source, i) for i in range(30)]
    run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    for i in (2, 9, 15, 27):  # one row out of four shards
        files[i].unlink()
    current = [f for i, f in enumerate(files) if i not in (2, 9, 15, 27)]
    current += [place(pool, source / "more", i) for i in range(30, 60)]
    args = index_args(source, narrow_engine, out)
    before = shards(out)
    first = kill_after(start(args), out, 1, before)
    assert not {str(files[i]) for i in (2, 9)} & set(pq.read_table(out)["path"].to_pylist())
    second = kill_after(start(args), out, first + 2, before)
    assert second < 6
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{30 - 5 * second} new, 0 gone" in result.stderr
    check(out, current, reference)
    assert len(shards(out)) == 12  # 6 first, 6 new: numbers 6..11, none twice


# ------------------------------------------------------------------------------------------------
# Case 6: concurrent jobs on one OUTDIR


def test_one_job_per_outdir(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path
) -> None:
    """Three jobs at once: two refused at once naming the holder; the third killed mid-run;
    a rerun completes it (the kernel dropped the dead job's lock)."""
    source, out = tmp_path / "photos", tmp_path / "out"
    files = [place(pool, source, i) for i in range(30)]
    args = index_args(source, narrow_engine, out)
    logs = [tmp_path / f"job{j}.log" for j in range(3)]
    jobs = [start(args, log) for log in logs]
    deadline = time.time() + 60
    while sum(job.poll() is not None for job in jobs) < 2 and time.time() < deadline:
        time.sleep(0.02)
    running = [job for job in jobs if job.poll() is None]
    assert len(running) == 1, [job.returncode for job in jobs]
    holder = running[0]
    for job, log in zip(jobs, logs, strict=True):
        if job is not holder:
            result = subprocess.CompletedProcess(job.args, job.returncode, "", log.read_text())
            one_line_error(result, 1, f"is in use by pid {holder.pid} on ", ".interactive.lock")
    kill_after(holder, out, 1, set())
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    check(out, files, reference)


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with exclusive_lock(lock, "thing"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["command"]
        code = (
            "import sys; from interactive_features.runtime.locks import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}, 'thing'): pass"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 1 and f"thing is in use by pid {os.getpid()}" in other.stderr
    with exclusive_lock(lock, "thing"):  # released, and reusable in the same process
        pass
    # flock locks belong to an open file: even this process cannot take it twice
    with (
        pytest.raises(LockedError, match=r"lock file .*x\.lock"),
        exclusive_lock(lock, "a"),
        exclusive_lock(lock, "a"),
    ):
        pass


# ------------------------------------------------------------------------------------------------
# Case 7: one id per file


def test_one_id_per_file_and_duplicates_once(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # list entries are relative to the current directory
    x, y = place(pool, tmp_path / "photos", 1), place(pool, tmp_path / "photos", 2)
    copy = place(pool, tmp_path / "photos", 1, "copy0001.jpg")  # same bytes as x
    listing = tmp_path / "list.txt"
    entries = ["photos/img0001.jpg", "./photos/img0001.jpg", str(x), "photos/img0002.jpg"]
    entries += ["photos//img0002.jpg", "photos/copy0001.jpg"]
    listing.write_text("\n".join(entries) + "\n")
    assert len({source_id(e) for e in entries[:3]}) == 1
    assert source_id("photos/img0001.jpg") != source_id("photos/copy0001.jpg")
    out = tmp_path / "out"
    result = cli("list.txt", "--engine", str(narrow_engine), "-o", "out", *FAST, "--content-hash",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 new, 0 gone, 3 listed twice (indexed once)" in result.stderr
    table = pq.read_table(out)
    assert table["path"].to_pylist() == ["photos/img0001.jpg", "photos/img0002.jpg",
                                         "photos/copy0001.jpg"]  # fmt: skip
    assert table["id"].to_pylist() == [source_id(str(p)) for p in (x, y, copy)]
    digests = table["sha256"].to_pylist()
    assert digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (x, y, copy)]
    assert digests[0] == digests[2]  # copies under other paths: one hash
    assert features_by_number(table) == {n: reference[n] for n in (1, 2)}  # decoded from bytes
    run = json.loads((out / "_manifest.json").read_text())
    assert run["plan"]["duplicates"] == 3 and run["result"]["duplicates"] == 3
    # Another spelling of the same list from another directory: the same inputs, nothing to do.
    listing.write_text("\n".join(["tmp/photos/img0001.jpg", str(y), str(copy)]) + "\n")
    (tmp_path / "tmp").symlink_to(tmp_path)  # a link is its own path: that input is new
    result = cli("list.txt", "--engine", str(narrow_engine), "-o", "out", *FAST, "--content-hash",
                 cwd=tmp_path)  # fmt: skip
    assert "1 new, 1 gone" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------
# Unclear failures


def test_bad_usage_and_bad_run_manifests_are_one_line(narrow_engine: Path, tmp_path: Path) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    imagegen.jpeg(source, 40, 40, name="a.jpg")
    out = tmp_path / "out"
    base = [str(source), "--engine", str(narrow_engine), "-o", str(out), "--no-progress"]
    for flag, value in [("--limit", "-1"), ("--limit", "0"), ("--shard-size", "0"),
                        ("--batch-size", "0"), ("--workers", "-1"), ("--actors", "x")]:  # fmt: skip
        result = cli(*base, flag, value)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (flag, result.stderr)
        assert f"argument {flag}" in result.stderr
    out.mkdir()
    for content in ("[1, 2]", "{not json", ""):
        (out / "_manifest.json").write_text(content)
        one_line_error(cli(*base), 1, "_manifest.json", "is not a run manifest", "--overwrite")
    result = cli(*base, "--workers", "0", "--overwrite")  # even an empty one is replaced
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "_manifest.json").read_text())["result"]["images"] == 1
    other = cli(*base, "--normalize", "l2")
    one_line_error(other, 1, "another job", "normalize 'none' there, 'l2' here")


# ------------------------------------------------------------------------------------------------
# Many runs, in this process


def counts(report: IndexReport) -> tuple[int, ...]:
    return (report.images, report.new, report.gone, report.processed)


def test_soak_grow_shrink_rename(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path
) -> None:
    """Five runs over one changing collection end with exactly the current inputs."""
    source, out = tmp_path / "c", tmp_path / "out"

    def run(**kwargs: object) -> IndexReport:
        options = IndexOptions(**{**vars(OPTIONS), **kwargs})  # type: ignore[arg-type]
        return run_index(source, narrow_engine, out, options, INLINE, progress=False)

    current = {i: place(pool, source, i) for i in range(20)}
    assert counts(run()) == (20, 20, 0, 20)
    check(out, list(current.values()), reference)
    current |= {i: place(pool, source / "b", i) for i in range(20, 35)}  # grown
    assert counts(run(shard_size=4)) == (35, 15, 0, 15)  # the shard size may change
    check(out, list(current.values()), reference)
    for i in [0, 1, 2, 3, 4, 7, 11, 30, 31, 32]:  # shrunk: shard 0 emptied, others rewritten
        current.pop(i).unlink()
    report = run()
    assert counts(report) == (25, 0, 10, 0) and report.removed_shards == 1
    assert report.rewritten_shards == 4 and "part-00000.parquet" not in shards(out)
    check(out, list(current.values()), reference)
    for i in (5, 6, 20, 21, 33):  # renamed: gone under the old name, new under the new one
        current[i] = current[i].rename(source / f"renamed{i:04d}.jpg")
    assert counts(run()) == (25, 5, 5, 5)
    check(out, list(current.values()), reference)
    assert "part-00000.parquet" in shards(out)  # the free number is used again
    for i in (8, 9, 34):
        current.pop(i).unlink()
    current |= {i: place(pool, source / "a", i) for i in range(35, 45)}
    current[10] = current[10].rename(source / "a" / "moved0010.jpg")
    assert counts(run()) == (32, 11, 4, 11)
    check(out, list(current.values()), reference)
    again = run()
    assert counts(again) == (32, 0, 0, 0) and again.written_shards == 0


def test_retry_failed(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "c", tmp_path / "out"
    files = [place(pool, source, i) for i in range(6)]
    files[4].write_text("not yet an image")
    first = run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    assert (first.images, first.errors) == (6, 1)
    place(pool, source, 4)  # fixed
    again = run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    assert (again.errors, again.processed) == (1, 0)  # a failed row is done until asked
    redo = run_index(source, narrow_engine, out, OPTIONS, INLINE, retry_failed=True)
    assert (redo.errors, redo.processed, redo.retried, redo.new) == (0, 1, 1, 0)
    check(out, files, reference)
    assert not list((out / "_errors").iterdir())  # the error shard went with its only row


class Crash(Exception):
    pass


def test_a_crash_while_removing_rows(
    pool: Path, reference: Reference, narrow_engine: Path, tmp_path: Path, monkeypatch
) -> None:
    """Dying after the first of three shard rewrites leaves no row twice; a rerun finishes."""
    source, out = tmp_path / "c", tmp_path / "out"
    files = [place(pool, source, i) for i in range(15)]
    run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    for i in (1, 6, 11):
        files[i].unlink()
    current = [f for i, f in enumerate(files) if i not in (1, 6, 11)]
    writes = []
    real = index_module.write_table

    def dies_on_the_second(table, path):  # as a kill -9 would, between two rewrites
        writes.append(path)
        if len(writes) == 2:
            raise Crash
        return real(table, path)

    monkeypatch.setattr(index_module, "write_table", dies_on_the_second)
    with pytest.raises(Crash):
        run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    monkeypatch.undo()
    paths = pq.read_table(out)["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 14  # one row removed, none twice
    report = run_index(source, narrow_engine, out, OPTIONS, INLINE, progress=False)
    assert (report.gone, report.new, report.rewritten_shards) == (2, 0, 2)
    check(out, current, reference)


def test_limit_and_an_empty_source(pool: Path, narrow_engine: Path, tmp_path: Path) -> None:
    source, out = tmp_path / "c", tmp_path / "out"
    files = [place(pool, source, i) for i in range(5)]
    options = IndexOptions(**{**vars(OPTIONS), "limit": 4})
    assert run_index(source, narrow_engine, out, options, INLINE).images == 4
    options.limit = 2  # the output is the first 2 entries now
    report = run_index(source, narrow_engine, out, options, INLINE)
    assert (report.images, report.gone) == (2, 2)
    assert sorted(pq.read_table(out)["path"].to_pylist()) == [str(f) for f in files[:2]]
    for f in files:
        f.unlink()
    with pytest.raises(IndexJobError, match="lists no inputs: refusing to remove all 2 rows"):
        run_index(source, narrow_engine, out, OPTIONS, INLINE)
    assert len(pq.read_table(out)) == 2
    report = run_index(source, narrow_engine, out, OPTIONS, INLINE, overwrite=True)
    assert (report.images, report.gone) == (0, 2) and not shards(out)
