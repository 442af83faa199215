"""Writing features to Parquet: one row per image, one fixed-size float32 list column per layer.

Both outputs (`interactive extract`'s file, `interactive index`'s shards) carry the same file
metadata (`output_metadata`): `interactive.engine`, `interactive.weights`,
`interactive.manifest` and `interactive.run`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .api import Features, check_normalize, l2_normalize
from .atomic import atomic_path
from .buckets import format_size
from .manifest import EngineManifest, heatmap_name
from .paths import display_name, name_bytes


def features_table(
    paths: Sequence[str],
    features: Features,
    metadata: dict[str, str] | None = None,
    *,
    ids: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    normalize: str = "none",
    concat: bool = False,
    heatmaps: bool = False,
) -> pa.Table:
    """Columns [id,] path, path_bytes, width, height, bucket, the features, status.

    `path` is the name as text (`paths.display_name`: a name that is not valid UTF-8 has each
    undecodable byte written `\\xNN`); `path_bytes` is null unless the name is not valid UTF-8,
    and then holds its exact bytes (`os.fsdecode(path_bytes)` opens the file).

    The features are one `fixed_size_list<float32>[D]` column per layer (`layers`, default all),
    each L2-normalised with `normalize="l2"`, or one `features` column with `concat`. Failed rows
    have null features and `status` = the error. A layer's matrix loads back without per-row
    copies (`layer_matrix`). `heatmaps` adds a `<layer>.heatmap` column per layer: the map
    block-averaged to at most HEATMAP_SIDE on its longer side, as a list of rows.
    """
    check_normalize(normalize)
    ok = features.ok
    columns: dict[str, Any] = {} if ids is None else {"id": pa.array(list(ids), pa.string())}
    names = [os.fspath(p) for p in paths]
    columns["path"] = pa.array([display_name(p) for p in names], pa.string())
    columns["path_bytes"] = pa.array([name_bytes(p) for p in names], pa.binary())
    columns["width"] = pa.array([s[0] if s else None for s in features.sizes], pa.int32())
    columns["height"] = pa.array([s[1] if s else None for s in features.sizes], pa.int32())
    columns["bucket"] = pa.array(
        [format_size(b) if b else None for b in features.buckets], pa.string()
    )
    chosen = list(layers) if layers is not None else list(features)
    if concat:
        columns["features"] = _list_column(features.concat(normalize, chosen), ok)
    else:
        for layer in chosen:
            rows = features[layer]
            columns[layer] = _list_column(l2_normalize(rows) if normalize == "l2" else rows, ok)
    if heatmaps:
        for layer in chosen:
            maps = [
                None if m is None else shrink_heatmap(m).tolist() for m in features.heatmaps[layer]
            ]
            columns[heatmap_name(layer)] = pa.array(maps, pa.list_(pa.list_(pa.float32())))
    columns["status"] = pa.array(
        [display_name(features.errors.get(i, "ok")) for i in range(len(paths))], pa.string()
    )
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(
            {k.encode(): display_name(v).encode() for k, v in metadata.items()}
        )
    return table


# The columns of a row that failed (the others are its features, null): what an index's error
# shards keep (runtime/index.py).
STATUS_COLUMNS = ("id", "path", "sha256", "path_bytes", "width", "height", "bucket", "status")


def split_status(table: pa.Table, carried: Iterable[str] = ()) -> tuple[pa.Table, pa.Table]:
    """(the rows whose status is ok, the others with STATUS_COLUMNS and `carried` only: the
    columns SOURCE gave them, `interactive index --columns`)."""
    ok = pc.equal(table["status"], "ok")
    failed = table.filter(pc.invert(ok))
    keep = set(STATUS_COLUMNS) | set(carried)
    return table.filter(ok), failed.select([c for c in table.column_names if c in keep])


def output_metadata(manifest: EngineManifest, run: dict[str, Any]) -> dict[bytes, bytes]:
    """The file metadata of every output: the engine directory, its weights' source, its
    manifest (less the weights and bucket records) and `run` (what made the file), as JSON."""
    data = manifest.data
    engine = {k: v for k, v in data.items() if k not in ("weights", "buckets")}
    return {
        b"interactive.engine": display_name(os.fspath(manifest.directory)).encode(),
        b"interactive.weights": display_name(str(data["weights"]["source"])).encode(),
        b"interactive.manifest": json.dumps(engine, default=str).encode(),
        b"interactive.run": json.dumps(run, default=str).encode(),
    }


HEATMAP_SIDE = 32


def shrink_heatmap(heatmap: np.ndarray, max_side: int = HEATMAP_SIDE) -> np.ndarray:
    """Average f x f blocks (f the smallest factor bringing the longer side to <= max_side)."""
    h, w = heatmap.shape
    f = -(-max(h, w) // max_side)
    if f <= 1:
        return heatmap.astype(np.float32)
    out_h, out_w = -(-h // f), -(-w // f)
    sums = np.zeros((out_h * f, out_w * f), np.float64)
    counts = np.zeros_like(sums)
    sums[:h, :w], counts[:h, :w] = heatmap, 1.0  # edge blocks average their real cells only
    block = (out_h, f, out_w, f)
    return (sums.reshape(block).sum((1, 3)) / counts.reshape(block).sum((1, 3))).astype(np.float32)


def _list_column(rows: np.ndarray, ok: np.ndarray) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, rows.shape[1], mask=pa.array(~ok))


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write to a temporary name beside `path` and rename: readers never see a partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        # An open file, not the name: pyarrow refuses a name that is not valid UTF-8.
        pq.write_table(table, f)
    return target


def parquet_file(f: BinaryIO) -> pq.ParquetFile:
    """An open file as a synchronous Parquet reader, the one way this project reads Parquet.

    Synchronous because pyarrow's asynchronous paths (`pq.read_table`'s dataset scanner and
    `pre_buffer`) can leave a task in Arrow's thread pools that aborts the interpreter at exit
    with "terminate called without an active exception" (apache/arrow#39862; measured here with
    pyarrow 26: 72 of 300 short processes that read three files with `pq.read_table` aborted,
    none of 1000 with this reader)."""
    return pq.ParquetFile(f, pre_buffer=False)


def row_count(path: str | os.PathLike[str]) -> int:
    """A Parquet file's rows, from its footer (no data read)."""
    with open(path, "rb") as f:
        return int(parquet_file(f).metadata.num_rows)


def read_table(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read through an open file (as write_table writes it): any name the OS
    allows, UTF-8 or not."""
    with open(path, "rb") as f:
        return parquet_file(f).read(columns=columns, use_threads=False)


def layer_matrix(table: pa.Table, layer: str) -> np.ndarray:
    """float32 [N, D] of one layer column, null rows as NaN; no copy when there are no nulls."""
    column = table[layer].combine_chunks()
    size = column.type.list_size
    # .values keeps the slots of null rows (flatten() would drop them); mind a sliced column.
    values = column.values.slice(column.offset * size, len(column) * size)
    rows = values.to_numpy(zero_copy_only=False).reshape(-1, size)
    if column.null_count:
        rows = rows.copy()
        rows[~column.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return rows
