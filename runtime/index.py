"""`interactive index`: a collection -> sharded Parquet features, resumable, safe on bad input.

The job, once for every executor. SOURCE (runtime/index_sources.py) is streamed in a stable order
and cut into shards of `shard_size` consecutive inputs. Shard k is `part-0000k.parquet`, written
under a temporary name and renamed when complete, so after a crash (even `kill -9`) a rerun skips
the finished shards without reading their images and redoes the rest: every input ends up in
exactly one row. The job validates the options against the engine's manifest, keeps the run
manifest (`_manifest.json`), writes the shards and the report; an `Executor` only turns the
pending shards' paths into output rows (`shard_rows`): `LocalExecutor` (runtime/index_local.py,
decoding processes on this machine) or `RayExecutor` (runtime/ray_index.py, a Ray cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from .api import Features
from .atomic import write_json
from .buckets import format_size
from .images import ImageError, PreparedImage, image_size, prepare_image
from .index_sources import IndexJobError, iter_sources, limited
from .manifest import EngineManifest, package_version
from .parquet import features_table, write_table
from .settings import NORMALIZATIONS

RUN_MANIFEST = "_manifest.json"
log = logging.getLogger("interactive")


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


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` items (the last may be shorter): how shards are cut."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# ------------------------------------------------------------------------------------------------
# What an executor is given and gives back


class Shard(NamedTuple):
    """A shard still to do: its index k (it becomes shard_name(k)) and its inputs, in order."""

    k: int
    paths: list[str]


class Progress:
    """What the job shows while it runs; this one shows nothing (an executor's own, e.g. Ray
    Data's bars, or none). The local executor's draws a bar or logs lines (index_local.py)."""

    def skip(self, n: int) -> None:
        """n inputs found done (a finished shard)."""

    def track(
        self, stream: Iterator[tuple[int, PreparedImage | str]]
    ) -> Iterator[tuple[int, PreparedImage | str]]:
        """Pass decoded items through, counting them."""
        return stream

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ShardWork:
    """The job's side of a run, as an executor needs it."""

    engine: Path  # the engine directory (workers open it by path)
    manifest: EngineManifest
    options: IndexOptions
    progress: bool | None  # as asked (None: a bar on a terminal)
    bar: Progress  # what the executor's `progress` made for this run


Results = Generator[tuple[int, pa.Table], None, None]


class Executor(ABC):
    """Moves the pending shards' images to an engine and their output rows back.

    The job does everything else (listing, shards, resume, manifest, writing, the report).
    """

    @abstractmethod
    def run(self, work: ShardWork, shards: Iterable[Shard]) -> Results:
        """Yield (k, shard_rows of shard k's inputs, in input order) for each shard, in any order,
        once it is whole. `shards` is lazy: it reads finished shards off disk as it goes."""

    def progress(self, enabled: bool | None, count: Callable[[], int]) -> Progress:
        """The progress display for one run (`count()` lists SOURCE again, for a total)."""
        return Progress()

    def check(self, manifest: EngineManifest) -> None:
        """Raise, before OUTDIR is touched, when this executor cannot run `manifest`'s engine
        (e.g. a backend asked for by name that cannot run here). This one accepts any."""
        return None


def prepare_or_error(path: str, manifest: EngineManifest) -> PreparedImage | str:
    """The image at its bucket size, or why it cannot be read (any failure is the input's)."""
    try:
        return prepare_image(path, manifest.bucket_for)
    except ImageError as err:
        return str(err)
    except Exception as err:  # a decoder bug must cost one row, never the job
        return f"{path}: unexpected error while decoding: {type(err).__name__}: {err}"


def shard_rows(paths: list[str], features: Features, options: IndexOptions) -> pa.Table:
    """The output rows of `paths` (features_table's columns, ids from the paths), no metadata."""
    return features_table(
        paths,
        features,
        ids=[source_id(p) for p in paths],
        layers=options.layers,
        normalize=options.normalize,
        concat=options.concat,
        heatmaps=options.heatmaps,
    )


# ------------------------------------------------------------------------------------------------
# The job


def run_index(
    source: Path,
    engine: Path,
    out: Path,
    options: IndexOptions,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> IndexReport:
    """Index SOURCE into OUTDIR with `executor` (default: LocalExecutor()); returns what was
    done. Errors in the job itself raise early, before OUTDIR is touched."""
    if executor is None:
        from .index_local import LocalExecutor

        executor = LocalExecutor()
    manifest = EngineManifest.load(engine)
    check_options(options, manifest)
    executor.check(manifest)
    sources = limited(iter_sources(source, options.path_column), options.limit)
    run = run_manifest(source, manifest, options)
    prepare_outdir(out, run, overwrite)
    report = IndexReport()
    started = time.perf_counter()

    def count() -> int:
        return sum(1 for _ in limited(iter_sources(source, options.path_column), options.limit))

    bar = executor.progress(progress, count)
    work = ShardWork(Path(engine), manifest, options, progress, bar)
    metadata = {b"interactive.run": json.dumps(run).encode()}
    pending = _pending(sources, out, options.shard_size, report, bar)
    try:
        with closing(executor.run(work, pending)) as results:
            for k, rows in results:
                write_table(rows.replace_schema_metadata(metadata), out / shard_name(k))
                report.written_shards += 1
                report.processed += rows.num_rows
                report.add(rows)
                log.info("index: wrote %s (%d rows)", shard_name(k), rows.num_rows)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started
    run["result"] = {**asdict(report), "by_bucket": dict(report.by_bucket)}
    write_json(out / RUN_MANIFEST, run)
    return report


def _pending(
    sources: Iterator[str], out: Path, shard_size: int, report: IndexReport, bar: Progress
) -> Iterator[Shard]:
    """The shards not yet on disk; the finished ones are counted into the report instead."""
    for k, paths in enumerate(chunks(sources, shard_size)):
        target = out / shard_name(k)
        if target.exists():
            report.skipped_shards += 1
            report.add(pq.read_table(target, columns=["status", "bucket"]))
            bar.skip(len(paths))
            continue
        yield Shard(k, paths)


def check_options(options: IndexOptions, manifest: EngineManifest) -> None:
    """Raise IndexJobError when the options ask for what the engine cannot give (from its
    manifest: no backend is opened)."""
    if options.batch_size < 1 or options.shard_size < 1:
        raise IndexJobError("--batch-size and --shard-size must be at least 1")
    if options.normalize not in NORMALIZATIONS:
        raise IndexJobError(f"--normalize must be none or l2, got {options.normalize!r}")
    if options.heatmaps and not manifest.data.get("heatmaps"):
        raise IndexJobError(
            "--heatmaps needs an engine exported with `interactive export --heatmaps`"
        )
    unknown = [t for t in options.layers or [] if t not in manifest.layers]
    if unknown:
        raise IndexJobError(f"--layers {unknown}: not in this engine ({manifest.layers})")


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
