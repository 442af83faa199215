"""What `interactive index` reads: the inputs of SOURCE, streamed in a stable order.

SOURCE is one of:

- a directory tree (image files by suffix, walked in sorted order);
- a Parquet or CSV file with a path column, or a text file of paths (one a line; blank lines and
  `#` comments skipped): a *list*. An entry is an image file, a URL (runtime/remote.py) or a tar
  shard; `columns` carries the list's other columns into the rows (Parquet keeps their types, CSV
  gives strings);
- a WebDataset tar shard (`data.tar`), a brace pattern of them (`data-{000000..000009}.tar`,
  expanded here as WebDataset does), each read member by member (runtime/tar_inputs.py);
- any of these files as a URL (`https://.../list.parquet`, `s3://bucket/data-000000.tar`), or
  an object-store folder (`s3://bucket/photos/`, the trailing `/` says folder): its image
  objects, sorted, each keyed by its URL and the listing's ETag and size.

A relative path listed in a list is relative to that list's folder (as img2dataset reads them),
not to the current directory: it is yielded joined onto the folder of SOURCE as SOURCE was
spelled (`lists/a.txt` listing `x.jpg` yields `lists/x.jpg`; a list in the current directory
yields its entries unchanged), so an entry names the same file, and has the same id (the hash of
the absolute path), from whatever directory the job runs; in a remote list it is relative to the
list's URL. An absolute path or a URL is yielded unchanged. Names are str as the OS gives them
(undecodable bytes as surrogateescape), joined with os.path, never resolved through symlinks.

A list holds images or tars: which, its first entry says. In a list of tars every member row gets
the `json`, `cls` and `txt` columns, and an image entry gets them null; a tar entry in a list of
images is an error row (list the tars in a list of their own).

To read another format, add a reader yielding Inputs in a stable order and dispatch to it in
`open_source`; the job (runtime/index.py) cuts whatever it yields into shards.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from .inputs import IMAGE_SUFFIXES, Input, Where
from .parquet import parquet_file
from .paths import display_name
from .remote import FetchError, content_tag, fsspec_module, is_url, list_objects, open_url
from .tar_inputs import FIELDS, check_tar, is_tar, tar_inputs

__all__ = [
    "IMAGE_SUFFIXES", "ColumnsError", "IndexJobError", "Source", "iter_sources", "open_source"
]  # fmt: skip

LIST_SUFFIXES = (".parquet", ".csv")  # table lists; any other file is a text list
ALL = "all"  # --columns all: every column but the path column


class IndexJobError(ValueError):
    """A problem with the job itself (source, output directory, options), found before any work."""


class ColumnsError(IndexJobError):
    """`--columns` names a column SOURCE lacks or one the output has already: bad usage."""


def absolute_path(path: str) -> str:
    """The normalised absolute form of a path (symlinks kept: a link is its own input)."""
    return os.path.abspath(path)  # abspath normalises (normpath), never resolves links


def identity(name: str) -> str:
    """What names a file or object wherever the job runs: its absolute path, or the URL."""
    return name if is_url(name) else absolute_path(name)


@dataclass
class Source:
    """SOURCE, checked: `inputs()` lists it (again on each call); `carried`: the extra columns
    every row of it gets, in order (each Input's `extras`)."""

    spelled: str
    carried: list[pa.Field]
    inputs: Callable[[], Iterator[Input]]
    kinds: set[str] = field(default_factory=set)  # "files", "tar", "url", "columns": what it holds

    @property
    def identity(self) -> str:
        return identity(self.spelled)


def iter_sources(source: str | os.PathLike[str], path_column: str = "path") -> Iterator[str]:
    """The `path` of each input of SOURCE, in order (problems with SOURCE itself raise here)."""
    return (i.path for i in open_source(source, path_column).inputs())


def open_source(
    source: str | os.PathLike[str],
    path_column: str = "path",
    columns: Sequence[str] | str | None = None,
) -> Source:
    """SOURCE checked (missing, no such column, not a tar: IndexJobError), ready to list.

    `columns`: names of a Parquet or CSV list's columns to carry into the rows, or "all" (every
    column but `path_column`)."""
    spelled = os.fspath(source)
    names = expand_braces(spelled)
    if len(names) > 1 or names[0] != spelled:
        if not all(is_tar(n) for n in names):
            raise IndexJobError(f"SOURCE {spelled!r}: a brace pattern must name .tar shards")
        _no_columns(columns, spelled)
        for name in names:
            _check_tar_source(name)
        return Source(spelled, list(FIELDS), lambda: _tars(names), {"tar"} | _url_kind(spelled))
    if is_tar(spelled):
        _no_columns(columns, spelled)
        _check_tar_source(spelled)
        return Source(spelled, list(FIELDS), lambda: _tars([spelled]), {"tar"} | _url_kind(spelled))
    if is_url(spelled) and spelled.endswith("/"):
        _no_columns(columns, spelled)
        try:
            objects = list_objects(spelled)  # fsspec's find lists all at once anyway
        except FetchError as err:
            raise IndexJobError(f"SOURCE: {err}") from None
        return Source(spelled, [], lambda: _remote_images(objects), {"url"})
    if not is_url(spelled):
        path = Path(spelled)
        if path.is_dir():
            _no_columns(columns, spelled)
            return Source(spelled, [], lambda: _walk_images(path), {"files"})
        if not path.is_file():
            hint = ""
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", spelled):  # Path("s3://b") is s3:/b
                hint = " (a URL whose // was folded? pass a URL as str, not Path)"
            raise IndexJobError(f"SOURCE {spelled!r} does not exist{hint}")
    return _list_source(spelled, path_column, columns)


def _url_kind(name: str) -> set[str]:
    return {"url"} if is_url(name) else set()


def _no_columns(columns: Sequence[str] | str | None, spelled: str) -> None:
    if columns:
        raise ColumnsError(
            f"--columns needs a Parquet or CSV list as SOURCE, not {display_name(spelled)!r}"
        )


def _check_tar_source(name: str) -> None:
    problem = check_tar(name)
    if problem is not None:
        raise IndexJobError(f"SOURCE {display_name(name)!r}: {problem}")


def _tars(names: list[str]) -> Iterator[Input]:
    for name in names:
        yield from tar_inputs(name, name, identity(name))


# ------------------------------------------------------------------------------------------------
# Brace patterns (WebDataset's shard lists)

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept, as wide as the
    first bound); `{x,y}` -> x, y; several braces multiply; no braces -> [pattern]."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    body = match.group(1)
    range_ = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_:
        low, high = range_.groups()
        if int(high) < int(low):
            raise IndexJobError(f"{pattern!r}: the range {{{body}}} is empty")
        choices = [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern]  # a name with literal braces
    return [f"{head}{choice}{rest}" for choice in choices for rest in expand_braces(tail)]


# ------------------------------------------------------------------------------------------------
# Directories


def _walk_images(root: Path) -> Iterator[Input]:
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = os.path.join(directory, name)
                yield Input(path, absolute_path(path))


def _remote_images(objects: list[tuple[str, dict[str, Any]]]) -> Iterator[Input]:
    """The image objects of a remote folder's listing (an object-store prefix ending in `/`),
    sorted; each keyed by its URL and the listing's ETag and size, so that an object replaced
    under the same name is a new input."""
    for url, info in objects:
        if os.path.splitext(url.split("?", 1)[0])[1].lower() in IMAGE_SUFFIXES:
            yield Input(url, f"{url}\0{content_tag(info)}", where=Where(url))


# ------------------------------------------------------------------------------------------------
# Lists

# Text sources are read as the OS reads names: a byte that is not UTF-8 stays that byte (as
# os.fsdecode does), so a listed name that is not UTF-8 still opens its file.
ENCODING, ERRORS = "utf-8", "surrogateescape"


@contextmanager
def _opened(name: str) -> Iterator[BinaryIO]:
    """The list file, local or remote (a failed fetch is the job's error: it is SOURCE)."""
    try:
        f = open_url(name, "rb") if is_url(name) else open(name, "rb")  # noqa: SIM115
    except FetchError as err:
        raise IndexJobError(f"SOURCE: {err}") from None
    with f:
        yield f


def _suffix(name: str) -> str:
    return os.path.splitext(name.split("?", 1)[0])[1].lower()


def _table_columns(name: str) -> list[pa.Field]:
    with _opened(name) as f:
        if _suffix(name) == ".parquet":
            return list(parquet_file(f).schema_arrow)  # an open file: names need not be UTF-8
        header = next(csv.reader(io.TextIOWrapper(f, ENCODING, ERRORS, newline="")), [])
        return [pa.field(c, pa.string()) for c in header]


def _chosen(
    name: str, fields: list[pa.Field], path_column: str, columns: Sequence[str] | str | None
) -> list[pa.Field]:
    """The fields `columns` names (all but the path column for "all")."""
    by_name = {f.name: f for f in fields}
    if columns in (ALL, [ALL], (ALL,)):
        return [f for f in fields if f.name != path_column]
    wanted = [columns] if isinstance(columns, str) else list(columns or [])
    unknown = [c for c in wanted if c not in by_name]
    if unknown:
        available = [f.name for f in fields if f.name != path_column]
        raise ColumnsError(f"--columns {unknown}: not in {name} (its columns: {available})")
    if path_column in wanted:
        raise ColumnsError(f"--columns {path_column!r}: the path column is already `path`")
    return [by_name[c] for c in dict.fromkeys(wanted)]


def _list_source(name: str, path_column: str, columns: Sequence[str] | str | None) -> Source:
    table = _suffix(name) in LIST_SUFFIXES
    carried: list[pa.Field] = []
    if table:
        fields = _table_columns(name)
        if path_column not in [f.name for f in fields]:
            raise IndexJobError(
                f"{name}: no column {path_column!r} (columns: {[f.name for f in fields]})"
            )
        carried = _chosen(name, fields, path_column, columns)
    elif columns:
        raise ColumnsError(f"--columns needs a Parquet or CSV list, not the text list {name!r}")

    def entries() -> Iterator[tuple[str, tuple[Any, ...]]]:
        if not table:
            return ((e, ()) for e in _text_entries(name))
        if _suffix(name) == ".parquet":
            return _parquet_entries(name, path_column, [f.name for f in carried])
        return _csv_entries(name, path_column, [f.name for f in carried])

    folder = _folder_of(name)
    first = next(entries(), None)
    of_tars = first is not None and is_tar(_resolve(folder, first[0]))
    if of_tars:
        clash = [f.name for f in carried if f.name in {t.name for t in FIELDS}]
        if clash:
            raise ColumnsError(
                f"--columns {clash}: a list of tars has its own {clash} columns (the samples')"
            )
        carried = carried + list(FIELDS)
    kinds = {"tar"} if of_tars else {"files"}
    kinds |= _url_kind(name) | ({"columns"} if carried else set())
    sample_fields = len(FIELDS) if of_tars else 0

    def inputs() -> Iterator[Input]:
        for entry, extras in entries():
            yield from _entry_inputs(_resolve(folder, entry), extras, of_tars, sample_fields)

    return Source(name, carried, inputs, kinds)


def _entry_inputs(
    entry: str, extras: tuple[Any, ...], of_tars: bool, sample_fields: int
) -> Iterator[Input]:
    """The inputs one list entry stands for: a tar's members, a URL, a local file."""
    if is_tar(entry):
        if of_tars:
            yield from tar_inputs(entry, entry, identity(entry), extras)
        else:
            reason = "a tar in a list of images: list tar shards in a list of their own"
            yield Input(entry, f"tar-error\0{identity(entry)}",
                        error=f"{display_name(entry)}: {reason}",
                        extras=extras)  # fmt: skip
        return
    values = extras + (None,) * sample_fields
    if is_url(entry):
        fsspec_module()  # missing: the job's one error, not a failed row per URL
        yield Input(entry, entry, where=Where(entry), extras=values)
    else:
        yield Input(entry, absolute_path(entry), extras=values)


def _folder_of(name: str) -> str:
    """The folder of a list file as SOURCE spells it ("" for a file in the current directory)."""
    if is_url(name):
        return name.rsplit("/", 1)[0] + "/"
    return os.path.dirname(name)


def _resolve(folder: str, entry: str) -> str:
    """A listed path as seen from the current directory: relative ones are under `folder`."""
    if not folder or not entry or os.path.isabs(entry) or is_url(entry):
        return entry
    if is_url(folder):
        return folder + entry.lstrip("/")
    return os.path.join(folder, entry)


def _parquet_entries(
    name: str, column: str, carried: list[str]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    with _opened(name) as f:
        for batch in parquet_file(f).iter_batches(
            columns=[column, *carried], batch_size=4096, use_threads=False
        ):
            values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for row in zip(*values, strict=True):
                yield str(row[0]), tuple(row[1:])


def _csv_entries(
    name: str, column: str, carried: list[str]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    with _opened(name) as f:
        for row in csv.DictReader(io.TextIOWrapper(f, ENCODING, ERRORS, newline="")):
            yield row[column], tuple(row[c] for c in carried)


def _text_entries(name: str) -> Iterator[str]:
    with _opened(name) as f:
        for line in io.TextIOWrapper(f, ENCODING, ERRORS):
            if "\0" in line:  # an archive or image given as SOURCE, not a list of names
                raise IndexJobError(f"SOURCE {display_name(name)!r}: binary data, not a text list")
            if line.strip() and not line.startswith("#"):
                yield line.rstrip("\n")


def limited(inputs: Iterator[Any], limit: int | None) -> Iterator[Any]:
    """The first `limit` inputs (all when None)."""
    return inputs if limit is None else islice(inputs, limit)
