"""The outputs as other tools read them, failures present: an index OUTDIR through pandas,
pyarrow.dataset, polars, duckdb and embedding-reader (autofaiss's reader), each in its one
documented call; `extract` streaming into a file or a directory, its -o checks, 0 images."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import Extractor
from interactive_features.runtime import extract as extract_module
from interactive_features.runtime import index as index_module
from interactive_features.runtime.cli import EXIT_PARTIAL, EXIT_USAGE, main
from interactive_features.runtime.extract import extract_to_parquet
from interactive_features.runtime.index import IndexOptions, read_index, run_index, shard_files
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.parquet import (
    STATUS_COLUMNS,
    layer_matrix,
    read_table,
    write_table,
)

import imagegen
from conftest import photos

LAYERS = ["pool-3", "fc-6"]
METADATA_KEYS = {b"interactive.engine", b"interactive.weights", b"interactive.manifest"}
METADATA_KEYS |= {b"interactive.run"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """(good images, bad ones: a truncated JPEG and a photo of a bucket the engine lacks)."""
    root = tmp_path_factory.mktemp("readers") / "photos"
    root.mkdir()
    good = [imagegen.jpeg(root, 256 + i, 256, name=f"sq{i}.jpg", seed=i) for i in range(5)]
    good += [imagegen.jpeg(root, 300, 230, name=f"wide{i}.jpg", seed=9 + i) for i in range(3)]
    whole = imagegen.jpeg(root.parent, 320, 240, name="whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    bad = [root / "truncated.jpg", imagegen.jpeg(root, 150, 170, name="nobucket.jpg")]
    return good, bad


@pytest.fixture(scope="module")
def outdir(narrow_engine: Path, images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "out"
    options = IndexOptions(batch_size=2, shard_size=4, layers=LAYERS)
    report = run_index(images[0][0].parent, narrow_engine, out, options, LocalExecutor(workers=0))
    assert (report.images, report.errors) == (10, 2)
    (out / ".interactive.lock").touch()  # as while a job runs: readers must skip it
    return out


@pytest.fixture(scope="module")
def expected(narrow_engine: Path, images) -> dict[str, dict[str, np.ndarray]]:
    """path -> layer -> the API's feature row, for the good images."""
    good = [str(p) for p in images[0]]
    with Extractor.open(narrow_engine) as ex:
        features = ex.extract(good)
    return {p: {t: features[t][i] for t in LAYERS} for i, p in enumerate(good)}


def assert_rows(paths: list[str], matrices: dict[str, np.ndarray], expected) -> None:
    """The ok rows and only them, each layer's matrix the API's (fp32 batch noise aside)."""
    assert sorted(paths) == sorted(expected)
    for layer in LAYERS:
        want = np.stack([expected[p][layer] for p in paths])
        assert matrices[layer].shape == want.shape and matrices[layer].dtype == np.float32
        np.testing.assert_allclose(matrices[layer], want, rtol=1e-5, atol=1e-6 * want.max())


def test_layout(outdir: Path) -> None:
    """Feature shards hold the ok rows, _errors/ the others; one metadata layout in both."""
    parts = sorted(p.name for p in outdir.glob("part-*.parquet"))
    errors = sorted(p.name for p in (outdir / "_errors").iterdir())
    assert parts and errors and all(name.endswith(".pq") for name in errors)
    failed = pq.read_table(outdir / "_errors")  # the one call for the failed rows
    assert failed.column_names == [c for c in STATUS_COLUMNS if c != "sha256"]
    assert sorted(Path(p).name for p in failed["path"].to_pylist()) == [
        "nobucket.jpg",
        "truncated.jpg",
    ]
    assert any("has no exported graph" in s for s in failed["status"].to_pylist())
    for part in [*outdir.glob("part-*.parquet"), *(outdir / "_errors").iterdir()]:
        assert set(pq.read_schema(part).metadata) >= METADATA_KEYS, part
    everything = read_index(outdir)
    assert everything.num_rows == 10 and everything["fc-6"].null_count == 2


def test_pandas_and_pyarrow(outdir: Path, expected) -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(outdir)
    matrices = {t: np.stack(frame[t].to_numpy()).astype(np.float32) for t in LAYERS}
    assert_rows(frame["path"].tolist(), matrices, expected)
    assert set(frame["status"]) == {"ok"}
    for table in (ds.dataset(outdir).to_table(), pq.read_table(outdir)):
        matrices = {t: layer_matrix(table, t) for t in LAYERS}
        assert_rows(table["path"].to_pylist(), matrices, expected)


def test_polars(outdir: Path, expected) -> None:
    polars = pytest.importorskip("polars")
    frame = polars.read_parquet(f"{outdir}/part-*.parquet")
    matrices = {t: frame[t].to_numpy().astype(np.float32) for t in LAYERS}
    assert_rows(frame["path"].to_list(), matrices, expected)
    failed = polars.read_parquet(f"{outdir}/_errors/*.pq")
    assert failed.height == 2


def test_duckdb(outdir: Path, expected) -> None:
    duckdb = pytest.importorskip("duckdb")
    relation = duckdb.sql(f"select * from '{outdir}/part-*.parquet'")
    table = getattr(relation, "to_arrow_table", relation.arrow)()  # duckdb 2 / 1
    matrices = {t: np.array(table[t].to_pylist(), np.float32) for t in LAYERS}  # list, not fixed
    assert_rows(table["path"].to_pylist(), matrices, expected)
    failed = duckdb.sql(f"select count(*) from read_parquet('{outdir}/_errors/*.pq')").fetchall()
    assert failed == [(2,)]


def test_embedding_reader(outdir: Path, expected) -> None:
    """What `autofaiss build_index --embeddings=OUTDIR --file_format=parquet` reads with."""
    reader_module = pytest.importorskip("embedding_reader")
    reader = reader_module.EmbeddingReader(
        str(outdir), file_format="parquet", embedding_column="fc-6", meta_columns=["path"]
    )
    assert reader.count == len(expected)
    rows, paths = [], []
    for embeddings, meta in reader(batch_size=3, start=0, end=reader.count):
        rows.append(embeddings)
        paths += meta["path"].tolist()
    matrix = np.concatenate(rows).astype(np.float32)
    want = np.stack([expected[p]["fc-6"] for p in paths])
    assert sorted(paths) == sorted(expected)
    np.testing.assert_allclose(matrix, want, rtol=1e-5, atol=1e-6 * want.max())


def test_a_crash_between_a_shards_two_files(
    narrow_engine: Path, images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard k's error file written, its feature file not (killed between): the rerun indexes
    the ok inputs again, once; the failed ones are done (ids and statuses of both files)."""
    source = images[0][0].parent
    out, options = tmp_path / "out", IndexOptions(batch_size=4, shard_size=100, layers=LAYERS)
    real = index_module.write_table

    def dies_on_features(table: pa.Table, path: Path) -> Path:
        if path.suffix == ".parquet":
            raise KeyboardInterrupt
        return real(table, path)

    monkeypatch.setattr(index_module, "write_table", dies_on_features)
    with pytest.raises(KeyboardInterrupt):
        run_index(source, narrow_engine, out, options, LocalExecutor(workers=0))
    monkeypatch.undo()
    assert [p.name for p in (out / "_errors").iterdir()] == ["part-00000.pq"]
    assert not list(out.glob("part-*"))
    report = run_index(source, narrow_engine, out, options, LocalExecutor(workers=0))
    assert (report.new, report.processed, report.images, report.errors) == (8, 8, 10, 2)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00001.parquet"]
    ids = read_index(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 10


def test_an_older_outdir_is_split_on_rerun(
    narrow_engine: Path, images, outdir: Path, tmp_path: Path
) -> None:
    """Failed rows inside feature shards (the layout before _errors/): a rerun moves them to
    _errors/ without processing anything; every reader then sees the ok rows only."""
    out = tmp_path / "old"
    shutil.copytree(outdir, out)
    for part, k in shard_files(out).items():
        if part.parent != out:
            feature = out / f"part-{k:05d}.parquet"
            rows = [read_table(part)] + ([read_table(feature)] if feature.exists() else [])
            merged = pa.concat_tables(rows[::-1], promote_options="default")
            write_table(merged.select(read_table(feature).column_names), feature)
            part.unlink()
    assert pq.read_table(out)["fc-6"].null_count == 2
    options = IndexOptions(batch_size=2, shard_size=4, layers=LAYERS)
    report = run_index(images[0][0].parent, narrow_engine, out, options, LocalExecutor(workers=0))
    assert (report.processed, report.images, report.errors) == (0, 10, 2)
    assert pq.read_table(out)["fc-6"].null_count == 0 and pq.read_table(out).num_rows == 8
    assert read_index(out)["id"].to_pylist() == read_index(outdir)["id"].to_pylist()


# ------------------------------------------------------------------------------------------------
# extract


def test_extract_streams_into_a_directory(
    narrow_engine: Path, images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = images
    inputs = [str(p) for p in [good[0], bad[0], *good[1:], bad[1]]]
    writes: list[int] = []
    real = extract_module.pq.ParquetWriter

    class Counting(real):  # type: ignore[misc,valid-type]
        def write_table(self, table: pa.Table, *args, **kwargs) -> None:
            writes.append(table.num_rows)
            super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(extract_module.pq, "ParquetWriter", Counting)
    args = ["extract", "--engine", str(narrow_engine), "--batch-size", "2", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "dir"), *inputs]) == EXIT_PARTIAL
    out = tmp_path / "dir" / "features.parquet"
    # One write per finished batch (buckets 256x256 and 288x224, batches of 2), not one at the end.
    assert len(writes) >= 4 and sum(writes) == len(inputs)
    assert not [p for p in out.parent.iterdir() if p.name != "features.parquet"]  # no temporary
    streamed = pq.read_table(out).sort_by("path")
    with Extractor.open(narrow_engine) as ex:
        whole = extract_module.features_table(sorted(inputs), ex.extract(sorted(inputs)))
    assert streamed.schema.remove_metadata() == whole.schema
    for column in ("path", "path_bytes", "width", "height", "bucket", "status"):
        assert streamed[column].to_pylist() == whole[column].to_pylist(), column
    for layer in ex.layers:  # batches of 2 here, of 16 there: fp32 sums may round apart
        np.testing.assert_allclose(
            layer_matrix(streamed, layer), layer_matrix(whole, layer), rtol=1e-5, atol=1e-6
        )
    assert set(streamed.schema.metadata) >= METADATA_KEYS


def test_iter_extract_is_lazy(narrow_engine: Path, images) -> None:
    good = [str(p) for p in images[0] if p.name.startswith("sq")]
    taken: list[int] = []

    def sources():
        for i, path in enumerate(good):
            taken.append(i)
            yield path

    with Extractor.open(narrow_engine) as ex:
        chunks = ex.iter_extract(sources(), batch_size=2)
        positions, first = next(chunks)
        assert positions == [0, 1] and len(taken) == 2  # the first batch, before the rest is read
        assert first["fc-6"].shape[0] == 2 and not first.errors
        rest = list(chunks)
        whole = ex.extract(good)
    got = np.concatenate([first["fc-6"], *(c["fc-6"] for _, c in rest)])
    order = positions + [i for p, _ in rest for i in p]
    assert sorted(order) == list(range(len(good)))
    np.testing.assert_allclose(got, whole["fc-6"][order], rtol=1e-5, atol=1e-6)


def test_extract_output_checks_and_zero_images(narrow_engine: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "interactive_features.runtime.cli", "extract"]
    command += ["--engine", str(narrow_engine), "-o", str(tmp_path / "out.csv"), str(photos()[0])]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "extract writes Parquet only" in result.stderr and not list(tmp_path.iterdir())
    summary = extract_to_parquet(narrow_engine, [], tmp_path / "empty.parquet", progress=False)
    assert "0/0 images" in summary.line() and "(no images)" in summary.line()
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and "fc-6" in table.column_names
