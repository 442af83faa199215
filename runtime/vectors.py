"""Vectors from extracted features: the paper's post-processing, read shard by shard.

The paper L2-normalises each layer's feature and concatenates the layers; this module does that
(then normalises the concatenation, so that an inner product is a cosine) for the kNN index, the
search and the evaluation, reading an index OUTDIR's ok shards (or one `extract` Parquet file)
one file at a time so memory holds one shard's rows, never the collection. Rows without features
(an `extract` file's failed rows) are skipped and counted; an OUTDIR's failed rows live in
`_errors/` and are counted from there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .api import l2_normalize
from .index import ERRORS_DIR, shard_files
from .index_sources import IndexJobError
from .manifest import is_heatmap
from .parquet import layer_matrix, parquet_file, row_count

# The concatenated column that `--concat` writes.
CONCAT_COLUMN = "features"


@dataclass(frozen=True)
class VectorBatch:
    """One file's usable rows: ids (None for an `extract` file, which has no id column), display
    paths, float32 [N, D] vectors of unit L2 norm, and the `path_bytes` column."""

    ids: list[str] | None
    paths: list[str]
    vectors: np.ndarray
    # The exact bytes of names that are not valid UTF-8 (runtime/parquet.py), else None.
    path_bytes: list[bytes | None] | None = None


def feature_files(source: str | os.PathLike[str]) -> list[Path]:
    """The Parquet files holding features: an OUTDIR's ok shards in shard order, or the file."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise IndexJobError(f"{source}: no such index directory or Parquet file")
    files = [part for part in shard_files(path) if part.parent == path]
    if not files:
        raise IndexJobError(f"{source}: no feature shards (part-NNNNN.parquet) in it")
    return files


def feature_columns(source: str | os.PathLike[str]) -> list[str]:
    """The feature columns of `source` (fixed-size float lists; not the heatmaps)."""
    with open(feature_files(source)[0], "rb") as f:
        schema = parquet_file(f).schema_arrow
    return [
        field.name
        for field in schema
        if pa.types.is_fixed_size_list(field.type) and not is_heatmap(field.name)
    ]


def vector_columns(
    source: str | os.PathLike[str], layers: Sequence[str] | None = None
) -> list[str]:
    """The columns a vector is made of: `layers` as asked (each must be a feature column of
    `source`), else the `--concat` column where there is one, else every layer column."""
    available = feature_columns(source)
    if layers:
        unknown = [layer for layer in layers if layer not in available]
        if unknown:
            raise IndexJobError(
                f"{source}: no feature column {', '.join(unknown)}; it has {', '.join(available)}"
            )
        return list(layers)
    if CONCAT_COLUMN in available:
        return [CONCAT_COLUMN]
    if not available:
        raise IndexJobError(f"{source}: no feature columns")
    return available


def table_vectors(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """float32 [N, D]: each column L2-normalised, side by side, the whole L2-normalised again.
    `table` must have no null features (see `iter_vectors`)."""
    parts = [l2_normalize(layer_matrix(table, column)) for column in columns]
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return l2_normalize(joined).astype(np.float32, copy=False)


def iter_vectors(
    source: str | os.PathLike[str], columns: Sequence[str]
) -> Iterator[tuple[VectorBatch, int]]:
    """(one file's vectors, how many of its rows had no features), file by file."""
    for part in feature_files(source):
        yield file_vectors(part, columns)


def file_vectors(part: str | os.PathLike[str], columns: Sequence[str]) -> tuple[VectorBatch, int]:
    """One feature file's usable rows as vectors, and how many of its rows had no features.
    Reads only the columns it needs (not the heatmaps)."""
    with open(part, "rb") as f:
        reader = parquet_file(f)
        present = reader.schema_arrow.names
        wanted = [c for c in ("id", "path", "path_bytes", "status") if c in present]
        table = reader.read(columns=[*wanted, *columns], use_threads=False)
    names = table.column_names
    kept = usable_rows(table, columns)
    batch = VectorBatch(
        ids=kept["id"].to_pylist() if "id" in names else None,
        paths=kept["path"].to_pylist(),
        vectors=table_vectors(kept, columns),
        path_bytes=kept["path_bytes"].to_pylist() if "path_bytes" in names else None,
    )
    return batch, table.num_rows - kept.num_rows


def usable_rows(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """The rows of `table` whose status is ok (when it has a status column) and whose
    `columns` are all non-null: the rows `table_vectors` can take."""
    usable = pc.and_kleene(
        pc.equal(table["status"], "ok") if "status" in table.column_names else pa.scalar(True),
        _all_valid(table, columns),
    )
    return table.filter(pc.fill_null(usable, False))


def _all_valid(table: pa.Table, columns: Sequence[str]) -> pa.ChunkedArray:
    valid = pc.is_valid(table[columns[0]])
    for column in columns[1:]:
        valid = pc.and_(valid, pc.is_valid(table[column]))
    return valid


def failed_rows(source: str | os.PathLike[str]) -> int:
    """The failed rows an OUTDIR keeps in `_errors/` (0 for a single file: `iter_vectors`
    counts those as it reads)."""
    path = Path(source)
    if path.is_file():
        return 0
    errors = [part for part in shard_files(path) if part.parent.name == ERRORS_DIR]
    return sum(row_count(part) for part in errors)
