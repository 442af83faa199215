"""A kNN index (FAISS) over an index OUTDIR, and search against it.

`build_knn(INDEX_DIR, KNN_DIR)` (`interactive knn build`) turns the paper's vectors
(runtime/vectors.py: each layer L2-normalised, side by side, the whole normalised, so that an inner
product is a cosine) into a FAISS inner-product index, streamed: the vectors are counted from the
Parquet footers first (no data read), an index type is chosen from that count, the dimension and a
memory budget (`choose_index`), trained on a bounded uniform sample when it needs training, then
filled shard by shard. Memory holds the index, the training sample and one shard, never the
collection. KNN_DIR then holds:

- `knn.faiss`: the FAISS index; its row r is the r-th vector added;
- `rows.parquet`: row r -> `id`, `path`, `path_bytes`, `shard` (the file of INDEX_DIR it came
  from), one row group per shard;
- `knn.json`: what it was built from (INDEX_DIR, the columns, the engine's identity as the shards'
  metadata records it, how the columns were made), the index type, factory string, parameters
  and search parameters, the counts (vectors, failed rows skipped), the date and versions.
  Written last: a KNN_DIR without it is an unfinished build, and `KnnIndex.open` refuses it.

`KnnIndex.open(KNN_DIR).search(images or vectors, k)` searches it; image queries are extracted
with the engine the index was built from (its directory as recorded, or another directory whose
identity matches: export settings, layers and weights' sha256) and turned into vectors by the very
writer and post-processing the index rows went through, so an indexed image finds itself at
score 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .api import l2_normalize
from .atomic import atomic_path, write_json
from .index import absolute_path
from .index_sources import IndexJobError
from .locks import exclusive_lock
from .manifest import EngineManifest, package_version
from .optional import optional_import
from .parquet import features_table, parquet_file, read_table
from .vectors import (
    VectorBatch,
    failed_rows,
    feature_files,
    file_vectors,
    table_vectors,
    vector_columns,
)

if TYPE_CHECKING:
    from .api import Extractor
    from .images import ImageSource

FORMAT = "interactive-knn/1"
INDEX_FILE = "knn.faiss"
ROWS_FILE = "rows.parquet"
META_FILE = "knn.json"
LOCK_FILE = ".interactive.lock"
OUR_FILES = (INDEX_FILE, ROWS_FILE, META_FILE, LOCK_FILE)
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
ROWS_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("path_bytes", pa.binary()),
     ("shard", pa.string())]
)  # fmt: skip

# --- choosing the index ---------------------------------------------------------------------
# A small rule modelled on autofaiss's `get_optimal_index_keys_v2`, `get_optimal_nb_clusters`,
# `get_optimal_train_size` and `get_optimal_quantization` (criteo/autofaiss,
# autofaiss/external/optimize.py), which follow FAISS's "Guidelines to choose an index" wiki page.
# Where this rule departs from autofaiss it says why.
#
# Exact search below 10,000 vectors: autofaiss goes flat below 1,000 and HNSW15 below 10,000, for
# speed only; an exact scan of 10,000 vectors is a few ms with BLAS, and exact is what a small
# collection wants (the paper's evaluations are exact).
FLAT_BELOW = 10_000
# HNSW when the memory allows M >= 8 links (autofaiss: HNSW{min(M, 32)} with
# M = floor((budget / (4 n) - d) / 2), i.e. 4 d + 8 M bytes per vector).
HNSW_MIN_M, HNSW_MAX_M = 8, 32
HNSW_EF_CONSTRUCTION = 80  # FAISS's default 40, doubled: measured +recall on 2-core builds
# autofaiss tunes efSearch to a query time; a fixed value instead: on 4,000 clustered 512-d
# vectors (tests/test_knn.py) HNSW32 reached recall@10 0.94 at 128 and 0.99 at 256.
HNSW_EF_SEARCH = 256
# Unquantized IVF below 1M vectors when it fits (autofaiss's ivf_flat_threshold).
IVF_FLAT_BELOW = 1_000_000
# k-means wants 30..256 points per centroid (FAISS); autofaiss trains on 100 per centroid; FAISS
# warns below 39, so no index here has fewer.
TRAIN_POINTS_PER_CENTROID = 100
MIN_POINTS_PER_CENTROID = 39
# PQ code sizes tried, largest first (autofaiss's pq_values). autofaiss puts an OPQ rotation in
# front (OPQ{m}_{y}); not here: its training took 274 s for OPQ64_512 on 4,000 512-d vectors on
# 2 cores (plain PQ16: 0.15 s), and it grows with d^2 (the full-width concatenation is 6848-d).
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
IVF_HNSW_QUANTIZER_FROM = 1000  # autofaiss: IVF{c}_HNSW32 coarse quantizer from 1000 centroids
ID_BYTES = 8  # what an inverted list stores per vector beside its code
SAMPLE_SEED = 0


class KnnError(IndexJobError):
    """A problem with a kNN build or search (directory, engine, options): one line, exit 1."""


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS index to build: its kind, `index_factory` string, training sample size (0: none),
    search parameters (FAISS ParameterSpace names) and estimated size in bytes."""

    kind: str
    factory: str
    train_size: int
    search: dict[str, int]
    estimated_bytes: int


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GB', '4GiB', '100000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"expected a memory size such as 4G or 512M, got {text!r}")
    value = float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    if value < 1:
        raise ValueError(f"memory must be at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def training_cap(d: int, memory: int) -> int:
    """The most training vectors: half the memory budget (the other half is the index's)."""
    return max(1, memory // 2 // (4 * d))


def nb_clusters(n: int, cap: int) -> int:
    """IVF lists for n vectors: autofaiss's first choice (the power of two nearest 4 sqrt(n)
    below 1M, then 16384, 65536, 2^17), lowered to a power of two with at least
    MIN_POINTS_PER_CENTROID vectors each among n and among the `cap` training vectors."""
    if n < 1_000_000:
        clusters = 2 ** round(math.log2(4 * math.sqrt(n)))
    elif n < 10_000_000:
        clusters = 16_384
    elif n < 300_000_000:
        clusters = 65_536
    else:
        clusters = 2**17
    most = min(n, cap) // MIN_POINTS_PER_CENTROID
    if clusters > most:
        clusters = 2 ** int(math.log2(most)) if most >= 1 else 1
    return clusters


def nprobe_for(clusters: int) -> int:
    """Lists visited per query: autofaiss searches for the largest nprobe under a query time; a
    fixed rule instead, 1/8 of the lists (at least 16, at most 256, at most all)."""
    return min(clusters, max(16, min(256, clusters // 8)))


def choose_index(n: int, d: int, memory: int, kind: str = "auto") -> IndexPlan:
    """The index for n vectors of dimension d within `memory` bytes: `kind` "auto" picks as the
    rule above says; "flat", "ivf", "hnsw", "ivfpq" force the type (parameters still from n, d,
    memory). Raises KnnError when the asked type cannot fit in `memory`."""
    if kind not in INDEX_KINDS:
        raise KnnError(f"unknown index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    if n < 1 or d < 1:
        raise KnnError(f"nothing to index: {n} vectors of dimension {d}")
    flat = _flat(n, d)
    if kind == "auto":
        if n < FLAT_BELOW and flat.estimated_bytes <= memory:
            return flat
        plans = [_hnsw(n, d, memory)]
        if n < IVF_FLAT_BELOW:
            plans.append(_ivf(n, d, memory))
        plans.append(_ivfpq(n, d, memory))
        fitting = [p for p in plans if p is not None and p.estimated_bytes <= memory]
        if fitting:
            return fitting[0]
        kind = "ivfpq"  # the smallest: let its own check say what is missing
    fewest = {"ivf": MIN_POINTS_PER_CENTROID, "ivfpq": 2 * MIN_POINTS_PER_CENTROID}.get(kind, 0)
    if n < fewest:  # k-means needs that many points (1 list; 2 centroids per sub-quantizer)
        raise KnnError(f"an {kind} index needs at least {fewest} vectors, there are {n}: use flat")
    plan = {"flat": lambda: flat, "ivf": lambda: _ivf(n, d, memory),
            "hnsw": lambda: _hnsw(n, d, memory, forced=True),
            "ivfpq": lambda: _ivfpq(n, d, memory)}[kind]()  # fmt: skip
    if plan is None or plan.estimated_bytes > memory:
        need = format_bytes(plan.estimated_bytes) if plan is not None else "more"
        raise KnnError(
            f"a {kind} index of {n} vectors of dimension {d} needs about {need}, over the "
            f"memory budget of {format_bytes(memory)}: raise --memory or choose another --index"
        )
    return plan


def _flat(n: int, d: int) -> IndexPlan:
    return IndexPlan("flat", "Flat", 0, {}, 4 * n * d)


def _hnsw(n: int, d: int, memory: int, forced: bool = False) -> IndexPlan | None:
    m = math.floor((memory / (4 * n) - d) / 2)
    if m < HNSW_MIN_M and not forced:
        return None
    m = min(max(m, HNSW_MIN_M), HNSW_MAX_M)
    search = {"efSearch": HNSW_EF_SEARCH}
    return IndexPlan("hnsw", f"HNSW{m}", 0, search, n * (4 * d + 8 * m))


def _ivf(n: int, d: int, memory: int) -> IndexPlan:
    cap = training_cap(d, memory)
    clusters = nb_clusters(n, cap)
    train = min(n, cap, TRAIN_POINTS_PER_CENTROID * clusters)
    size = n * (4 * d + ID_BYTES) + 4 * d * clusters
    return IndexPlan("ivf", f"IVF{clusters},Flat", train, {"nprobe": nprobe_for(clusters)}, size)


def _ivfpq(n: int, d: int, memory: int) -> IndexPlan | None:
    """The largest PQ code that fits: `IVF{c}[_HNSW32],PQ{m}x{bits}`, m the largest divisor of d
    up to the code size (PQ splits d into m equal parts), 8 bits unless the sample is too small
    for 256 centroids per sub-quantizer (39 vectors each)."""
    cap = training_cap(d, memory)
    clusters = nb_clusters(n, cap)
    wanted = max(TRAIN_POINTS_PER_CENTROID * clusters, 256 * MIN_POINTS_PER_CENTROID)
    train = min(n, cap, wanted)
    nbits = min(8, max(1, int(math.log2(train / MIN_POINTS_PER_CENTROID))))
    coarse = f"IVF{clusters}_HNSW32" if clusters >= IVF_HNSW_QUANTIZER_FROM else f"IVF{clusters}"
    search = {"nprobe": nprobe_for(clusters)}
    if clusters >= IVF_HNSW_QUANTIZER_FROM:
        search["quantizer_efSearch"] = 2 * search["nprobe"]  # as autofaiss sets it
    plans = []
    for m in dict.fromkeys(max(k for k in range(1, c + 1) if d % k == 0) for c in PQ_SIZES):
        if m < d:
            size = n * (math.ceil(m * nbits / 8) + ID_BYTES) + 4 * d * clusters
            plans.append(IndexPlan("ivfpq", f"{coarse},PQ{m}x{nbits}", train, search, size))
    fitting = [p for p in plans if p.estimated_bytes <= memory]
    return fitting[0] if fitting else (plans[-1] if plans else None)


# --- what an INDEX_DIR holds ----------------------------------------------------------------


@dataclass
class SourceSurvey:
    """INDEX_DIR as its Parquet footers describe it (no data read)."""

    files: list[Path]
    rows: list[int]  # rows per file (an upper bound of its vectors)
    dim: int
    engine: dict[str, Any]  # the identity: export settings (less heatmaps), layers, weights sha
    engine_directory: str
    made_with: dict[str, Any]  # how the columns were made: layers, normalize, concat


def survey_source(source: Path, columns: Sequence[str]) -> SourceSurvey:
    """Count rows and read the engine's identity from every feature file's footer; refuse files
    that disagree (another engine or other row options)."""
    files = feature_files(source)
    rows, dims, first = [], None, None
    for part in files:
        with open(part, "rb") as f:
            reader = parquet_file(f)
            rows.append(reader.metadata.num_rows)
            schema = reader.schema_arrow
        identity = _file_identity(schema.metadata or {}, part)
        file_dims = [schema.field(c).type.list_size for c in columns]
        if first is None:
            first, dims = identity, file_dims
        elif (identity["engine"], identity["made_with"], file_dims) != (
            first["engine"], first["made_with"], dims,
        ):  # fmt: skip
            raise KnnError(
                f"{part} was made by another engine or with other options than {files[0]}: "
                "an index directory must come from one job"
            )
    assert first is not None and dims is not None
    return SourceSurvey(files, rows, sum(dims), first["engine"], first["directory"],
                        first["made_with"])  # fmt: skip


def _file_identity(meta: dict[bytes, bytes], part: Path) -> dict[str, Any]:
    """The engine and row options a feature file records (runtime/parquet.output_metadata)."""
    try:
        manifest = json.loads(meta[b"interactive.manifest"])
        run = json.loads(meta.get(b"interactive.run", b"{}"))
        directory = meta[b"interactive.engine"].decode()
        export, layers = manifest["export"], manifest["layers"]
    except (KeyError, ValueError, TypeError):
        raise KnnError(
            f"{part}: no interactive metadata (interactive.manifest, interactive.engine): not "
            "written by `interactive index` or `interactive extract`"
        ) from None
    options = run.get("options") if isinstance(run.get("options"), dict) else {}
    engine = run.get("engine") if isinstance(run.get("engine"), dict) else {}
    return {
        "engine": engine_identity(export, layers, engine.get("weights_sha256")),
        "directory": directory,
        "made_with": {
            "layers": options.get("layers"),
            "normalize": options.get("normalize", "none"),
            "concat": bool(options.get("concat", False)),
        },
    }


def engine_identity(
    export: dict[str, Any], layers: list[dict[str, Any]], weights_sha256: str | None
) -> dict[str, Any]:
    """What makes two engines give the same features: the export settings (heatmaps aside: they
    do not change the features), the layers and their sizes, the weights' sha256 (when known)."""
    return {
        "export": {k: v for k, v in export.items() if k != "heatmaps"},
        "layers": [{"name": t["name"], "dim": int(t["dim"])} for t in layers],
        "weights_sha256": weights_sha256,
    }


def manifest_identity(manifest: EngineManifest) -> dict[str, Any]:
    data = manifest.data
    return engine_identity(data["export"], data["layers"], data["weights"].get("sha256"))


# --- building -------------------------------------------------------------------------------


@dataclass
class KnnBuild:
    """What `build_knn` did: the plan, the counts and the time."""

    directory: Path
    plan: IndexPlan
    vectors: int
    dim: int
    failed_rows: int  # rows of INDEX_DIR/_errors (no features), skipped
    skipped_rows: int  # rows of the feature files without features (an extract file's), skipped
    shards: int
    seconds: float
    columns: list[str] = field(default_factory=list)

    def line(self) -> str:
        skipped = self.failed_rows + self.skipped_rows
        return (
            f"kNN index {self.directory}: {self.vectors} vectors of dimension {self.dim} "
            f"({', '.join(self.columns)}) from {self.shards} shards, {skipped} failed rows "
            f"skipped; {self.plan.kind} index {self.plan.factory} "
            f"{_params_text(self.plan.search)}in {self.seconds:.1f} s"
        )


def _params_text(params: dict[str, int]) -> str:
    return f"({', '.join(f'{k}={v}' for k, v in params.items())}) " if params else ""


def faiss_module() -> ModuleType:
    return optional_import(
        "faiss", "kNN indexes need faiss", "`pip install 'interactive-features[knn]'`"
    )


def build_knn(
    index_dir: str | os.PathLike[str],
    knn_dir: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    index: str = "auto",
    memory: str | int = "4G",
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> KnnBuild:
    """Build a FAISS index of INDEX_DIR's vectors into KNN_DIR (see the module docstring).

    `layers`: the columns a vector is made of (runtime/vectors.vector_columns: default the
    `--concat` column, else every layer). `index`: "auto", "flat", "ivf", "hnsw", "ivfpq";
    `memory`: the index's budget ("4G" or bytes). KNN_DIR must be empty (or not exist) unless
    `overwrite`, and must not lie inside INDEX_DIR. `say` gets progress lines. Raises KnnError
    (IndexJobError) for a bad INDEX_DIR/KNN_DIR, LockedError when another build holds KNN_DIR,
    MissingDependency without faiss.
    """
    faiss = faiss_module()
    say = say or (lambda line: None)
    started = time.perf_counter()
    source, out = Path(index_dir), Path(knn_dir)
    _check_directories(source, out)
    columns = vector_columns(source, layers)
    survey = survey_source(source, columns)
    budget = memory if isinstance(memory, int) else parse_memory(memory)
    plan = choose_index(sum(survey.rows), survey.dim, budget, index)
    failed = failed_rows(source)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KnnError(f"cannot create -o {out}: {err.strerror or err}") from err
    with exclusive_lock(out / LOCK_FILE, f"kNN directory {out}"):
        _prepare_knn_dir(out, overwrite)
        say(
            f"knn: {sum(survey.rows)} vectors of dimension {survey.dim} in {len(survey.files)} "
            f"shards ({failed} failed rows skipped); index {plan.factory}, about "
            f"{format_bytes(plan.estimated_bytes)}"
        )
        built = faiss.index_factory(survey.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        if plan.kind == "hnsw":
            built.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if plan.kind == "ivfpq":
            # index_factory turns on polysemous training (codes ordered for Hamming filtering,
            # which search never uses here): 4 s -> 0.15 s for IVF64,PQ16x6 on 4,000 vectors.
            faiss.downcast_index(faiss.extract_index_ivf(built)).do_polysemous_training = False
        if plan.train_size:
            sample = _training_sample(survey, columns, plan.train_size)
            say(f"knn: training {plan.factory} on {len(sample)} vectors")
            built.train(sample)
            del sample
        added, skipped = _add_shards(built, survey, columns, out / ROWS_FILE, say)
        if plan.kind in ("ivf", "ivfpq"):  # `reconstruct` (search --by-id) needs the map
            faiss.extract_index_ivf(built).make_direct_map()
        write_index(built, out / INDEX_FILE)
        result = KnnBuild(out, plan, added, survey.dim, failed, skipped, len(survey.files),
                          time.perf_counter() - started, list(columns))  # fmt: skip
        write_json(out / META_FILE, _metadata(source, survey, columns, plan, budget, result))
    return result


def _check_directories(source: Path, out: Path) -> None:
    if not source.exists():
        raise KnnError(f"{source}: no such index directory")
    inside = Path(absolute_path(str(out))).is_relative_to(absolute_path(str(source)))
    if source.is_dir() and inside:
        raise KnnError(
            f"-o {out} is inside the index directory {source}: dataset readers would take its "
            "Parquet file for a shard; choose a directory outside it"
        )


def _prepare_knn_dir(out: Path, overwrite: bool) -> None:
    """Refuse a KNN_DIR holding anything but a lock file, unless `overwrite`; then drop the old
    metadata first, so that a build interrupted from here on leaves an unfinished directory."""
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if present and not overwrite:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise KnnError(f"-o {out} is not empty ({shown}): pass --overwrite to replace its index")
    (out / META_FILE).unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp"):  # a killed build's temporaries (runtime/atomic.py names)
        tmp.unlink(missing_ok=True)


def _training_sample(survey: SourceSurvey, columns: Sequence[str], size: int) -> np.ndarray:
    """`size` vectors drawn uniformly from the whole collection (positions drawn from the
    footers' row counts), reading only the files that hold some."""
    total = sum(survey.rows)
    rng = np.random.default_rng(SAMPLE_SEED)
    positions = np.sort(rng.choice(total, size=min(size, total), replace=False))
    starts = np.cumsum([0, *survey.rows])
    parts = []
    for i, part in enumerate(survey.files):
        lo, hi = np.searchsorted(positions, starts[i : i + 2])
        if hi > lo:
            batch, _ = file_vectors(part, columns)
            local = positions[lo:hi] - starts[i]
            parts.append(batch.vectors[local[local < len(batch.vectors)]])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _add_shards(
    built: Any, survey: SourceSurvey, columns: Sequence[str], rows_file: Path,
    say: Callable[[str], None],
) -> tuple[int, int]:  # fmt: skip
    """Add every file's vectors in order, writing rows.parquet beside (one row group per file);
    returns (vectors added, rows without features)."""
    added = skipped = 0
    last = time.monotonic()
    total = sum(survey.rows)
    with atomic_path(rows_file) as tmp, open(tmp, "wb") as f, pq.ParquetWriter(f, ROWS_SCHEMA) as w:
        for i, part in enumerate(survey.files):
            batch, missing = file_vectors(part, columns)
            skipped += missing
            if len(batch.vectors):
                built.add(batch.vectors)
            w.write_table(_rows_table(batch, part.name))
            added += len(batch.paths)
            if time.monotonic() - last > 10 or i + 1 == len(survey.files):
                say(f"knn: added {added}/{total} vectors ({i + 1}/{len(survey.files)} shards)")
                last = time.monotonic()
    return added, skipped


def _rows_table(batch: VectorBatch, shard: str) -> pa.Table:
    """rows.parquet's rows for one file's vectors, in their order."""
    n = len(batch.paths)
    columns = {
        "id": batch.ids if batch.ids is not None else [None] * n,
        "path": batch.paths,
        "path_bytes": batch.path_bytes or [None] * n,
        "shard": [shard] * n,
    }
    return pa.table(columns, schema=ROWS_SCHEMA)


def write_index(built: Any, target: Path) -> None:
    """The index into `target` atomically, through an open file (any name the OS allows)."""
    faiss = faiss_module()
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        faiss.write_index(built, faiss.PyCallbackIOWriter(f.write))


def _metadata(
    source: Path, survey: SourceSurvey, columns: Sequence[str], plan: IndexPlan, budget: int,
    result: KnnBuild,
) -> dict[str, Any]:  # fmt: skip
    faiss = faiss_module()
    directory = survey.engine_directory
    if not os.path.isabs(directory) and os.path.isdir(directory):
        directory = absolute_path(directory)  # as the index job named it, from here
    return {
        "format": FORMAT,
        "source": absolute_path(str(source)),
        "columns": list(columns),
        "dim": survey.dim,
        "made_with": survey.made_with,
        "engine": {"directory": directory, **survey.engine},
        "index": {
            **asdict(plan),
            "metric": "inner_product",
            "memory_budget": budget,
            "file_bytes": (result.directory / INDEX_FILE).stat().st_size,
        },  # fmt: skip
        "counts": {
            "vectors": result.vectors,
            "failed_rows": result.failed_rows,
            "skipped_rows": result.skipped_rows,
            "shards": result.shards,
        },  # fmt: skip
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 3),
        "package_version": package_version(),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }


# --- searching ------------------------------------------------------------------------------


@dataclass
class Hit:
    rank: int
    score: float
    row: int  # the FAISS row
    id: str | None
    path: str
    path_bytes: bytes | None


@dataclass
class SearchResults:
    """Top-k of each query: `scores` [N, k] float32 (cosines; NaN where no hit), `rows` [N, k]
    int64 FAISS rows (-1 where no hit), `queries[i]` query i's label, `errors[i]` why query i
    could not be searched (its row is all NaN / -1). `hits(i)` lists query i's hits."""

    queries: list[str]
    scores: np.ndarray
    rows: np.ndarray
    table: pa.Table  # rows.parquet
    errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    def __repr__(self) -> str:
        return f"SearchResults(N={len(self)}, k={self.scores.shape[1]}, failed={len(self.errors)})"

    def hits(self, i: int) -> list[Hit]:
        found = []
        ids, paths, raw = (self.table.column(c) for c in ("id", "path", "path_bytes"))
        for rank, (row, score) in enumerate(
            zip(self.rows[i], self.scores[i], strict=True), start=1
        ):
            if row < 0:
                continue
            r = int(row)
            found.append(Hit(rank, float(score), r, ids[r].as_py(), paths[r].as_py(),
                             raw[r].as_py()))  # fmt: skip
        return found

    def to_arrow(self) -> pa.Table:
        """One row per hit: query, rank, score, path, id, row, path_bytes."""
        records = [
            {"query": self.queries[i], "rank": h.rank, "score": h.score, "path": h.path,
             "id": h.id, "row": h.row, "path_bytes": h.path_bytes}
            for i in range(len(self)) for h in self.hits(i)
        ]  # fmt: skip
        schema = pa.schema(
            [("query", pa.string()), ("rank", pa.int32()), ("score", pa.float32()),
             ("path", pa.string()), ("id", pa.string()), ("row", pa.int64()),
             ("path_bytes", pa.binary())]
        )  # fmt: skip
        return pa.Table.from_pylist(records, schema=schema)


class KnnIndex:
    """A KNN_DIR opened for search. `engine`: the engine directory for image queries (default:
    the one recorded at build time); it must have the identity the index was built from."""

    def __init__(self, directory: Path, meta: dict[str, Any], index: Any, rows: pa.Table,
                 engine: str | os.PathLike[str] | None = None) -> None:  # fmt: skip
        self.directory = directory
        self.meta = meta
        self.index = index
        self.rows = rows
        self.engine = Path(engine) if engine is not None else None
        self._extractor: Extractor | None = None
        self._row_of_id: dict[str, int] | None = None

    @classmethod
    def open(
        cls, knn_dir: str | os.PathLike[str], engine: str | os.PathLike[str] | None = None
    ) -> KnnIndex:
        """Open KNN_DIR (made by `build_knn`); raises KnnError naming what is wrong."""
        faiss = faiss_module()
        directory = Path(knn_dir)
        if not directory.is_dir():
            raise KnnError(f"{knn_dir}: no such kNN directory")
        meta_file = directory / META_FILE
        if not meta_file.is_file():
            raise KnnError(
                f"{knn_dir}: not a kNN directory (no {META_FILE}; an unfinished build? run "
                "`interactive knn build` again)"
            )
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            with open(directory / INDEX_FILE, "rb") as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
            rows = read_table(directory / ROWS_FILE)
            recorded = int(meta["counts"]["vectors"])
            for key in ("columns", "dim", "made_with", "engine", "index"):
                meta[key]  # noqa: B018 - every key search reads, checked once here
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise KnnError(f"{knn_dir}: unreadable kNN directory ({_short(err)})") from err
        if not index.ntotal == rows.num_rows == recorded:
            raise KnnError(
                f"{knn_dir}: {INDEX_FILE} holds {index.ntotal} vectors, {ROWS_FILE} "
                f"{rows.num_rows}, {META_FILE} says {recorded}: rebuild it"
            )
        return cls(directory, meta, index, rows, engine)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        kind = self.meta["index"]["factory"]
        return f"KnnIndex({self.directory}, {len(self)} vectors, dim {self.dim}, {kind})"

    # --- queries --------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray | Sequence[ImageSource], k: int = 10, batch_size: int = 16
    ) -> SearchResults:
        """Top-k by cosine of each query: a float [N, dim] array of vectors (L2-normalised
        here), or images (paths, bytes, arrays, PIL images) extracted with the engine. An image
        that cannot be read becomes `errors[i]`."""
        if isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.dtype.kind == "f":
            labels = [f"<vector {i}>" for i in range(len(queries))]
            return self._search(labels, queries, {}, k)
        images = list(queries)
        from .images import describe

        vectors, errors = self.image_vectors(images, batch_size)
        return self._search([describe(s) for s in images], vectors, errors, k)

    def search_ids(self, ids: Sequence[str], k: int = 10) -> SearchResults:
        """Top-k of rows already in the index, by `id` (or by `path` where the source had no
        ids: an `extract` file), their vectors read back from the index (exact for flat, hnsw and
        ivf; the PQ code's approximation for ivfpq). An unknown id becomes `errors[i]`."""
        rows_of = self._row_lookup()
        vectors = np.full((len(ids), self.dim), np.nan, np.float32)
        errors = {}
        for i, key in enumerate(ids):
            row = rows_of.get(key)
            if row is None:
                errors[i] = f"{key}: no such id in {self.directory}"
            else:
                vectors[i] = self.index.reconstruct(row)
        return self._search(list(ids), vectors, errors, k)

    def file_of(self, key: str) -> str | None:
        """The file of the row with id (or path) `key`, as Python opens it; None if unknown."""
        row = self._row_lookup().get(key)
        if row is None:
            return None
        raw = self.rows.column("path_bytes")[row].as_py()
        return os.fsdecode(raw) if raw else self.rows.column("path")[row].as_py()

    def _row_lookup(self) -> dict[str, int]:
        if self._row_of_id is None:
            ids = self.rows.column("id").to_pylist()
            paths = self.rows.column("path").to_pylist()
            self._row_of_id = {(i if i is not None else p): r for r, (i, p) in
                               enumerate(zip(ids, paths, strict=True))}  # fmt: skip
        return self._row_of_id

    def _search(
        self, labels: list[str], vectors: np.ndarray, errors: dict[int, str], k: int
    ) -> SearchResults:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        n = len(labels)
        if vectors.shape[1:] != (self.dim,):
            raise KnnError(
                f"query vectors of dimension {vectors.shape[1:]}; the index has {self.dim}"
            )
        scores = np.full((n, k), np.nan, np.float32)
        rows = np.full((n, k), -1, np.int64)
        good = [i for i in range(n) if i not in errors]
        if good:
            queries = l2_normalize(np.asarray(vectors[good], np.float32)).astype(np.float32)
            self._set_search_parameters(k)
            found_scores, found_rows = self.index.search(np.ascontiguousarray(queries), k)
            scores[good], rows[good] = found_scores, found_rows
            scores[rows < 0] = np.nan
        return SearchResults(labels, scores, rows, self.rows, errors)

    def _set_search_parameters(self, k: int) -> None:
        faiss = faiss_module()
        space = faiss.ParameterSpace()
        for name, value in self.meta["index"]["search"].items():
            if name == "efSearch":
                value = max(value, k)  # HNSW returns at most efSearch hits
            space.set_index_parameter(self.index, name, value)

    # --- image queries --------------------------------------------------------------------

    def extractor(self) -> Extractor:
        """The engine for image queries, opened once and checked against the index."""
        if self._extractor is None:
            from .api import Extractor

            engine = self.engine or Path(self.meta["engine"]["directory"])
            self.check_engine(engine)
            self._extractor = Extractor.open(engine)
        return self._extractor

    def check_engine(self, engine: str | os.PathLike[str]) -> EngineManifest:
        """The engine's manifest, or KnnError when its identity or layers differ from the
        index's."""
        try:
            manifest = EngineManifest.load(engine)
        except ValueError as err:
            recorded = "" if self.engine else f" (recorded in {self.directory / META_FILE})"
            raise KnnError(f"engine{recorded}: {err}; pass --engine DIR") from None
        wanted = {k: v for k, v in self.meta["engine"].items() if k != "directory"}
        have = manifest_identity(manifest)
        needed = self._engine_layers()
        missing = [t for t in needed if t not in manifest.layers]
        if missing:
            raise KnnError(
                f"engine {engine} lacks the layers {', '.join(missing)} of the index "
                f"{self.directory} (it has {', '.join(manifest.layers)})"
            )
        if wanted["weights_sha256"] is None or have["weights_sha256"] is None:
            have["weights_sha256"] = wanted["weights_sha256"]  # not recorded: not comparable
        if have != wanted:
            raise KnnError(
                f"engine {engine} is not the engine the index {self.directory} was built from "
                f"({_identity_difference(wanted, have)}): pass the engine that made it"
            )
        return manifest

    def _engine_layers(self) -> list[str]:
        made = self.meta["made_with"]
        if self.meta["columns"] == ["features"] and made.get("concat"):
            layers = made.get("layers")
            return list(layers) if layers else [t["name"] for t in self.meta["engine"]["layers"]]
        return list(self.meta["columns"])

    def image_vectors(
        self, images: Sequence[ImageSource], batch_size: int = 16
    ) -> tuple[np.ndarray, dict[int, str]]:
        """[N, dim] vectors of images, made as the index's rows were (the same Parquet writer
        and post-processing), NaN rows for the images that failed (errors[i] says why)."""
        extractor = self.extractor()
        features = extractor.extract(images, batch_size=batch_size)
        made = self.meta["made_with"]
        table = features_table(
            [f"<query {i}>" for i in range(len(images))], features,
            layers=made.get("layers"), normalize=made.get("normalize", "none"),
            concat=bool(made.get("concat")),
        )  # fmt: skip
        ok = features.ok
        vectors = np.full((len(images), self.dim), np.nan, np.float32)
        if ok.any():
            vectors[ok] = table_vectors(table.filter(pa.array(ok)), self.meta["columns"])
        return vectors, dict(features.errors)

    def close(self) -> None:
        if self._extractor is not None:
            self._extractor.close()
            self._extractor = None

    def __enter__(self) -> KnnIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity_difference(wanted: dict[str, Any], have: dict[str, Any]) -> str:
    if wanted["layers"] != have["layers"]:
        return "other layers or layer sizes"
    if wanted["weights_sha256"] != have["weights_sha256"]:
        return "other weights"
    differ = [k for k in sorted({*wanted["export"], *have["export"]})
              if wanted["export"].get(k) != have["export"].get(k)]  # fmt: skip
    key = differ[0] if differ else "?"
    there, here = wanted["export"].get(key), have["export"].get(key)
    return f"export setting {key}: {there!r} there, {here!r} here"


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def iter_hits(results: SearchResults) -> Iterator[tuple[int, Hit]]:
    """(query position, hit) of every query that was searched, in order."""
    for i in range(len(results)):
        for hit in results.hits(i):
            yield i, hit
