"""`interactive index`: a collection -> sharded Parquet features, resumable, safe on bad input.

The source (a directory tree, a text file of paths, or a Parquet/CSV file with a path column:
runtime/index_sources.py) is streamed in a stable order and cut into shards of `shard_size`
consecutive inputs. Shard k is `part-0000k.parquet`, written under a temporary name and renamed
when complete, so after a crash (even `kill -9`) a rerun skips the finished shards without
reading their images and redoes the rest: every input ends up in exactly one row. Decoding and
resizing run in worker processes that feed a bucket-aware batcher; a bounded window of images in
flight keeps memory flat whatever the collection size.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .api import Extractor
from .buckets import format_size
from .images import ImageError, PreparedImage, image_size, prepare_image
from .index_sources import IndexJobError, iter_sources, limited
from .manifest import EngineManifest, package_version
from .parquet import features_table, write_table

RUN_MANIFEST = "_manifest.json"


@dataclass
class IndexOptions:
    """The options that shape the output; a rerun on the same OUTDIR must repeat them."""

    batch_size: int = 16
    shard_size: int = 1000
    layers: list[str] | None = None
    normalize: str = "none"
    concat: bool = False
    path_column: str = "path"
    limit: int | None = None
    heatmaps: bool = False  # small heatmaps beside the features (engines made with --heatmaps)


@dataclass
class IndexReport:
    """Totals over the whole output (earlier runs' shards included); speed over this run's."""

    images: int = 0
    errors: int = 0
    processed: int = 0  # images decoded and run by this run
    skipped_shards: int = 0
    written_shards: int = 0
    seconds: float = 0.0
    by_bucket: Counter = field(default_factory=Counter)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def add(self, table: Any) -> None:
        """Count a shard's rows (a pyarrow table with `status` and `bucket` columns)."""
        status = table.column("status").to_pylist()
        self.images += len(status)
        self.errors += sum(s != "ok" for s in status)
        self.by_bucket.update(b for b in table.column("bucket").to_pylist() if b)


def source_id(path: str) -> str:
    """A stable id for an input: the first 16 hex digits of the SHA-1 of its path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


# ------------------------------------------------------------------------------------------------
# Decoding in worker processes


_worker_manifest: EngineManifest | None = None


def _init_worker(engine: str, job_pid: int) -> None:
    global _worker_manifest
    _die_with_the_job(job_pid)
    _worker_manifest = EngineManifest.load(engine)


def _die_with_the_job(job_pid: int) -> None:
    """Linux: the kernel kills this worker when the job's process dies, even by `kill -9`.

    Without it a forked worker outlives a killed job, blocked for ever on a queue whose other end
    it inherited. Elsewhere (no prctl) a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != job_pid:  # the job died before prctl took effect
        os._exit(1)


def _prepare(path: str) -> PreparedImage | str:
    assert _worker_manifest is not None, "_init_worker runs first in every worker"
    return prepare_or_error(path, _worker_manifest)


def prepare_or_error(path: str, manifest: EngineManifest) -> PreparedImage | str:
    """The image at its bucket size, or why it cannot be read (any failure is the input's)."""
    try:
        return prepare_image(path, manifest.bucket_for)
    except ImageError as err:
        return str(err)
    except Exception as err:  # a decoder bug must cost one row, never the job
        return f"{path}: unexpected error while decoding: {type(err).__name__}: {err}"


def _prepared_stream(
    paths: list[str], pool: ProcessPoolExecutor | None, window: int, manifest: EngineManifest
) -> Iterator[tuple[int, PreparedImage | str]]:
    """(position, prepared image or error) in input order, at most `window` images in flight."""
    if pool is None:
        for i, path in enumerate(paths):
            yield i, prepare_or_error(path, manifest)
        return
    pending: deque[tuple[int, Future]] = deque()
    for i, path in enumerate(paths):
        pending.append((i, pool.submit(_prepare, path)))
        if len(pending) >= window:
            j, future = pending.popleft()
            yield j, future.result()
    while pending:
        j, future = pending.popleft()
        yield j, future.result()


# ------------------------------------------------------------------------------------------------
# The job


def run_index(
    source: Path,
    engine: Path,
    out: Path,
    options: IndexOptions,
    *,
    backend: str = "auto",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> IndexReport:
    """Index SOURCE into OUTDIR; returns what was done. Errors in the job itself raise early."""
    extractor = Extractor.open(engine, backend=backend)
    check_layers(options, extractor)
    sources = limited(iter_sources(source, options.path_column), options.limit)
    run = run_manifest(source, extractor.manifest, options)
    prepare_outdir(out, run, overwrite)
    report = IndexReport()
    started = time.perf_counter()

    def count() -> int:
        return sum(1 for _ in limited(iter_sources(source, options.path_column), options.limit))

    bar = _Progress(progress, count)
    pool = None
    if workers > 0:
        # fork on Linux (the default there up to Python 3.13; 3.14 moves to forkserver), so that
        # a worker's parent is this job, which _die_with_the_job relies on.
        context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
        pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(str(engine), os.getpid()),
        )
    try:
        for k, paths in enumerate(chunks(sources, options.shard_size)):
            target = out / shard_name(k)
            if target.exists():
                report.skipped_shards += 1
                report.add(pq.read_table(target, columns=["status", "bucket"]))
                bar.skip(len(paths))
                continue
            window = max(2 * options.batch_size, 4 * max(workers, 1))
            stream = bar.track(_prepared_stream(paths, pool, window, extractor.manifest))
            features = extractor.extract_prepared(stream, len(paths), options.batch_size)
            table = features_table(
                paths,
                features,
                {"interactive.run": json.dumps(run)},
                ids=[source_id(p) for p in paths],
                layers=options.layers,
                normalize=options.normalize,
                concat=options.concat,
                heatmaps=options.heatmaps,
            )
            write_table(table, target)
            report.written_shards += 1
            report.processed += len(paths)
            report.add(table)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    report.seconds = time.perf_counter() - started
    run["result"] = {**asdict(report), "by_bucket": dict(report.by_bucket)}
    write_json(out / RUN_MANIFEST, run)
    return report


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` items (the last may be shorter): how shards are cut."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def check_layers(options: IndexOptions, extractor: Extractor) -> None:
    """Raise IndexJobError when the options ask for what the engine cannot give."""
    if options.batch_size < 1 or options.shard_size < 1:
        raise IndexJobError("--batch-size and --shard-size must be at least 1")
    if options.normalize not in ("none", "l2"):
        raise IndexJobError(f"--normalize must be none or l2, got {options.normalize!r}")
    if options.heatmaps and not extractor.manifest.data.get("heatmaps"):
        raise IndexJobError(
            "--heatmaps needs an engine exported with `interactive export --heatmaps`"
        )
    unknown = [t for t in options.layers or [] if t not in extractor.layers]
    if unknown:
        raise IndexJobError(f"--layers {unknown}: not in this engine ({extractor.layers})")


def run_manifest(source: Path, engine: EngineManifest, options: IndexOptions) -> dict[str, Any]:
    """The settings a rerun must repeat to resume OUTDIR (written as _manifest.json)."""
    return {
        "source": str(source),
        "options": asdict(options),
        "engine": {
            "directory": str(engine.directory),
            "export": engine.data["export"],
            "weights_sha256": engine.data["weights"].get("sha256"),
            "layers": engine.data["layers"],
        },
        "package_version": package_version(),
    }


def prepare_outdir(out: Path, run: dict[str, Any], overwrite: bool) -> None:
    """Refuse an OUTDIR holding another job's output, unless `overwrite` clears it."""
    previous = out / RUN_MANIFEST
    if previous.exists():
        old = json.loads(previous.read_text())
        same = all(old.get(k) == run[k] for k in ("source", "options", "engine"))
        if not same and not overwrite:
            raise IndexJobError(
                f"{out} holds the output of another job (different source, engine or options: "
                f"see {previous}); rerun the same command to resume, use another -o, or pass "
                "--overwrite to replace it"
            )
        if not same:
            for part in out.glob("part-*.parquet"):
                part.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(previous, {**run, "result": None})
    except OSError as err:
        raise IndexJobError(f"cannot write to -o {out}: {err.strerror or err}") from err


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` atomically with `data` as JSON."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Dry run


def dry_run(source: Path, engine: Path, options: IndexOptions) -> dict[str, Any]:
    """Headers only: the bucket histogram, unreadable inputs, the buckets the engine lacks."""
    manifest = EngineManifest.load(engine)
    histogram: Counter = Counter()
    unreadable = 0
    for path in limited(iter_sources(source, options.path_column), options.limit):
        try:
            histogram[manifest.bucket_for(*image_size(path))] += 1
        except ImageError:
            unreadable += 1
    missing = sorted(b for b in histogram if b not in set(manifest.buckets))
    return {
        "images": sum(histogram.values()) + unreadable,
        "unreadable": unreadable,
        "buckets": {format_size(b): n for b, n in histogram.most_common()},
        "missing": [format_size(b) for b in missing],
        "export_command": manifest.export_command(missing) if missing else None,
    }


# ------------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A tqdm bar on a terminal, a log line every 10 s otherwise."""

    def __init__(self, enabled: bool | None, count: Callable[[], int]) -> None:
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", dynamic_ncols=True, smoothing=0.1)
            # The total (for the ETA) comes from a second, streaming pass over SOURCE in the
            # background, so that a million-file tree starts at once.
            threading.Thread(target=self._set_total, args=(count,), daemon=True).start()
        self.done = self.errors = 0
        self.started = self.last = time.perf_counter()

    def _set_total(self, count: Callable[[], int]) -> None:
        try:
            self.bar.total = count()
            self.bar.refresh()
        except Exception:  # the ETA is a nicety; the job must not depend on it
            pass

    def skip(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def track(
        self, stream: Iterator[tuple[int, PreparedImage | str]]
    ) -> Iterator[tuple[int, PreparedImage | str]]:
        for item in stream:
            self.done += 1
            self.errors += isinstance(item[1], str)
            self._show()
            yield item

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= 10:  # plain lines for logs and pipes, whatever the log level
            rate = self.done / (now - self.started)
            print(
                f"index: {self.done} images decoded, {self.errors} errors, {rate:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
