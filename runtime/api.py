"""The Python API: `Extractor.open(engine_dir).extract(images)` -> `Features`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import Backend, open_backend
from .batching import batches_by_bucket
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageSource,
    PreparedImage,
    describe,
    prepare_image,
)
from .manifest import PACKAGE, BadBucketError, EngineManifest, heatmap_name
from .settings import NORMALIZATIONS

if TYPE_CHECKING:
    import pandas
    import pyarrow

    from .index import IndexReport

log = logging.getLogger(PACKAGE)


@dataclass
class Features(Mapping[str, np.ndarray]):
    """Per-layer features, rows in input order: `feats["pool-3"]` is float32 [N, D].

    Rows of inputs that failed are NaN, and `errors[i]` says why. `sizes[i]` is the original
    (width, height) and `buckets[i]` the (W, H) it was resized to (None where unknown).
    `heatmaps[layer][i]` is image i's gamma-hat map when the engine exports heatmaps.
    `names[i]` labels input i (its path, `<bytes N>`, `<array HxWx3 uint8>`): the `path` column
    of `to_arrow()` / `to_pandas()`.
    """

    layers: dict[str, np.ndarray]
    errors: dict[int, str] = field(default_factory=dict)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)
    buckets: list[tuple[int, int] | None] = field(default_factory=list)
    heatmaps: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """`Features(N=5, failed=1, layers={pool-1: 64, pool-2: 128}, heatmaps)`."""
        dims = ", ".join(f"{t}: {rows.shape[1]}" for t, rows in self.layers.items())
        extra = ", heatmaps" if self.heatmaps else ""
        return f"Features(N={len(self.sizes)}, failed={len(self.errors)}, layers={{{dims}}}{extra})"

    def to_arrow(
        self,
        paths: Sequence[str | os.PathLike[str]] | None = None,
        *,
        layers: Sequence[str] | None = None,
        normalize: str = "none",
        concat: bool = False,
        heatmaps: bool = False,
    ) -> pyarrow.Table:
        """The rows as `interactive extract` writes them (path, path_bytes, width, height, bucket,
        one fixed_size_list<float32> column per layer or one `features` with `concat`, status;
        runtime/parquet.features_table). `paths` default to `names`."""
        from .parquet import features_table

        labels = list(paths) if paths is not None else self._labels()
        if len(labels) != len(self.sizes):
            raise ValueError(f"{len(labels)} paths for {len(self.sizes)} rows")
        return features_table(
            [os.fspath(p) for p in labels], self,
            layers=layers, normalize=normalize, concat=concat, heatmaps=heatmaps,
        )  # fmt: skip

    def to_pandas(
        self, paths: Sequence[str | os.PathLike[str]] | None = None, **options: Any
    ) -> pandas.DataFrame:
        """`to_arrow(...).to_pandas()`: the same columns, a layer's cells as float32 arrays
        (needs pandas)."""
        return self.to_arrow(paths, **options).to_pandas()

    def _labels(self) -> list[str]:
        if len(self.names) == len(self.sizes):
            return list(self.names)
        return [f"<input {i}>" for i in range(len(self.sizes))]

    def __getitem__(self, layer: str) -> np.ndarray:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r}; this engine has {list(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def ok(self) -> np.ndarray:
        """Boolean [N]: which rows hold features."""
        n = len(self.sizes)
        mask = np.ones(n, dtype=bool)
        mask[list(self.errors)] = False
        return mask

    def concat(self, normalize: str = "l2", layers: Iterable[str] | None = None) -> np.ndarray:
        """[N, sum D_t]: the layers side by side, each L2-normalised first (`normalize="l2"`)."""
        check_normalize(normalize)
        parts = [self[t] for t in (layers if layers is not None else self.layers)]
        if normalize == "l2":
            parts = [l2_normalize(p) for p in parts]
        return np.concatenate(parts, axis=1)


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be 'l2' or 'none', got {normalize!r}")
    return normalize


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class Extractor:
    """An engine directory opened with one backend. Not thread-safe; open one per thread."""

    def __init__(self, manifest: EngineManifest, backend: Backend) -> None:
        self.manifest = manifest
        self.backend = backend
        self._bad_buckets: dict[tuple[int, int], str] = {}  # bucket -> why its graph won't open

    @classmethod
    def open(
        cls, engine_dir: str | os.PathLike[str], backend: str = "auto", **options: Any
    ) -> Extractor:
        """Open `engine_dir` (made by `interactive export`) with `backend`.

        `backend`: "auto" (TensorRT plans for this GPU, else ONNX Runtime CUDA, else ONNX Runtime
        CPU), or one of "ort", "ort-cuda", "ort-tensorrt", "torch", "tensorrt"
        (runtime/registry.py; a backend that cannot run here raises EngineError saying
        why). Options go to the backend, named from one vocabulary
        (runtime/backends/base.py's OPTIONS; an option the backend does not take is
        refused by name), e.g. for "ort": `max_open_buckets=4` (sessions kept open, least
        recently used closed first), `threads=0` (all cores); for "torch": `device`,
        `precision`, `compile`; for "tensorrt": `precision`, `lazy`, `device`.
        """
        manifest = EngineManifest.load(engine_dir)
        return cls(manifest, open_backend(manifest, backend, **options))

    @property
    def layers(self) -> list[str]:
        return self.manifest.layers

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        return self.manifest.bucket_for(width, height)

    def prepare(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
        """Decode and resize one image to its bucket (exported or not); raises ImageError."""
        return prepare_image(source, self.manifest.bucket_for, max_pixels=max_pixels)

    def extract(self, images: Iterable[ImageSource], batch_size: int = 16) -> Features:
        """Features of every image (paths, bytes or HxWx3 uint8 arrays, any sizes).

        An input that cannot be read, or whose bucket has no graph, becomes `errors[i]` and a NaN
        row; the other images are processed. Holds every row; `iter_extract` streams them.
        """
        sources = list(images)
        prepared = ((i, self.try_prepare(source)) for i, source in enumerate(sources))
        features = self.extract_prepared(prepared, len(sources), batch_size)
        features.names = [describe(source) for source in sources]
        return features

    def iter_extract(
        self, images: Iterable[ImageSource], batch_size: int = 16
    ) -> Iterator[tuple[list[int], Features]]:
        """`extract`, streamed: yields (positions, Features of those inputs) as batches finish.

        `images` is consumed lazily (a generator of any length works) and memory stays bounded
        by one partial batch per bucket. Each chunk's `errors` are keyed by row in the chunk;
        `positions[j]` is row j's position in `images`. Chunks come in the order batches finish
        (an image waits for its bucket's batch), every input exactly once.
        """
        prepared = ((i, self.try_prepare(source)) for i, source in enumerate(images))
        return self.iter_prepared(prepared, batch_size)

    def try_prepare(self, source: ImageSource) -> PreparedImage | str:
        """`prepare`, with an input's own failure returned as its message instead of raised."""
        try:
            return self.prepare(source)
        except ImageError as err:
            return str(err)
        except Exception as err:  # a decoder bug must cost one row, never the whole call
            kind = type(err).__name__
            return f"{describe(source)}: unexpected error while decoding: {kind}: {err}"

    def extract_prepared(
        self, items: Iterable[tuple[int, PreparedImage | str]], n: int, batch_size: int = 16
    ) -> Features:
        """Features of `n` inputs arriving as (position, prepared image or error message).

        Items may come in any order (e.g. from decoding processes); an image waits in its
        bucket's queue until a batch is full or the items end.
        """
        features = self._empty(n)
        for positions, chunk in self.iter_prepared(items, batch_size):
            for layer, rows in features.layers.items():
                rows[positions] = chunk.layers[layer]
            for layer, maps in features.heatmaps.items():
                for j, i in enumerate(positions):
                    maps[i] = chunk.heatmaps[layer][j]
            for j, i in enumerate(positions):
                features.sizes[i], features.buckets[i] = chunk.sizes[j], chunk.buckets[j]
            features.errors.update({positions[j]: e for j, e in chunk.errors.items()})
        return features

    def iter_prepared(
        self, items: Iterable[tuple[int, PreparedImage | str]], batch_size: int = 16
    ) -> Iterator[tuple[list[int], Features]]:
        """`extract_prepared`, streamed as `iter_extract` streams (failed inputs come in the
        chunk of the next batch to finish, after its rows, or in a last chunk)."""
        exported = set(self.manifest.buckets)
        failed: list[tuple[int, str]] = []  # failed inputs not yet yielded
        seen: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # i -> size, bucket

        def usable() -> Iterator[tuple[int, PreparedImage]]:
            for i, item in items:
                if isinstance(item, PreparedImage) and item.bucket not in exported:
                    item = str(self.manifest.missing_bucket(item.bucket))
                if isinstance(item, PreparedImage):
                    seen[i] = ((item.width, item.height), item.bucket)
                    if item.bucket in self._bad_buckets:
                        failed.append((i, self._bad_buckets[item.bucket]))
                        continue
                    yield i, item
                    continue
                failed.append((i, item))
                log.info("skipped input %d: %s", i, item)

        def chunk(
            indices: list[int], outputs: dict[str, np.ndarray] | None, reason: str = ""
        ) -> tuple[list[int], Features]:
            rows = [*((i, reason) for i in indices), *failed]
            failed.clear()
            out = self._empty(len(rows))
            for j, (i, error) in enumerate(rows):
                if error:
                    out.errors[j] = error
                if i in seen:
                    out.sizes[j], out.buckets[j] = seen.pop(i)
            if outputs is not None:
                self._store(out, list(range(len(indices))), outputs)
            return [i for i, _ in rows], out

        for batch in batches_by_bucket(usable(), batch_size):
            try:
                outputs = self.backend.run(batch.bucket, batch.pixels)
            except BadBucketError as err:
                # That bucket's graph cannot be opened: its images become error rows (now and
                # for the rest of this extractor's life), the other buckets go on.
                reason = self._bad_buckets[batch.bucket] = str(err)
                log.warning("%s", reason)
                yield chunk(batch.indices, None, reason)
                continue
            yield chunk(batch.indices, outputs)
        if failed:
            yield chunk([], None)

    def _empty(self, n: int) -> Features:
        dims = self.manifest.layer_dims
        layers = {t: np.full((n, d), np.nan, dtype=np.float32) for t, d in dims.items()}
        heatmaps: dict[str, list[np.ndarray | None]] = {}
        if self.manifest.data.get("heatmaps"):
            heatmaps = {t: [None] * n for t in dims}
        return Features(layers, {}, [None] * n, [None] * n, heatmaps)

    @staticmethod
    def _store(features: Features, indices: list[int], outputs: dict[str, np.ndarray]) -> None:
        for layer, rows in features.layers.items():
            rows[indices] = outputs[layer]
        for layer, maps in features.heatmaps.items():
            for row, i in enumerate(indices):
                maps[i] = outputs[heatmap_name(layer)][row]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def index_job(
    source: str | os.PathLike[str],
    engine: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    normalize: str = "none",
    concat: bool = False,
    heatmaps: bool = False,
    content_hash: bool = False,
    path_column: str = "path",
    columns: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    shard_size: int = 1000,
    workers: int | None = None,
    backend: str = "auto",
    ray: str | None = None,
    actors: int = 1,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool | None = False,
) -> IndexReport:
    """`interactive index SOURCE --engine ENGINE -o OUT ...` from Python: the same job, options,
    resume and output (README "Indexing a collection"); returns its IndexReport (`images`,
    `errors`, `processed`, `new`, `gone`, `seconds`, `by_bucket`...).

    `columns`: a Parquet/CSV SOURCE's columns carried into every row (["all"]: all but
    `path_column`). SOURCE may also be a tar shard, a brace pattern of them or a URL (README).
    `workers`: decoding processes (default: the cores less one; 0 decodes in this process).
    `ray`: None runs on this machine; "local" starts a local Ray instance, "auto" or
    "ray://HOST:10001" joins a cluster, with `actors` extraction actors. Errors in the job raise
    (IndexJobError, LockedError when another job holds OUT); failed inputs are rows whose
    `status` says why (`report.errors` counts them).
    """
    from .index import Executor, IndexOptions, run_index

    options = IndexOptions(
        batch_size=batch_size, shard_size=shard_size,
        layers=list(layers) if layers is not None else None, normalize=normalize,
        concat=concat, path_column=path_column, limit=limit, heatmaps=heatmaps,
        content_hash=content_hash, columns=list(columns) if columns is not None else None,
    )  # fmt: skip
    executor: Executor
    if ray is not None:
        from .ray_index import RayExecutor

        executor = RayExecutor(address=None if ray == "local" else ray, actors=actors,
                               backend=backend)  # fmt: skip
    else:
        from .index_local import LocalExecutor

        n = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
        executor = LocalExecutor(workers=n, backend=backend)
    return run_index(
        source, Path(engine), Path(out), options, executor,
        overwrite=overwrite, retry_failed=retry_failed, progress=progress,
    )  # fmt: skip
