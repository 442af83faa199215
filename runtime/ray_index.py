"""`interactive index --ray`: the same job on a Ray cluster, with the same output.

Ray Data runs the two heavy stages: decoding and resizing in CPU tasks (`map_batches` over blocks
of paths), extraction in a pool of actors (`map_batches` with a callable class that opens the
engine once; one GPU each when the cluster has GPUs). The driver lists SOURCE and cuts shards
exactly as the local job does (`iter_sources`, `shard_size` consecutive inputs), consumes the
result stream and writes each shard with the local job's writer once all its rows have arrived:

- a shard on disk is complete (temporary name + rename), so a rerun resumes like the local job
  (and a local rerun can resume a Ray run's OUTDIR, and the other way round);
- a lost actor is restarted by Ray and its batch retried (`max_restarts`, `max_task_retries`);
  the driver keeps the first copy of each (shard, position), so a retry can never duplicate a row;
- a bad image is a status row made by the decoding task, never a failed task.

Only this module imports ray, and only inside functions: `pip install 'interactive[ray]'`.
Engines reach the workers by path: the engine directory (and the images) must be readable at the
same path on every node (shared filesystem, or a copy per node, see the README). Actors on one
node share the memory-mapped weights file through the page cache.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .api import Extractor
from .images import PreparedImage
from .index import (
    RUN_MANIFEST,
    IndexJobError,
    IndexOptions,
    IndexReport,
    check_layers,
    chunks,
    iter_sources,
    limited,
    prepare_or_error,
    prepare_outdir,
    run_manifest,
    shard_name,
    source_id,
    write_json,
)
from .manifest import EngineManifest
from .parquet import features_table, write_table

log = logging.getLogger("interactive")

# Rows per Ray batch sent to an actor, in engine batches: the actor groups a Ray batch's rows by
# bucket (batches_by_bucket), so a few engine batches' worth keeps most engine batches full.
ENGINE_BATCHES_PER_RAY_BATCH = 4
DECODE_TASK_MEMORY = 256 * 2**20
SHARD, POSITION = "_shard", "_position"  # where a row goes; dropped before writing

DECODED = pa.schema(
    [
        (SHARD, pa.int64()),
        (POSITION, pa.int64()),
        ("path", pa.string()),
        ("pixels", pa.large_binary()),  # HxWx3 uint8 at the bucket size; null on error
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bucket_width", pa.int32()),
        ("bucket_height", pa.int32()),
        ("error", pa.string()),
    ]
)


def ray_module() -> Any:
    """`ray`, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError(f"--ray needs Ray Data ({err}): pip install 'interactive[ray]'") from err
    return ray


# ------------------------------------------------------------------------------------------------
# The two stages (they run in Ray workers)


@lru_cache(maxsize=4)
def _manifest(engine: str) -> EngineManifest:
    return EngineManifest.load(engine)


def decode_block(paths: pa.Table, engine: str) -> pa.Table:
    """Decode and resize a block of (shard, position, path) rows; failures become `error`."""
    manifest = _manifest(engine)
    rows: dict[str, list[Any]] = {name: [] for name in DECODED.names}
    for path in paths["path"].to_pylist():
        item = prepare_or_error(path, manifest)
        values: tuple[Any, ...]
        if isinstance(item, PreparedImage):
            values = (item.pixels.tobytes(), item.width, item.height, *item.bucket, None)
        else:
            values = (None, None, None, None, None, item)
        rows["path"].append(path)
        for name, value in zip(DECODED.names[3:], values, strict=True):
            rows[name].append(value)
    rows[SHARD] = paths[SHARD].to_pylist()
    rows[POSITION] = paths[POSITION].to_pylist()
    return pa.table(rows, schema=DECODED)


def _prepared(row: dict[str, Any]) -> PreparedImage | str:
    if row["error"] is not None:
        return str(row["error"])
    w, h = row["bucket_width"], row["bucket_height"]
    pixels = np.frombuffer(row["pixels"], np.uint8).reshape(h, w, 3)
    return PreparedImage(pixels, row["width"], row["height"], (w, h))


class ExtractFeatures:
    """A Ray Data actor: opens the engine once, turns decoded rows into output rows.

    The rows it returns are the local job's (`features_table`) plus the shard and position
    columns the driver needs to put them in place.
    """

    def __init__(self, engine: str, backend: str, options: dict[str, Any]) -> None:
        self.extractor = Extractor.open(engine, backend=backend)
        self.options = IndexOptions(**options)

    def __call__(self, decoded: pa.Table) -> pa.Table:
        rows = decoded.to_pylist()
        items = ((i, _prepared(row)) for i, row in enumerate(rows))
        features = self.extractor.extract_prepared(items, len(rows), self.options.batch_size)
        paths = [row["path"] for row in rows]
        table = features_table(
            paths,
            features,
            ids=[source_id(p) for p in paths],
            layers=self.options.layers,
            normalize=self.options.normalize,
            concat=self.options.concat,
            heatmaps=self.options.heatmaps,
        )
        return table.append_column(SHARD, decoded[SHARD]).append_column(POSITION, decoded[POSITION])


# ------------------------------------------------------------------------------------------------
# The driver


class _ShardWriter:
    """Collects each shard's rows as they arrive (any order, retries too); writes it when whole."""

    def __init__(self, out: Path, sizes: dict[int, int], run: dict[str, Any], report: IndexReport):
        self.out, self.sizes, self.report = out, sizes, report
        self.metadata = {b"interactive.run": json.dumps(run).encode()}
        self.pieces: dict[int, list[pa.Table]] = {k: [] for k in sizes}
        self.seen: dict[int, set[int]] = {k: set() for k in sizes}

    def add(self, rows: pa.Table) -> None:
        for k in pc.unique(rows[SHARD]).to_pylist():
            part = rows.filter(pc.equal(rows[SHARD], k))
            fresh = [p not in self.seen[k] for p in part[POSITION].to_pylist()]
            part = part.filter(pa.array(fresh))  # a retried batch's rows already stored
            self.seen[k].update(part[POSITION].to_pylist())
            self.pieces[k].append(part)
            if len(self.seen[k]) == self.sizes[k]:
                self._write(k)

    def _write(self, k: int) -> None:
        table = pa.concat_tables(self.pieces.pop(k)).sort_by(POSITION)
        table = table.drop_columns([SHARD, POSITION]).combine_chunks()
        write_table(table.replace_schema_metadata(self.metadata), self.out / shard_name(k))
        self.report.written_shards += 1
        self.report.processed += table.num_rows
        self.report.add(table)
        log.info("index: wrote %s (%d rows)", shard_name(k), table.num_rows)

    @property
    def missing(self) -> list[int]:
        return sorted(self.pieces)


def run_ray_index(
    source: Path,
    engine: Path,
    out: Path,
    options: IndexOptions,
    *,
    address: str | None = None,
    actors: int = 1,
    backend: str = "auto",
    gpus_per_actor: float | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> IndexReport:
    """`run_index` on Ray: same SOURCE listing, shards, schema, manifest and resume.

    `address`: None starts a local Ray instance (unless this process already called
    `ray.init`), "auto" joins the cluster this machine belongs to, "ray://host:10001" goes
    through Ray Client. `actors`: extraction actors; `gpus_per_actor` defaults to 1 when the
    cluster has GPUs, else 0. The driver (this process) lists SOURCE and writes OUTDIR, so OUTDIR
    is on the driver's filesystem; ENGINE and the images must be readable on every node.
    """
    if actors < 1:
        raise IndexJobError(f"--actors must be at least 1, got {actors}")
    with Extractor.open(engine, backend="ort") as checker:  # opens no session: checks only
        check_layers(options, checker)
        run = run_manifest(source, checker.manifest, options)
    sources = limited(iter_sources(source, options.path_column), options.limit)
    prepare_outdir(out, run, overwrite)
    report = IndexReport()
    started = time.perf_counter()
    blocks, sizes = _pending(sources, out, options, report)
    if sizes:
        writer = _ShardWriter(out, sizes, run, report)
        ray = ray_module()
        owned = not ray.is_initialized()
        if owned:
            ray.init(address=address, logging_level=logging.WARNING)
        try:
            stream = _results(
                ray, blocks, engine, options,
                backend=backend, actors=actors, gpus_per_actor=gpus_per_actor, progress=progress,
            )  # fmt: skip
            for rows in stream:
                writer.add(rows)
        finally:
            if owned:
                ray.shutdown()
        if writer.missing:  # Ray returned without some rows: never write a partial shard
            raise RuntimeError(f"Ray lost the rows of shards {writer.missing}; rerun to resume")
    report.seconds = time.perf_counter() - started
    run["result"] = {**asdict(report), "by_bucket": dict(report.by_bucket)}
    write_json(out / RUN_MANIFEST, run)
    return report


def _pending(
    sources: Iterator[str], out: Path, options: IndexOptions, report: IndexReport
) -> tuple[list[pa.Table], dict[int, int]]:
    """Blocks of (shard, position, path) rows still to do, and each pending shard's size."""
    block_rows = options.batch_size * ENGINE_BATCHES_PER_RAY_BATCH
    blocks: list[pa.Table] = []
    sizes: dict[int, int] = {}
    for k, paths in enumerate(chunks(sources, options.shard_size)):
        target = out / shard_name(k)
        if target.exists():
            report.skipped_shards += 1
            report.add(pq.read_table(target, columns=["status", "bucket"]))
            continue
        sizes[k] = len(paths)
        for start in range(0, len(paths), block_rows):
            chunk = paths[start : start + block_rows]
            positions = list(range(start, start + len(chunk)))
            blocks.append(pa.table({SHARD: [k] * len(chunk), POSITION: positions, "path": chunk}))
    return blocks, sizes


def _results(
    ray: Any,
    blocks: list[pa.Table],
    engine: Path,
    options: IndexOptions,
    *,
    backend: str,
    actors: int,
    gpus_per_actor: float | None,
    progress: bool | None,
) -> Iterator[pa.Table]:
    """The output rows (features_table's columns + shard and position), in arrival order."""
    context = ray.data.DataContext.get_current()
    if progress is not None:
        context.enable_progress_bars = progress
    resources = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    cpus = resources.get("CPU", 0)
    if actors > cpus - 1:  # each actor takes a CPU: decoding tasks would wait forever
        raise IndexJobError(
            f"--actors {actors} would take all {cpus:g} CPUs of the Ray cluster and leave none "
            f"for decoding; use at most {max(int(cpus) - 1, 0)} (or add nodes)"
        )
    dataset = ray.data.from_arrow(blocks)
    decoded = dataset.map_batches(
        decode_block,
        fn_kwargs={"engine": str(engine)},
        batch_format="pyarrow",
        batch_size=None,  # one block of paths per task
        # What a decoding task holds at most (a large photo being decoded, a block of resized
        # images): Ray packs no more decoders on a node than its memory fits. Being a resource
        # shape the actors do not have, it also keeps Ray Data from fusing decoding into the
        # actors, where it would keep a GPU waiting.
        memory=DECODE_TASK_MEMORY,
    )
    features = decoded.map_batches(
        ExtractFeatures,
        fn_constructor_kwargs={
            "engine": str(engine),
            "backend": backend,
            "options": asdict(options),
        },
        batch_format="pyarrow",
        batch_size=options.batch_size * ENGINE_BATCHES_PER_RAY_BATCH,
        # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a
        # killed actor is restarted and its batches are retried (the writer drops duplicates).
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
    )
    yield from features.iter_batches(batch_format="pyarrow", batch_size=None)
