"""What `interactive index` reads: the image paths of SOURCE, streamed in a stable order.

SOURCE is a directory tree (image files by suffix, walked in sorted order), a Parquet or CSV file
with a path column, or a text file of paths (one a line; blank lines and `#` comments skipped).

A relative path listed in a text, CSV or Parquet file is relative to that file's folder (as
img2dataset reads them), not to the current directory: it is yielded joined onto the folder of
SOURCE as SOURCE was spelled (`lists/a.txt` listing `x.jpg` yields `lists/x.jpg`; a list in the
current directory yields its entries unchanged), so an entry names the same file, and has the
same id (runtime/index.py `source_id`, of the absolute path), from whatever directory the job
runs. An absolute path is yielded unchanged. Names are str as the OS gives them (undecodable
bytes as surrogateescape), joined with os.path, never resolved through symlinks.
To read another format, add a reader yielding paths in a stable order and dispatch to it in
`iter_sources`; the job (runtime/index.py) cuts whatever it yields into shards.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from .parquet import parquet_file

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif"}
)


class IndexJobError(ValueError):
    """A problem with the job itself (source, output directory, options), found before any work."""


def iter_sources(source: Path, path_column: str = "path") -> Iterator[str]:
    """Image paths of SOURCE in a stable order, streamed (never all listed in memory).

    Problems with SOURCE itself (missing, no such column) raise here, before any work starts.
    """
    suffix = source.suffix.lower()
    if source.is_dir():
        return _walk_images(source)
    if not source.is_file():
        raise IndexJobError(f"SOURCE {str(source)!r} does not exist")
    if suffix in (".parquet", ".csv"):
        columns = _table_columns(source)
        if path_column not in columns:
            raise IndexJobError(f"{source}: no column {path_column!r} (columns: {columns})")
        return (
            _parquet_paths(source, path_column)
            if suffix == ".parquet"
            else _csv_paths(source, path_column)
        )
    return _text_paths(source)


def _walk_images(root: Path) -> Iterator[str]:
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield os.path.join(directory, name)


# Text sources are read as the OS reads names: a byte that is not UTF-8 stays that byte (as
# os.fsdecode does), so a listed name that is not UTF-8 still opens its file.
ENCODING, ERRORS = "utf-8", "surrogateescape"


def _table_columns(source: Path) -> list[str]:
    if source.suffix.lower() == ".parquet":
        with open(source, "rb") as f:  # an open file: pyarrow refuses names that are not UTF-8
            return list(parquet_file(f).schema_arrow.names)
    with open(source, newline="", encoding=ENCODING, errors=ERRORS) as f:
        return next(csv.reader(f), [])


def _folder_of(source: Path) -> str:
    """The folder of a list file as SOURCE spells it ("" for a file in the current directory)."""
    return os.path.dirname(os.fspath(source))


def _resolve(folder: str, entry: str) -> str:
    """A listed path as seen from the current directory: relative ones are under `folder`."""
    if not folder or not entry or os.path.isabs(entry):
        return entry
    return os.path.join(folder, entry)


def _parquet_paths(source: Path, column: str) -> Iterator[str]:
    folder = _folder_of(source)
    with open(source, "rb") as f:
        for batch in parquet_file(f).iter_batches(
            columns=[column], batch_size=4096, use_threads=False
        ):
            yield from (_resolve(folder, str(p)) for p in batch.column(0).to_pylist())


def _csv_paths(source: Path, column: str) -> Iterator[str]:
    folder = _folder_of(source)
    with open(source, newline="", encoding=ENCODING, errors=ERRORS) as f:
        for row in csv.DictReader(f):
            yield _resolve(folder, row[column])


def _text_paths(source: Path) -> Iterator[str]:
    folder = _folder_of(source)
    with open(source, encoding=ENCODING, errors=ERRORS) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                yield _resolve(folder, line.rstrip("\n"))


def limited(sources: Iterator[str], limit: int | None) -> Iterator[str]:
    """The first `limit` sources (all when None)."""
    return sources if limit is None else islice(sources, limit)
