"""`interactive index`: a collection -> sharded Parquet features, incremental, safe on bad input.

The job, once for every executor. The output always equals the current SOURCE: one row per
distinct input (by id), whatever changed between runs. The shard files are the commit log:

- **Layout**: shard k is `part-k.parquet` (its rows whose status is ok: every feature list
  whole, as autofaiss/embedding-reader and `--embeddings=OUTDIR` need) and `_errors/part-k.pq`
  (its failed rows, STATUS_COLUMNS only); either is absent when it would be empty. `_` and `.`
  names are skipped by pyarrow and pandas, the `.pq` suffix by embedding-reader's `**/*.parquet`,
  the top-level glob `part-*.parquet` by polars and duckdb.
- **Done set**: the `id` and `status` columns of both kinds of shard file on disk (each written
  under a temporary name and renamed when whole, so a file on disk is complete). The two files
  of a shard need not both be there: a crash between them leaves the other's inputs pending.
- **Ids**: an input's id is the first 16 hex digits of the SHA-1 of its key (Input.key): a local
  file's normalised absolute path, a URL as written, a tar member's tar identity + name + data
  offset + size + header checksum (runtime/tar_inputs.py); plus, when SOURCE carries columns
  (`--columns`, a tar sample's json/cls/txt), the carried values, so a changed value is a changed
  input (`input_number`).
- **Plan**: SOURCE (runtime/index_sources.py) is listed once, in its stable order. An input whose
  id is done is skipped without reading its image; the others (new, or left by an interrupted
  run) are pending, cut in SOURCE order into shards of `shard_size`, numbered with the smallest
  free shard numbers. Rows of inputs SOURCE no longer lists (removed, renamed: a renamed file is a
  new input) are removed: the shards holding them are rewritten without them, atomically in
  place (or deleted when emptied). `retry_failed` removes the rows whose status is not ok the
  same way, so they become pending. An input listed twice is indexed once.
- **Crash safety**: at every instant each id is in at most one shard on disk (a pending shard
  only holds ids absent from disk, a rewrite only drops rows, each file is replaced atomically),
  and one job at a time holds OUTDIR's lock (runtime/locks.py) from planning to the end. So
  after a crash (even `kill -9`) a rerun plans again from what is on disk and completes it:
  every current input exactly once.

The job validates the options against the engine's manifest, keeps the run manifest
(`_manifest.json`), plans, writes the shards and the report; an `Executor` only turns the
pending shards' inputs into output rows (`shard_rows`): `LocalExecutor` (runtime/index_local.py,
decoding processes on this machine) or `RayExecutor` (runtime/ray_index.py, a Ray cluster).

Memory: the plan holds 8 bytes per listed input and 12 per row on disk (numpy, plus sorting
temporaries of the same order) and the pending inputs' PENDING row (path bytes + about 50, plus a
URL or tar name and the carried values when there are); never pixels or rows: about 40 MB per
million inputs plus the inputs still to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from .api import Features
from .atomic import write_json
from .buckets import format_size
from .images import ImageError, PreparedImage, image_size, prepare_image
from .index_sources import ColumnsError, IndexJobError, Source, absolute_path, limited, open_source
from .index_sources import identity as source_identity
from .index_sources import iter_sources as iter_sources  # re-exported: callers list SOURCE
from .inputs import FetchError, Input, Where, read_where
from .locks import exclusive_lock
from .manifest import PACKAGE, EngineManifest, heatmap_name, package_version
from .parquet import features_table, output_metadata, read_table, split_status, write_table
from .paths import display_name
from .settings import NORMALIZATIONS

RUN_MANIFEST = "_manifest.json"
LOCK_FILE = ".interactive.lock"  # hidden: dataset readers skip it
SHARD_FILE = re.compile(r"part-(\d{5,})\.parquet")
ERRORS_DIR = "_errors"  # failed rows: ERRORS_DIR/part-NNNNN.pq
ERROR_FILE = re.compile(r"part-(\d{5,})\.pq")
# The options that shape a row: a rerun on the same OUTDIR must repeat them (or --overwrite).
# batch_size, shard_size and limit do not: they change how the work is cut, or which inputs
# SOURCE is taken to list.
ROW_OPTIONS = (
    "layers", "normalize", "concat", "path_column", "heatmaps", "content_hash", "columns"
)  # fmt: skip
# What a manifest written before an option existed means by its absence (that option's default).
ABSENT_MEANS = {"columns": None}
# Files; a URL is its own key (no abspath) and a tar member's key is tar_inputs._member_key.
ID_SCHEME = "sha1(normpath(abspath(path)))[:16]"
LIST_CHUNK = 65536  # SOURCE entries hashed and looked up per numpy call while planning
HASH_IN_MEMORY = 256 * 2**20  # --content-hash: larger files are hashed in a separate read
log = logging.getLogger(PACKAGE)
T = TypeVar("T")


@dataclass
class IndexOptions:
    """What a run does; ROW_OPTIONS of it must be repeated by a rerun on the same OUTDIR."""

    batch_size: int = 16
    shard_size: int = 1000
    layers: list[str] | None = None
    normalize: str = "none"
    concat: bool = False
    path_column: str = "path"
    limit: int | None = None  # only the first `limit` entries of SOURCE
    heatmaps: bool = False  # small heatmaps beside the features (engines made with --heatmaps)
    content_hash: bool = False  # a `sha256` column: the hash of each file's bytes
    # a Parquet/CSV list's columns carried into every row (["all"]: all but path_column)
    columns: list[str] | None = None


@dataclass
class IndexReport:
    """Totals over the whole output (earlier runs' shards included); speed over this run's;
    what changed since the output was last planned (new, gone, retried, duplicates)."""

    images: int = 0  # rows in the output
    errors: int = 0  # rows whose status is not ok
    processed: int = 0  # images decoded and run by this run
    skipped_shards: int = 0  # shards on disk left as they were
    written_shards: int = 0  # shards written by this run
    seconds: float = 0.0
    by_bucket: Counter = field(default_factory=Counter)
    inputs: int = 0  # distinct inputs SOURCE lists (as limited)
    new: int = 0  # inputs not in the output before this run (indexed by it)
    gone: int = 0  # rows removed: their input is no longer in SOURCE
    retried: int = 0  # failed rows removed to be redone (retry_failed)
    duplicates: int = 0  # SOURCE entries naming an input already listed (indexed once)
    rewritten_shards: int = 0  # shards rewritten without removed rows
    removed_shards: int = 0  # shards deleted: all their rows were removed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def add(self, table: Any) -> None:
        """Count a shard's rows (a pyarrow table with `status` and `bucket` columns)."""
        status = table.column("status").to_pylist()
        self.images += len(status)
        self.errors += sum(s != "ok" for s in status)
        self.by_bucket.update(b for b in table.column("bucket").to_pylist() if b)

    def changes(self) -> str:
        """`N new, M gone` (+ retried, duplicates when any)."""
        line = f"{self.new} new, {self.gone} gone"
        if self.retried:
            line += f", {self.retried} failed redone"
        if self.duplicates:
            line += f", {self.duplicates} listed twice (indexed once)"
        return line


def source_id(path: str) -> str:
    """A stable id for a local file: the first 16 hex digits of the SHA-1 of its normalised
    absolute path, so `photos/x.jpg`, `./photos/x.jpg` and `/abs/photos/x.jpg` are one input."""
    return hex_id(_key_number(absolute_path(path)))


def _key_number(key: str) -> int:
    """The id of an input's key (Input.key) as a 64-bit integer (how the plan holds ids)."""
    data = key.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big")


def input_number(item: Input) -> int:
    """The id of an Input: of its key, and of its carried values when it has any (so that the
    output follows SOURCE: a changed value, a tar sample's new caption, is a new input)."""
    if not item.extras:
        return _key_number(item.key)
    values = json.dumps(item.extras, default=repr, ensure_ascii=True)
    return _key_number(f"{item.key}\0{values}")


def hex_id(number: int) -> str:
    """An id as the `id` column writes it: 16 hex digits."""
    return f"{number:016x}"


def _id_numbers(ids: Iterable[str | None], where: Path) -> np.ndarray:
    try:
        return np.array([int(i, 16) for i in ids], dtype=np.uint64)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IndexJobError(f"{where}: an `id` that this package did not write") from None


def _member(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """values[i] in sorted_values, for each i (binary search: no hash table of the big side)."""
    if not len(sorted_values):
        return np.zeros(len(values), bool)
    at = np.searchsorted(sorted_values, values)
    at[at == len(sorted_values)] = 0
    return sorted_values[at] == values


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def error_name(k: int) -> str:
    return f"{ERRORS_DIR}/part-{k:05d}.pq"


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# ------------------------------------------------------------------------------------------------
# What an executor is given and gives back


class Shard(NamedTuple):
    """A shard to write: its number k (it becomes shard_name(k)), its inputs in SOURCE order and
    their ids (the driver computes them: workers may see another current directory); for each
    input where its bytes are (None: the local file at its path) and the error known while
    listing (None: read it); `carried`: the extra columns of its rows (SOURCE's), or None."""

    k: int
    paths: list[str]
    ids: list[str]
    wheres: list[Where | None]
    errors: list[str | None]
    carried: pa.Table | None = None


class Progress:
    """What the job shows while it runs; this one shows nothing (an executor's own, e.g. Ray
    Data's bars, or none). The local executor's draws a bar or logs lines (index_local.py)."""

    def skip(self, n: int) -> None:
        """n inputs found done."""

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

    The job does everything else (listing, planning, removals, manifest, writing, the report).
    """

    @abstractmethod
    def run(self, work: ShardWork, shards: Iterable[Shard]) -> Results:
        """Yield (k, shard_rows of shard k's inputs, in input order) for each shard, in any order,
        once it is whole. `shards` is lazy (cut from the plan as it is consumed)."""

    def progress(self, enabled: bool | None, count: Callable[[], int]) -> Progress:
        """The progress display for one run (`count()`: the inputs this run will process)."""
        return Progress()

    def check(self, manifest: EngineManifest) -> None:
        """Raise, before OUTDIR is touched, when this executor cannot run `manifest`'s engine
        (e.g. a backend asked for by name that cannot run here). This one accepts any."""
        return None

    def check_source(self, source: Source) -> None:
        """Raise, before OUTDIR is touched, when this executor cannot read SOURCE's kind of
        inputs (`source.kinds`: files, tar, url, columns). This one reads them all."""
        return None


def prepare_or_error(path: str, manifest: EngineManifest) -> PreparedImage | str:
    """The image at its bucket size, or why it cannot be read (any failure is the input's)."""
    try:
        return prepare_image(path, manifest.bucket_for)
    except ImageError as err:
        return str(err)
    except Exception as err:  # a decoder bug must cost one row, never the job
        return f"{path}: unexpected error while decoding: {type(err).__name__}: {err}"


def prepare_input(
    path: str,
    manifest: EngineManifest,
    content_hash: bool = False,
    where: Where | None = None,
    error: str | None = None,
) -> tuple[PreparedImage | str, str | None]:
    """prepare_or_error, and with `content_hash` the SHA-256 of the file's bytes (None when the
    file cannot be read), from the same read as the decoding (files up to HASH_IN_MEMORY).

    `where`: the input's bytes are there (a URL, a tar member's byte range), read in one go;
    `error`: the input's status, known while listing: returned as it is, nothing is read."""
    if error is not None:
        return error, None
    if where is not None:
        return _prepare_where(path, where, manifest, content_hash)
    if not content_hash:
        return prepare_or_error(path, manifest), None
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > HASH_IN_MEMORY:
                hasher = hashlib.sha256()
                while block := f.read(2**20):
                    hasher.update(block)
                return prepare_or_error(path, manifest), hasher.hexdigest()
            data = f.read()
    except OSError:  # missing, unreadable, a directory: the decoder's message says which
        return prepare_or_error(path, manifest), None
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return prepare_or_error(path, manifest), digest
    return _prepare_data(path, data, manifest), digest


def _prepare_where(
    path: str, where: Where, manifest: EngineManifest, content_hash: bool
) -> tuple[PreparedImage | str, str | None]:
    try:
        data = read_where(where)
    except FetchError as err:  # it names the URL: the input's own when it is a remote image
        return (str(err) if where.url == path else f"{path}: {err}"), None
    except OSError as err:
        return f"{path}: {err.strerror or err}", None
    digest = hashlib.sha256(data).hexdigest() if content_hash else None
    return _prepare_data(path, data, manifest), digest


def _prepare_data(path: str, data: bytes, manifest: EngineManifest) -> PreparedImage | str:
    """An input's bytes at its bucket size, or why not (the reason prefixed with `path`)."""
    try:
        return prepare_image(data, manifest.bucket_for)
    except ImageError as err:
        return f"{path}: {err.reason}"
    except Exception as err:
        return f"{path}: unexpected error while decoding: {type(err).__name__}: {err}"


def shard_rows(
    paths: list[str],
    ids: list[str],
    features: Features,
    options: IndexOptions,
    hashes: list[str | None] | None = None,
    carried: pa.Table | None = None,
) -> pa.Table:
    """The output rows of `paths` (features_table's columns, `id`, with `content_hash` a
    `sha256` column after `path`, then the `carried` columns), no metadata."""
    table = features_table(
        paths,
        features,
        ids=ids,
        layers=options.layers,
        normalize=options.normalize,
        concat=options.concat,
        heatmaps=options.heatmaps,
    )
    if options.content_hash:
        column = pa.array(hashes if hashes is not None else [None] * len(paths), pa.string())
        table = table.add_column(table.schema.get_field_index("path") + 1, "sha256", column)
    return with_carried(table, carried)


def with_carried(table: pa.Table, carried: pa.Table | None) -> pa.Table:
    """`table` with the columns of `carried` (SOURCE's, as many rows) appended."""
    if carried is None:
        return table
    for name in carried.column_names:
        table = table.append_column(carried.schema.field(name), carried[name])
    return table


# ------------------------------------------------------------------------------------------------
# The plan


def shard_files(out: Path) -> dict[Path, int]:
    """The shard files on disk (features and errors) -> their shard number, by number."""
    found = []
    for pattern, directory in ((SHARD_FILE, out), (ERROR_FILE, out / ERRORS_DIR)):
        for part in directory.glob("part-*"):
            match = pattern.fullmatch(part.name)
            if match:
                found.append((int(match.group(1)), part.parent != out, part))
    return {part: k for k, _, part in sorted(found)}


def read_index(out: str | os.PathLike[str], errors: bool = True) -> pa.Table:
    """Every row of an index OUTDIR in one table (shard by shard; the failed rows' features
    null), or with `errors=False` the ok rows only (what the dataset readers see)."""
    files = sorted(shard_files(Path(out)), key=lambda part: part.parent != Path(out))
    tables = [read_table(part) for part in files if errors or part.parent == Path(out)]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


@dataclass
class Plan:
    """What a run does to OUTDIR: the rows to remove, the inputs to index, the counts."""

    inputs: int  # distinct inputs SOURCE lists (as limited)
    duplicates: int  # entries naming an input listed before
    kept: int  # rows on disk that stay
    gone: int  # rows to remove: SOURCE no longer lists their input
    retried: int  # failed rows to remove and redo
    pending: pa.Table  # the inputs to index, in SOURCE order (PENDING columns)
    remove: dict[Path, np.ndarray]  # shard file -> ids (uint64) of its rows to remove
    occupied: dict[Path, int]  # shard files on disk -> their shard numbers
    emptied: set[Path] = field(default_factory=set)  # shard files all of whose rows go
    # feature files holding failed rows (written before _errors/ existed): split by apply_removals
    mixed: set[Path] = field(default_factory=set)
    carried: list[str] = field(default_factory=list)  # SOURCE's columns in pending, after PENDING

    @property
    def new(self) -> int:
        return len(self.pending) - self.retried

    def counts(self) -> dict[str, int]:
        return {
            "inputs": self.inputs,
            "kept": self.kept,
            "new": self.new,
            "gone": self.gone,
            "retried": self.retried,
            "duplicates": self.duplicates,
            "pending": len(self.pending),
        }

    def shards(self, size: int) -> Iterator[Shard]:
        """The pending inputs cut into shards of `size`, numbered with the free numbers (those
        of no shard on disk once the emptied ones are gone), smallest first."""
        taken = {k for part, k in self.occupied.items() if part not in self.emptied}
        free = (k for k in count() if k not in taken)
        for start in range(0, len(self.pending), size):
            yield _shard(next(free), self.pending.slice(start, size), self.carried)


# The plan's columns for each pending input (text as utf-8 + surrogateescape bytes): its path,
# id, where its bytes are (url null: the file at path) and the error known while listing.
PENDING = pa.schema(
    [
        ("path", pa.large_binary()),
        ("id", pa.uint64()),
        ("url", pa.large_binary()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("header", pa.int64()),
        ("error", pa.large_binary()),
    ]
)
_NAMES = ("path", "url", "error")  # the PENDING columns holding text


def _encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-8", "surrogateescape")


def _decode(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _pending_table(inputs: list[Input], ids: np.ndarray, carried: list[pa.Field]) -> pa.Table:
    """PENDING (then the carried columns) of `inputs`."""
    wheres = [i.where for i in inputs]
    columns = {
        "path": [_encode(i.path) for i in inputs],
        "id": ids,
        "url": [_encode(w.url) if w else None for w in wheres],
        "offset": [w.offset if w else None for w in wheres],
        "size": [w.size if w else None for w in wheres],
        "header": [w.header if w else None for w in wheres],
        "error": [_encode(i.error) for i in inputs],
    }
    arrays = [pa.array(columns[f.name], f.type) for f in PENDING]
    for n, f in enumerate(carried):
        arrays.append(_carried_array([i.extras[n] for i in inputs], f))
    return pa.Table.from_arrays(arrays, schema=pending_schema(carried))


def pending_schema(carried: list[pa.Field]) -> pa.Schema:
    """PENDING, then the carried fields under names of their own (SOURCE may have a `url`)."""
    return pa.schema([*PENDING, *(f.with_name(f"carried.{n}") for n, f in enumerate(carried))])


def _carried_array(values: list[Any], column: pa.Field) -> pa.Array:
    try:
        return pa.array(values, column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
        raise IndexJobError(f"--columns {column.name!r}: cannot carry its values ({err})") from None


def _shard(k: int, table: pa.Table, carried: list[str]) -> Shard:
    rows = {name: table[name].to_pylist() for name in PENDING.names}
    paths = [p.decode("utf-8", "surrogateescape") for p in rows["path"]]
    wheres = [
        None if url is None else Where(_decode(url) or "", offset, size, header)
        for url, offset, size, header in zip(
            rows["url"], rows["offset"], rows["size"], rows["header"], strict=True
        )
    ]
    errors = [_decode(e) for e in rows["error"]]
    ids = [hex_id(i) for i in rows["id"]]
    extra = table.select(table.column_names[len(PENDING) :]).rename_columns(carried)
    return Shard(k, paths, ids, wheres, errors, extra if carried else None)


def plan_index(
    source: Source, out: Path, options: IndexOptions, *, retry_failed: bool = False
) -> Plan:
    """Compare SOURCE (listed once) with the shards on disk (their `id` and `status` only)."""
    files = shard_files(out)
    done, where, failed = [], [], []
    for n, part in enumerate(files):
        try:
            table = read_table(part, columns=["id", "status"])
        except Exception as err:
            raise IndexJobError(
                f"{part}: unreadable shard ({err}); delete it to index its inputs again"
            ) from None
        done.append(_id_numbers(table["id"].to_pylist(), part))
        where.append(np.full(table.num_rows, n, np.int32))
        failed.append(np.array([s != "ok" for s in table["status"].to_pylist()], bool))
    done_ids = np.concatenate(done) if done else np.empty(0, np.uint64)
    done_shard = np.concatenate(where) if where else np.empty(0, np.int32)
    done_failed = np.concatenate(failed) if failed else np.empty(0, bool)
    del done, where, failed
    # An id twice on disk (never written by this package: the lock keeps one job at a time):
    # all its copies go and the input is indexed again, once.
    values, counts = np.unique(done_ids, return_counts=True)
    redo = _member(done_ids, values[counts > 1])
    if retry_failed:
        redo |= done_failed
    keep = np.unique(done_ids[~redo])
    del values, counts

    listed, positions, tables = [], [], []
    offset = 0
    for chunk in chunks(limited(source.inputs(), options.limit), LIST_CHUNK):
        ids = np.fromiter((input_number(i) for i in chunk), np.uint64, len(chunk))
        todo = np.flatnonzero(~_member(ids, keep))
        listed.append(ids)
        positions.append(todo + offset)
        tables.append(_pending_table([chunk[i] for i in todo], ids[todo], source.carried))
        offset += len(chunk)
    current = np.concatenate(listed) if listed else np.empty(0, np.uint64)
    del listed, keep
    distinct, first = np.unique(current, return_index=True)
    is_first = np.zeros(len(current), bool)
    is_first[first] = True
    todo_at = np.concatenate(positions) if positions else np.empty(0, np.int64)
    pending = pa.concat_tables(tables) if tables else pending_schema(source.carried).empty_table()
    pending = pending.filter(pa.array(is_first[todo_at]))

    gone = ~_member(done_ids, distinct)
    remove_rows = gone | redo
    # done_shard (a file's position in `files`) is sorted: one split groups the rows by file
    at = np.flatnonzero(remove_rows)
    numbers, starts = np.unique(done_shard[at], return_index=True)
    groups = np.split(done_ids[at], starts[1:]) if len(at) else []
    parts = list(files)
    kept_failed = np.unique(done_shard[done_failed & ~remove_rows]).tolist()
    mixed = {parts[n] for n in kept_failed if parts[n].parent == out}
    remove = {parts[int(n)]: ids for n, ids in zip(numbers, groups, strict=True)}
    emptied = set(remove) - {parts[n] for n in np.unique(done_shard[~remove_rows]).tolist()}
    return Plan(
        inputs=len(distinct),
        duplicates=len(current) - len(distinct),
        kept=int((~remove_rows).sum()),
        gone=int(gone.sum()),
        retried=len(np.unique(done_ids[redo & ~gone])),
        pending=pending,
        remove=remove,
        occupied=files,
        emptied=emptied,
        mixed=mixed,
        carried=[f.name for f in source.carried],
    )


def apply_removals(out: Path, plan: Plan) -> None:
    """Rewrite each shard holding rows to remove without them (atomically, same name), or
    delete it when none stay: a crash leaves each shard old or new, never a row twice."""
    for part, ids in plan.remove.items():
        if part in plan.emptied:
            part.unlink()
            log.info("index: removed %s (all its inputs are gone)", part.name)
            continue
        table = read_table(part)
        stay = ~_member(_id_numbers(table["id"].to_pylist(), part), np.sort(ids))
        write_table(table.filter(pa.array(stay)), part)
        log.info("index: rewrote %s without %d rows", part.name, int((~stay).sum()))
    for part in sorted(plan.mixed):
        split_mixed(out, part, plan.occupied[part])


def split_mixed(out: Path, part: Path, k: int) -> None:
    """Move the failed rows of feature file `part` (an older layout) into error_name(k): that
    file first (with its rows, if any), then `part` without them (or deleted). A crash between
    leaves those ids in both files: the next plan redoes them (an id twice on disk)."""
    ok, failed = split_status(read_table(part))
    errors = out / error_name(k)
    if errors.exists():
        failed = pa.concat_tables([read_table(errors), failed], promote_options="default")
    write_table(failed, errors)
    if ok.num_rows:
        write_table(ok, part)
    else:
        part.unlink()
    log.info("index: moved %d failed rows of %s to %s", failed.num_rows, part.name, errors)


# ------------------------------------------------------------------------------------------------
# The job


def run_index(
    source: str | os.PathLike[str],
    engine: Path,
    out: Path,
    options: IndexOptions,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool | None = None,
    say: Callable[[str], None] | None = None,
) -> IndexReport:
    """Index SOURCE into OUTDIR with `executor` (default: LocalExecutor()); returns what was
    done. Errors in the job itself raise early, before OUTDIR is touched; another job on OUTDIR
    raises LockedError (runtime/locks.py). `say` gets the plan's line (default: the log)."""
    say = say or log.info
    if executor is None:
        from .index_local import LocalExecutor

        executor = LocalExecutor()
    manifest = EngineManifest.load(engine)
    check_options(options, manifest)
    executor.check(manifest)
    opened = open_source(source, options.path_column, options.columns)  # SOURCE's problems
    check_carried(opened, options, manifest)
    executor.check_source(opened)
    run = run_manifest(opened, manifest, options)
    with _outdir_lock(out):
        return _run_locked(opened, engine, out, options, executor, run, manifest,
                           overwrite=overwrite, retry_failed=retry_failed, progress=progress,
                           say=say)  # fmt: skip


@contextmanager
def _outdir_lock(out: Path) -> Iterator[None]:
    """OUTDIR created and locked for this job (LockedError when another job holds it)."""
    lock = exclusive_lock(out / LOCK_FILE, f"OUTDIR {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    except OSError as err:
        raise IndexJobError(f"cannot write to -o {out}: {err.strerror or err}") from err
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _run_locked(
    source: Source,
    engine: Path,
    out: Path,
    options: IndexOptions,
    executor: Executor,
    run: dict[str, Any],
    manifest: EngineManifest,
    *,
    overwrite: bool,
    retry_failed: bool,
    progress: bool | None,
    say: Callable[[str], None],
) -> IndexReport:
    prepare_outdir(out, run, overwrite)
    remove_temporaries(out)
    started = time.perf_counter()
    plan = plan_index(source, out, options, retry_failed=retry_failed)
    if plan.inputs == 0 and plan.kept + plan.gone + plan.retried and not overwrite:
        raise IndexJobError(
            f"SOURCE {display_name(source.spelled)!r} lists no inputs: refusing to remove all "
            f"{plan.kept + plan.gone + plan.retried} rows of {out} (an unmounted or emptied "
            "SOURCE?); pass --overwrite to empty it"
        )
    # Shards (numbers) touched: a file of theirs rewritten or deleted; removed: all of them.
    touched = {plan.occupied[part] for part in plan.remove}
    kept = {k for part, k in plan.occupied.items() if part not in plan.emptied}
    removed = touched - kept
    report = IndexReport(
        inputs=plan.inputs, new=plan.new, gone=plan.gone, retried=plan.retried,
        duplicates=plan.duplicates, rewritten_shards=len(touched - removed),
        removed_shards=len(removed), skipped_shards=len(set(plan.occupied.values()) - touched),
    )  # fmt: skip
    line = f"index: SOURCE lists {plan.inputs} inputs: {plan.kept} in the output, "
    line += report.changes()
    if plan.remove:
        line += f" (rows removed from {len(touched)} shards)"
    say(line)
    run["plan"] = plan.counts()
    apply_removals(out, plan)

    bar = executor.progress(progress, lambda: len(plan.pending))
    work = ShardWork(Path(engine), manifest, options, progress, bar)
    metadata = output_metadata(manifest, run)
    try:
        with closing(executor.run(work, plan.shards(options.shard_size))) as results:
            for k, rows in results:
                write_shard(out, k, rows.replace_schema_metadata(metadata), plan.carried)
                report.written_shards += 1
                report.processed += rows.num_rows
    finally:
        bar.close()
    for part in shard_files(out):
        report.add(read_table(part, columns=["status", "bucket"]))
    report.seconds = time.perf_counter() - started
    run["result"] = {**asdict(report), "by_bucket": dict(report.by_bucket)}
    write_json(out / RUN_MANIFEST, run)
    return report


def write_shard(out: Path, k: int, rows: pa.Table, carried: Iterable[str] = ()) -> None:
    """Shard k's ok rows into shard_name(k), its failed ones (with the `carried` columns) into
    error_name(k) (each file atomically, only when it has rows)."""
    ok, failed = split_status(rows, carried)
    for name, table in ((error_name(k), failed), (shard_name(k), ok)):
        if table.num_rows:
            write_table(table, out / name)
            log.info("index: wrote %s (%d rows)", name, table.num_rows)


def check_options(options: IndexOptions, manifest: EngineManifest) -> None:
    """Raise IndexJobError when the options ask for what the engine cannot give (from its
    manifest: no backend is opened)."""
    if options.batch_size < 1 or options.shard_size < 1:
        raise IndexJobError("--batch-size and --shard-size must be at least 1")
    if options.limit is not None and options.limit < 1:
        raise IndexJobError(f"--limit must be at least 1, got {options.limit}")
    if options.normalize not in NORMALIZATIONS:
        raise IndexJobError(f"--normalize must be none or l2, got {options.normalize!r}")
    if options.heatmaps and not manifest.data.get("heatmaps"):
        raise IndexJobError(
            "--heatmaps needs an engine exported with `interactive export --heatmaps`"
        )
    unknown = [t for t in options.layers or [] if t not in manifest.layers]
    if unknown:
        raise IndexJobError(f"--layers {unknown}: not in this engine ({manifest.layers})")


# The columns of ours that SOURCE's carried columns must not take (besides the engine's layers
# and their heatmaps).
OUTPUT_COLUMNS = frozenset(
    {"id", "path", "path_bytes", "width", "height", "bucket", "status", "sha256", "features"}
)


def check_carried(source: Source, options: IndexOptions, manifest: EngineManifest) -> None:
    """Raise IndexJobError when a carried column of SOURCE has the name of an output column."""
    ours = OUTPUT_COLUMNS | set(manifest.layers) | {heatmap_name(t) for t in manifest.layers}
    clash = [f.name for f in source.carried if f.name in ours]
    if clash:
        raise ColumnsError(
            f"--columns {clash}: the output has its own column of that name (its columns: "
            f"{', '.join(sorted(OUTPUT_COLUMNS))}, a column per layer and per heatmap); rename "
            "it in SOURCE"
        )


def run_manifest(source: Source, engine: EngineManifest, options: IndexOptions) -> dict[str, Any]:
    """What OUTDIR was made from (written as _manifest.json); `identity` of it must match."""
    return {
        "command": "index",
        "source": source.identity,
        "ids": ID_SCHEME,
        "options": asdict(options),
        "engine": {
            "directory": str(engine.directory),
            "export": engine.data["export"],
            "weights_sha256": engine.data["weights"].get("sha256"),
            "layers": engine.data["layers"],
        },
        "package_version": package_version(),
    }


def identity(run: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must repeat: SOURCE (absolute), the id scheme, ROW_OPTIONS, the engine."""
    options = run.get("options")
    options = options if isinstance(options, dict) else {}
    source = run.get("source")
    return {
        "source": source_identity(source) if isinstance(source, str) else source,
        "ids": run.get("ids"),
        "options": {k: options.get(k, ABSENT_MEANS.get(k, "(absent)")) for k in ROW_OPTIONS},
        "engine": run.get("engine"),
    }


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old["source"] != new["source"]:
        return f"SOURCE {old['source']} there, {new['source']} here"
    if old["ids"] != new["ids"]:
        return "ids made by an older version"
    for key in ROW_OPTIONS:
        if old["options"][key] != new["options"][key]:
            return f"{key} {old['options'][key]!r} there, {new['options'][key]!r} here"
    return "another engine"


def prepare_outdir(out: Path, run: dict[str, Any], overwrite: bool) -> None:
    """Refuse an OUTDIR holding another job's output (or an unreadable _manifest.json), unless
    `overwrite` clears its shards; then record this run."""
    previous = out / RUN_MANIFEST
    problem = None
    if previous.exists():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as err:
            problem = f"{previous} is not a run manifest ({err})"
        else:
            before, now = identity(old), identity(run)
            if before != now:
                problem = (
                    f"{out} holds the output of another job ({_difference(before, now)}; "
                    f"see {previous})"
                )
    if problem and not overwrite:
        raise IndexJobError(
            f"{problem}: rerun the same command to resume, use another -o, or pass "
            "--overwrite to replace it"
        )
    if problem:
        for part in shard_files(out):
            part.unlink()
    try:
        write_json(previous, {**run, "result": None})
    except OSError as err:
        raise IndexJobError(f"cannot write to -o {out}: {err.strerror or err}") from err


def remove_temporaries(out: Path) -> None:
    """Drop the temporary files of a killed run (runtime/atomic.py names); under the lock, no
    other job is writing them."""
    for pattern in (".part-*.parquet.*.tmp", f".{RUN_MANIFEST}.*.tmp", ERRORS_DIR + "/.part-*.tmp"):
        for tmp in out.glob(pattern):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Dry run


def dry_run(source: str | os.PathLike[str], engine: Path, options: IndexOptions) -> dict[str, Any]:
    """Headers only (a URL or tar member is read whole): the bucket histogram, unreadable
    inputs, the buckets the engine lacks."""
    manifest = EngineManifest.load(engine)
    histogram: Counter = Counter()
    unreadable = 0
    opened = open_source(source, options.path_column, options.columns)
    for item in limited(opened.inputs(), options.limit):
        try:
            histogram[manifest.bucket_for(*_header_size(item))] += 1
        except (ImageError, OSError):
            unreadable += 1
    missing = sorted(b for b in histogram if b not in set(manifest.buckets))
    return {
        "images": sum(histogram.values()) + unreadable,
        "unreadable": unreadable,
        "buckets": {format_size(b): n for b, n in histogram.most_common()},
        "missing": [format_size(b) for b in missing],
        "export_command": manifest.export_command(missing) if missing else None,
    }


def _header_size(item: Input) -> tuple[int, int]:
    if item.error is not None:
        raise OSError(item.error)
    return image_size(item.path if item.where is None else read_where(item.where))
