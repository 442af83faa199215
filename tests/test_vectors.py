"""runtime/vectors.py: the paper's post-processing (each layer L2-normalised, side by side, the
whole normalised) read from a real index OUTDIR with failures present, and from an `extract`
file whose failed rows are inline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from interactive_features.runtime import Extractor
from interactive_features.runtime.extract import extract_to_parquet
from interactive_features.runtime.index import IndexOptions, run_index
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.index_sources import IndexJobError
from interactive_features.runtime.vectors import (
    failed_rows,
    feature_columns,
    iter_vectors,
    vector_columns,
)

import imagegen

LAYERS = ["pool-3", "fc-6"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vectors") / "photos"
    root.mkdir()
    good = [imagegen.jpeg(root, 256 + i, 256, name=f"sq{i}.jpg", seed=i) for i in range(5)]
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return good


def expected_vectors(engine: Path, paths: list[Path]) -> dict[str, np.ndarray]:
    with Extractor.open(engine) as ex:
        features = ex.extract([str(p) for p in paths])
    parts = [features[t] / np.linalg.norm(features[t], axis=1, keepdims=True) for t in LAYERS]
    joined = np.concatenate(parts, axis=1)
    joined /= np.linalg.norm(joined, axis=1, keepdims=True)
    return {str(p): joined[i] for i, p in enumerate(paths)}


def test_outdir_vectors(narrow_engine: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = IndexOptions(batch_size=2, shard_size=2, layers=LAYERS)
    run_index(images[0].parent, narrow_engine, out, options, LocalExecutor(workers=0))
    assert feature_columns(out) == LAYERS
    assert vector_columns(out) == LAYERS and vector_columns(out, ["fc-6"]) == ["fc-6"]
    with pytest.raises(IndexJobError, match="no feature column pool-9; it has pool-3, fc-6"):
        vector_columns(out, ["pool-9"])
    batches = list(iter_vectors(out, LAYERS))
    assert len(batches) == 3 and all(skipped == 0 for _, skipped in batches)  # ok shards only
    assert failed_rows(out) == 1
    want = expected_vectors(narrow_engine, images)
    paths = [p for batch, _ in batches for p in batch.paths]
    got = np.concatenate([batch.vectors for batch, _ in batches])
    assert sorted(paths) == sorted(want) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, np.stack([want[p] for p in paths]), atol=1e-5)
    assert all(len(batch.ids or []) == len(batch.paths) for batch, _ in batches)


def test_extract_file_vectors(narrow_engine: Path, images: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "features.parquet"
    extract_to_parquet(
        narrow_engine, [*map(str, images), str(images[0].parent / "broken.jpg")], target
    )
    assert vector_columns(target) == feature_columns(target)  # every layer
    ((batch, skipped),) = iter_vectors(target, LAYERS)
    assert skipped == 1 and batch.ids is None and len(batch.paths) == len(images)
    assert failed_rows(target) == 0
    with pytest.raises(IndexJobError, match="no such index directory"):
        vector_columns(tmp_path / "missing")
