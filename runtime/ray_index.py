"""`interactive index --ray`: the Ray executor of the index job (runtime/index.py), same output.

Ray Data runs the two heavy stages: decoding and resizing in CPU tasks (`map_batches` over blocks
of paths), extraction in a pool of actors (`map_batches` with a callable class that opens the
engine once; one GPU each when the cluster has GPUs). The job (this process, the driver) lists
SOURCE and plans the shards (ids, numbers, removals) exactly as for the local executor; this
executor sends the pending shards' paths (and where their bytes are: a URL, a tar member's byte
range; read by the decoding task) through Ray, keeps SOURCE's carried columns (`--columns`, a
tar sample's json/cls/txt) on the driver, reassembles the result stream by (shard,
position) and hands each shard back to the job, which writes it, once all its rows have arrived:

- a shard on disk is complete (temporary name + rename), so a rerun resumes like a local run
  (and a local rerun can resume a Ray run's OUTDIR, and the other way round);
- a lost actor is restarted by Ray and its batch retried (`max_restarts`, `max_task_retries`);
  the driver keeps the first copy of each (shard, position), so a retry can never duplicate a row;
- a bad image is a status row made by the decoding task, never a failed task.

Only this module imports ray, and only inside functions: `pip install 'interactive-features[ray]'`.
Engines reach the workers by path: the engine directory (and the images) must be readable at the
same path on every node (shared filesystem, or a copy per node, see the README). Actors on one
node share the memory-mapped weights file through the page cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .api import Extractor
from .images import PreparedImage
from .index import (
    Executor,
    IndexJobError,
    IndexOptions,
    Results,
    Shard,
    ShardWork,
    prepare_input,
    shard_rows,
    with_carried,
)
from .inputs import Where
from .manifest import EngineManifest
from .optional import optional_import

# Rows per Ray batch sent to an actor, in engine batches: the actor groups a Ray batch's rows by
# bucket (batches_by_bucket), so a few engine batches' worth keeps most engine batches full.
ENGINE_BATCHES_PER_RAY_BATCH = 4
DECODE_TASK_MEMORY = 256 * 2**20
SHARD, POSITION = "_shard", "_position"  # where a row goes; dropped before writing

DECODED = pa.schema(
    [
        (SHARD, pa.int64()),
        (POSITION, pa.int64()),
        ("id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),  # with --content-hash: of the file's bytes, read by this task
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
    return optional_import("ray", "--ray needs Ray Data", "pip install 'interactive-features[ray]'")


# ------------------------------------------------------------------------------------------------
# The two stages (they run in Ray workers)


@lru_cache(maxsize=4)
def _manifest(engine: str) -> EngineManifest:
    return EngineManifest.load(engine)


def decode_block(paths: pa.Table, engine: str, content_hash: bool = False) -> pa.Table:
    """Decode and resize a block of (shard, position, id, path[, where, listing error]) rows
    (_blocks); failures become `error`."""
    manifest = _manifest(engine)
    rows: dict[str, list[Any]] = {name: [] for name in DECODED.names}
    wheres, errors = _locations(paths)
    for path, where, error in zip(paths["path"].to_pylist(), wheres, errors, strict=True):
        item, digest = prepare_input(path, manifest, content_hash, where, error)
        values: tuple[Any, ...]
        if isinstance(item, PreparedImage):
            values = (item.pixels.tobytes(), item.width, item.height, *item.bucket, None)
        else:
            values = (None, None, None, None, None, item)
        rows["path"].append(path)
        rows["sha256"].append(digest)
        for name, value in zip(DECODED.names[5:], values, strict=True):
            rows[name].append(value)
    for name in (SHARD, POSITION, "id"):
        rows[name] = paths[name].to_pylist()
    return pa.table(rows, schema=DECODED)


LOCATION = ("url", "offset", "size", "header", "listing_error")  # block columns: where, error


# What a decoding task is sent: where each row goes, its id and path, where its bytes are.
BLOCK = pa.schema(
    [
        (SHARD, pa.int64()),
        (POSITION, pa.int64()),
        ("id", pa.string()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("header", pa.int64()),
        ("listing_error", pa.string()),
    ]
)


def _locations(block: pa.Table) -> tuple[list[Where | None], list[str | None]]:
    url, offset, size, header, error = (block[c].to_pylist() for c in LOCATION)
    wheres = [
        None if u is None else Where(u, o, n, h)
        for u, o, n, h in zip(url, offset, size, header, strict=True)
    ]
    return wheres, error


def _prepared(row: dict[str, Any]) -> PreparedImage | str:
    if row["error"] is not None:
        return str(row["error"])
    w, h = row["bucket_width"], row["bucket_height"]
    pixels = np.frombuffer(row["pixels"], np.uint8).reshape(h, w, 3)
    return PreparedImage(pixels, row["width"], row["height"], (w, h))


class ExtractFeatures:
    """A Ray Data actor: opens the engine once, turns decoded rows into output rows.

    The rows it returns are the local executor's (`shard_rows`) plus the shard and position
    columns the driver needs to put them in place.
    """

    def __init__(self, engine: str, backend: str, options: dict[str, Any]) -> None:
        self.extractor = Extractor.open(engine, backend=backend)
        self.options = IndexOptions(**options)

    def __call__(self, decoded: pa.Table) -> pa.Table:
        rows = decoded.to_pylist()
        items = ((i, _prepared(row)) for i, row in enumerate(rows))
        features = self.extractor.extract_prepared(items, len(rows), self.options.batch_size)
        paths, ids = [row["path"] for row in rows], [row["id"] for row in rows]
        hashes = [row["sha256"] for row in rows]
        table = shard_rows(paths, ids, features, self.options, hashes)
        return table.append_column(SHARD, decoded[SHARD]).append_column(POSITION, decoded[POSITION])


# ------------------------------------------------------------------------------------------------
# The driver


class RayExecutor(Executor):
    """The pending shards through Ray Data: decoding tasks, then `actors` extraction actors.

    `address`: None starts a local Ray instance (unless this process already called
    `ray.init`), "auto" joins the cluster this machine belongs to, "ray://host:10001" goes
    through Ray Client. `gpus_per_actor` defaults to 1 when the cluster has GPUs, else 0. The
    driver (this process) lists SOURCE and writes OUTDIR, so OUTDIR is on the driver's
    filesystem; ENGINE and the images must be readable on every node.
    """

    def __init__(
        self,
        address: str | None = None,
        actors: int = 1,
        backend: str = "auto",
        gpus_per_actor: float | None = None,
    ) -> None:
        if actors < 1:
            raise IndexJobError(f"--actors must be at least 1, got {actors}")
        self.address, self.actors = address, actors
        self.backend, self.gpus_per_actor = backend, gpus_per_actor

    def run(self, work: ShardWork, shards: Iterable[Shard]) -> Results:
        carried: dict[int, pa.Table] = {}
        blocks, sizes = _blocks(shards, work.options, carried)
        if not sizes:  # nothing to do: no Ray
            return
        shelf = _Reassembly(sizes, carried)
        ray = ray_module()
        owned = not ray.is_initialized()
        if owned:
            ray.init(address=self.address, logging_level=logging.WARNING)
        try:
            for rows in _results(ray, blocks, work, self):
                yield from shelf.add(rows)
        finally:
            if owned:
                ray.shutdown()
        if shelf.missing:  # Ray returned without some rows: never hand back a partial shard
            raise RuntimeError(f"Ray lost the rows of shards {shelf.missing}; rerun to resume")


class _Reassembly:
    """Collects each shard's rows as they arrive (any order, retries too); whole shards out."""

    def __init__(self, sizes: dict[int, int], carried: dict[int, pa.Table] | None = None) -> None:
        self.sizes, self.carried = sizes, carried or {}
        self.pieces: dict[int, list[pa.Table]] = {k: [] for k in sizes}
        self.seen: dict[int, set[int]] = {k: set() for k in sizes}

    def add(self, rows: pa.Table) -> Iterator[tuple[int, pa.Table]]:
        """The shards these rows complete, in input order, without the shard/position columns."""
        for k in pc.unique(rows[SHARD]).to_pylist():
            if k not in self.pieces:  # whole already: a late retry's copy
                continue
            part = rows.filter(pc.equal(rows[SHARD], k))
            fresh = [p not in self.seen[k] for p in part[POSITION].to_pylist()]
            part = part.filter(pa.array(fresh))  # a retried batch's rows already stored
            self.seen[k].update(part[POSITION].to_pylist())
            self.pieces[k].append(part)
            if len(self.seen[k]) == self.sizes[k]:
                table = pa.concat_tables(self.pieces.pop(k)).sort_by(POSITION)
                table = table.drop_columns([SHARD, POSITION]).combine_chunks()
                # SOURCE's carried columns stayed on the driver
                yield k, with_carried(table, self.carried.pop(k, None))

    @property
    def missing(self) -> list[int]:
        return sorted(self.pieces)


def _blocks(
    shards: Iterable[Shard], options: IndexOptions, carried: dict[int, pa.Table]
) -> tuple[list[pa.Table], dict[int, int]]:
    """Blocks of (shard, position, id, path[, LOCATION]) rows to send, and each pending shard's
    size; each shard's carried columns into `carried`."""
    block_rows = options.batch_size * ENGINE_BATCHES_PER_RAY_BATCH
    blocks: list[pa.Table] = []
    sizes: dict[int, int] = {}
    for k, paths, ids, wheres, errors, extra in shards:
        sizes[k] = len(paths)
        if extra is not None:
            carried[k] = extra
        for start in range(0, len(paths), block_rows):
            end = min(start + block_rows, len(paths))
            columns: dict[str, list[Any]] = {
                SHARD: [k] * (end - start),
                POSITION: list(range(start, end)),
                "id": ids[start:end],
                "path": paths[start:end],
            }
            part = wheres[start:end]
            columns["url"] = [w.url if w else None for w in part]
            columns["offset"] = [w.offset if w else None for w in part]
            columns["size"] = [w.size if w else None for w in part]
            columns["header"] = [w.header if w else None for w in part]
            columns["listing_error"] = errors[start:end]
            blocks.append(pa.table(columns, schema=BLOCK))
    return blocks, sizes


def _results(
    ray: Any, blocks: list[pa.Table], work: ShardWork, executor: RayExecutor
) -> Iterator[pa.Table]:
    """The output rows (shard_rows' columns + shard and position), in arrival order."""
    engine, options, actors = work.engine, work.options, executor.actors
    context = ray.data.DataContext.get_current()
    if work.progress is not None:
        context.enable_progress_bars = work.progress
    resources = ray.cluster_resources()
    gpus_per_actor = executor.gpus_per_actor
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
        fn_kwargs={"engine": str(engine), "content_hash": options.content_hash},
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
            "backend": executor.backend,
            "options": asdict(options),
        },
        batch_format="pyarrow",
        batch_size=options.batch_size * ENGINE_BATCHES_PER_RAY_BATCH,
        # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a
        # killed actor is restarted and its batches are retried (_Reassembly drops duplicates).
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
    )
    yield from features.iter_batches(batch_format="pyarrow", batch_size=None)
