"""runtime/knn.py and `interactive knn build` / `interactive search`: real FAISS indexes over real
index OUTDIRs (the narrow engine on generated JPEGs, a failure among them), searched by image and
by id through the CLI and the API; the approximate index types against the exact one on a few
thousand clustered vectors written with the project's own Parquet writers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from interactive_features.export.exporter import export_engine
from interactive_features.runtime import KnnIndex, SearchResults, build_knn
from interactive_features.runtime.api import Features
from interactive_features.runtime.cli import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    KNN_INDEX_KINDS,
    main,
)
from interactive_features.runtime.index import IndexOptions, run_index, shard_name
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.knn import (
    INDEX_FILE,
    INDEX_KINDS,
    META_FILE,
    ROWS_FILE,
    KnnError,
    choose_index,
    parse_memory,
)
from interactive_features.runtime.locks import exclusive_lock
from interactive_features.runtime.manifest import EngineManifest
from interactive_features.runtime.parquet import (
    features_table,
    output_metadata,
    read_table,
    write_table,
)
from interactive_features.runtime.search import BACKGROUND, sheet_size
from PIL import Image

import imagegen

# Sizes landing in the narrow engine's three buckets (256x256, 288x224, 224x288).
SIZES = [(256, 256), (300, 240), (240, 300), (260, 250), (320, 250), (250, 320)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("knn") / "photos"
    root.mkdir()
    good = [imagegen.jpeg(root, w, h, name=f"p{i}.jpg", seed=i) for i, (w, h) in enumerate(SIZES)]
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return good


def _index(engine: Path, photos: list[Path], out: Path, **options: object) -> Path:
    settings = IndexOptions(batch_size=2, shard_size=2, **options)  # type: ignore[arg-type]
    run_index(photos[0].parent, engine, out, settings, LocalExecutor(workers=0))
    return out


@pytest.fixture(scope="module")
def concat_outdir(narrow_engine: Path, photos: list[Path], tmp_path_factory) -> Path:
    """The paper's vectors in one `features` column: pool-3 and fc-6, each L2-normalised."""
    out = tmp_path_factory.mktemp("knn") / "concat"
    return _index(narrow_engine, photos, out, layers=["pool-3", "fc-6"], normalize="l2",
                  concat=True)  # fmt: skip


@pytest.fixture(scope="module")
def layers_outdir(narrow_engine: Path, photos: list[Path], tmp_path_factory) -> Path:
    """Every layer in its own column, not normalised."""
    return _index(narrow_engine, photos, tmp_path_factory.mktemp("knn") / "layers")


@pytest.fixture(scope="module")
def concat_knn(concat_outdir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knn") / "knn"
    assert main(["knn", "build", str(concat_outdir), "-o", str(out)]) == EXIT_OK
    return out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- build ----------------------------------------------------------------------------------


def test_build_writes_index_rows_and_metadata(
    concat_outdir: Path, narrow_engine: Path, photos: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    out = tmp_path / "knn"
    assert main(["knn", "build", str(concat_outdir), "-o", str(out)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "6 vectors of dimension" in captured.out and "1 failed rows skipped" in captured.out
    assert "knn: added 6/6 vectors (4/4 shards)" in captured.err  # progress on stderr
    index = faiss.read_index(str(out / INDEX_FILE))  # a plain FAISS file
    assert index.ntotal == 6 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    rows = read_table(out / ROWS_FILE)
    assert rows.column_names == ["id", "path", "path_bytes", "shard"]
    assert sorted(rows["path"].to_pylist()) == sorted(str(p) for p in photos)
    assert set(rows["shard"].to_pylist()) <= {shard_name(k) for k in range(4)}
    meta = json.loads((out / META_FILE).read_text())
    manifest = EngineManifest.load(narrow_engine)
    assert meta["columns"] == ["features"] and meta["dim"] == 256 // 8 + 4096 // 8
    assert meta["source"] == str(concat_outdir.resolve())
    assert meta["counts"] == {"vectors": 6, "failed_rows": 1, "skipped_rows": 0, "shards": 4}
    assert meta["index"]["kind"] == "flat" and meta["index"]["factory"] == "Flat"
    assert meta["engine"]["directory"] == str(narrow_engine)
    assert meta["engine"]["weights_sha256"] == manifest.data["weights"]["sha256"]
    assert meta["engine"]["export"]["weights"] == "random:0"
    assert meta["made_with"] == {"layers": ["pool-3", "fc-6"], "normalize": "l2", "concat": True}
    assert meta["package_version"] and meta["faiss_version"] == faiss.__version__
    # The vectors are the paper's: row r of the index is rows.parquet's row r.
    by_path = dict(zip(rows["path"].to_pylist(), range(6), strict=True))
    with KnnIndex.open(out) as knn:
        want, errors = knn.image_vectors([str(p) for p in photos])
    assert not errors
    np.testing.assert_allclose(index.reconstruct(by_path[str(photos[2])]), want[2], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, rtol=1e-5)


def test_refusals_exit_1_with_one_line(
    concat_outdir: Path, concat_knn: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["knn", "build", str(tmp_path / "missing"), "-o", str(tmp_path / "k")]) == 1
    assert "no such index directory" in _one_line(capsys.readouterr().err)
    # A non-empty KNN_DIR: refused, untouched; --overwrite replaces the index.
    before = (concat_knn / META_FILE).read_bytes()
    assert main(["knn", "build", str(concat_outdir), "-o", str(concat_knn)]) == EXIT_FATAL
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("interactive knn: error: -o ") and "not empty" in line
    assert "--overwrite" in line and (concat_knn / META_FILE).read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["knn", "build", str(concat_outdir), "-o", str(other), "--overwrite"]) == 0
    assert (other / "notes.txt").read_text() == "mine" and (other / META_FILE).is_file()
    capsys.readouterr()
    # Inside INDEX_DIR: refused (dataset readers would read rows.parquet as a shard).
    assert main(["knn", "build", str(concat_outdir), "-o", str(concat_outdir / "knn")]) == 1
    assert "inside the index directory" in _one_line(capsys.readouterr().err)
    # Another build holding the lock.
    busy = tmp_path / "busy"
    busy.mkdir()
    with exclusive_lock(busy / ".interactive.lock", "test"):
        assert main(["knn", "build", str(concat_outdir), "-o", str(busy)]) == EXIT_FATAL
    assert "is in use by" in _one_line(capsys.readouterr().err)
    # An index type that does not fit the memory budget.
    assert main(["knn", "build", str(concat_outdir), "-o", str(tmp_path / "m"),
                 "--index", "flat", "--memory", "1K"]) == EXIT_FATAL  # fmt: skip
    assert "over the memory budget" in _one_line(capsys.readouterr().err)


def test_bad_usage_exits_2(
    layers_outdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "k")
    for argv in (
        ["knn", "build", str(layers_outdir), "-o", out, "--layers", "conv-1-1"],  # not a column
        ["knn", "build", str(layers_outdir), "-o", out, "--layers", "pool-9"],  # not a layer
        ["knn", "build", str(layers_outdir), "-o", out, "--memory", "lots"],
        ["knn", "build", str(layers_outdir), "-o", out, "--index", "lsh"],
        ["search", out, "q.jpg", "-k", "0"],
        ["search", out, "q.jpg", "--sheet", "out.jpg"],
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == EXIT_USAGE, argv
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interactive")
    assert not (tmp_path / "k").exists()


def test_layers_build_and_api_search(
    layers_outdir: Path, narrow_engine: Path, photos: list[Path], tmp_path: Path
) -> None:
    said: list[str] = []
    result = build_knn(layers_outdir, tmp_path / "k", layers=["pool-5", "fc-6"], say=said.append)
    assert result.vectors == 6 and result.failed_rows == 1 and result.plan.kind == "flat"
    assert result.dim == 512 // 8 + 4096 // 8 and result.columns == ["pool-5", "fc-6"]
    assert any("training" not in line and "6 vectors" in line for line in said)
    with KnnIndex.open(tmp_path / "k") as knn:
        assert len(knn) == 6 and knn.meta["columns"] == ["pool-5", "fc-6"]
        results = knn.search([str(p) for p in photos[:3]], k=4)
        assert isinstance(results, SearchResults) and results.errors == {}
        assert [results.hits(i)[0].path for i in range(3)] == [str(p) for p in photos[:3]]
        np.testing.assert_allclose(results.scores[:, 0], 1.0, atol=1e-4)
        assert np.all(np.diff(results.scores, axis=1) <= 1e-6)  # best first
        # The same search from vectors: the vector of an image is what the index holds for it.
        vectors, _ = knn.image_vectors([str(photos[4])])
        by_vector = knn.search(vectors * 3.0, k=2)  # scaled: normalised before the search
        assert by_vector.hits(0)[0].path == str(photos[4]) and by_vector.queries == ["<vector 0>"]
        table = results.to_arrow()
        assert table.num_rows == 12 and table.column_names[:5] == [
            "query", "rank", "score", "path", "id",
        ]  # fmt: skip
        # k beyond the collection: the missing hits are absent, scores NaN.
        wide = knn.search(vectors, k=8)
        assert len(wide.hits(0)) == 6 and np.isnan(wide.scores[0, 6:]).all()


# --- search ---------------------------------------------------------------------------------


def test_search_by_image_table_json_and_sheet(
    concat_knn: Path, photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    queries = [str(photos[0]), str(photos[3])]
    assert main(["search", str(concat_knn), *queries, "-k", "3"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["query", "rank", "score", "path", "id"] and len(lines) == 7
    first = lines[1].split()
    assert first[0] == queries[0] and first[1] == "1" and first[3] == queries[0]
    assert float(first[2]) > 0.9999
    sheet = tmp_path / "sheet.png"
    argv = ["search", str(concat_knn), *queries, "-k", "3", "--json", "--sheet", str(sheet)]
    assert main(argv) == EXIT_OK
    captured = capsys.readouterr()
    hits = [json.loads(line) for line in captured.out.splitlines()]
    assert len(hits) == 6 and [h["rank"] for h in hits] == [1, 2, 3, 1, 2, 3]
    for query in queries:
        best = next(h for h in hits if h["query"] == query and h["rank"] == 1)
        assert best["path"] == query and best["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(best["id"]) == 16
    assert f"wrote {sheet}" in captured.err
    with Image.open(sheet) as picture:
        assert picture.format == "PNG" and picture.size == sheet_size(2, 3)
        pixels = np.asarray(picture.convert("RGB"))
    assert (pixels != BACKGROUND).any(axis=2).mean() > 0.3  # thumbnails drawn
    assert pixels.std() > 20


def test_search_by_id(concat_knn: Path, photos: list[Path], capsys: pytest.CaptureFixture) -> None:
    rows = read_table(concat_knn / ROWS_FILE)
    target = rows["id"][0].as_py()
    assert main(["search", str(concat_knn), "--by-id", target, "-k", "2", "--json"]) == EXIT_OK
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["id"] == target and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["path"] == rows["path"][0].as_py()
    # An unknown id beside a known one: one line for it, exit 3; alone: exit 1.
    argv = ["search", str(concat_knn), "--by-id", "0123456789abcdef", target]
    assert main(argv) == EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "0123456789abcdef: no such id" in _one_line(captured.err)
    assert target in captured.out
    assert main(["search", str(concat_knn), "--by-id", "nope"]) == EXIT_FATAL
    assert _one_line(capsys.readouterr().err).startswith("interactive search: error: nope")


def test_failed_query_images(
    concat_knn: Path, photos: list[Path], capsys: pytest.CaptureFixture
) -> None:
    broken = str(photos[0].parent / "broken.jpg")
    assert main(["search", str(concat_knn), broken, str(photos[1]), "-k", "1"]) == EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "broken.jpg" in _one_line(captured.err)
    assert str(photos[1]) in captured.out and broken not in captured.out
    assert main(["search", str(concat_knn), broken]) == EXIT_FATAL
    assert "broken.jpg" in _one_line(capsys.readouterr().err)


def test_search_refusals(
    concat_knn: Path, narrow_engine: Path, photos: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    query = str(photos[0])
    assert main(["search", str(tmp_path / "missing"), query]) == EXIT_FATAL
    assert "no such kNN directory" in _one_line(capsys.readouterr().err)
    (tmp_path / "half").mkdir()
    assert main(["search", str(tmp_path / "half"), query]) == EXIT_FATAL
    assert "unfinished build" in _one_line(capsys.readouterr().err)
    # Another engine (other weights): refused before any image is read.
    other = tmp_path / "other-engine"
    export_engine(_request(other), log=lambda line: None)
    assert main(["search", str(concat_knn), query, "--engine", str(other)]) == EXIT_FATAL
    line = _one_line(capsys.readouterr().err)
    assert "is not the engine the index" in line and "weights" in line
    # An engine without the index's layers.
    fewer = tmp_path / "fewer-layers"
    export_engine(_request(fewer, weights="random:0", layers=("pool-5", "fc-6")),
                  log=lambda line: None)  # fmt: skip
    assert main(["search", str(concat_knn), query, "--engine", str(fewer)]) == EXIT_FATAL
    assert "lacks the layers pool-3 of the index" in _one_line(capsys.readouterr().err)
    # The same engine under another directory name is accepted.
    assert main(["search", str(concat_knn), query, "--engine", str(narrow_engine)]) == EXIT_OK
    capsys.readouterr()
    # The default engine (the recorded directory) gone: says to pass --engine.
    meta = json.loads((concat_knn / META_FILE).read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in (INDEX_FILE, ROWS_FILE):
        (moved / name).write_bytes((concat_knn / name).read_bytes())
    meta["engine"]["directory"] = str(tmp_path / "gone")
    (moved / META_FILE).write_text(json.dumps(meta))
    assert main(["search", str(moved), query]) == EXIT_FATAL
    assert "--engine" in _one_line(capsys.readouterr().err)


def _request(out: Path, **settings: object):
    from interactive_features.export.exporter import ExportRequest
    from interactive_features.runtime.settings import ExportSettings

    values: dict = {"weights": "random:1", "width_div": 8, "area": 256, **settings}
    return ExportRequest(out=out, settings=ExportSettings(**values), buckets="256x256",
                         validate=False)  # fmt: skip


def test_search_in_a_fresh_process(concat_knn: Path, photos: list[Path]) -> None:
    """The real command in its own interpreter: it exits cleanly (FAISS's and Arrow's threads
    must not abort the exit) and never imports torch."""
    code = f"""
import sys
from interactive_features.runtime.cli import main
code = main(["search", {str(concat_knn)!r}, {str(photos[5])!r}, "-k", "2", "--json"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
assert not bad, bad
sys.exit(code)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["path"] == str(photos[5])


def test_build_from_an_extract_file(
    narrow_engine: Path, photos: list[Path], tmp_path: Path
) -> None:
    """An `extract` file: every layer, its failed row inline (skipped and counted), no ids (the
    path is the key of --by-id)."""
    from interactive_features.runtime.extract import extract_to_parquet

    target = tmp_path / "features.parquet"
    broken = str(photos[0].parent / "broken.jpg")
    extract_to_parquet(narrow_engine, [*map(str, photos[:3]), broken], target)
    result = build_knn(target, tmp_path / "k")
    assert (result.vectors, result.skipped_rows, result.failed_rows) == (3, 1, 0)
    with KnnIndex.open(tmp_path / "k") as knn:
        assert knn.meta["columns"] == EngineManifest.load(narrow_engine).layers
        hit = knn.search_ids([str(photos[1])], k=1).hits(0)[0]
        assert hit.path == str(photos[1]) and hit.id is None
        assert knn.search([str(photos[2])], k=1).hits(0)[0].path == str(photos[2])


# --- choosing the index, and the approximate ones against the exact one ------------------------


def test_index_kinds_agree() -> None:
    assert KNN_INDEX_KINDS == INDEX_KINDS


def test_choose_index_rule() -> None:
    assert parse_memory("4G") == 4 * 2**30 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 2**30) and parse_memory("1000") == 1000
    with pytest.raises(ValueError):
        parse_memory("4 apples")
    memory = 4 * 2**30
    assert choose_index(500, 6848, memory).factory == "Flat"
    hnsw = choose_index(50_000, 512, memory)
    assert hnsw.factory == "HNSW32" and hnsw.search == {"efSearch": 256}
    # Too little memory for HNSW's links, enough for an unquantized IVF; half the budget
    # bounds the training sample.
    ivf = choose_index(100_000, 512, parse_memory("200M"))
    assert ivf.factory == "IVF1024,Flat" and ivf.search == {"nprobe": 128}
    assert ivf.train_size == 100 * 2**20 // (4 * 512)
    # A million full-width concatenations: quantized (m divides 6848 = 2^6 x 107), an HNSW
    # coarse quantizer, the lists lowered so that the sample (2 GiB of 4) has 39 per list.
    pq = choose_index(1_000_000, 6848, memory)
    assert pq.factory == "IVF1024_HNSW32,PQ214x8", pq
    assert pq.train_size == 2 * 2**30 // (4 * 6848) >= 39 * 1024
    assert pq.estimated_bytes <= memory
    assert pq.search == {"nprobe": 128, "quantizer_efSearch": 256}
    # A forced type that cannot fit is refused, naming the budget.
    with pytest.raises(KnnError, match="over the memory budget"):
        choose_index(1_000_000, 6848, memory, "flat")
    with pytest.raises(KnnError, match="needs at least 39 vectors, there are 6: use flat"):
        choose_index(6, 544, memory, "ivf")


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    points = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, d))
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_outdir(narrow_engine: Path, tmp_path_factory) -> Path:
    """4,000 clustered 512-d vectors as an OUTDIR's `fc-6` column in 4 shards, written by the
    project's own writers (features_table, output_metadata, write_table)."""
    out = tmp_path_factory.mktemp("knn") / "synthetic"
    manifest = EngineManifest.load(narrow_engine)
    run = {
        "command": "index",
        "options": {"layers": ["fc-6"], "normalize": "none", "concat": False},
        "engine": {"weights_sha256": manifest.data["weights"]["sha256"]},
    }
    metadata = {k.decode(): v.decode() for k, v in output_metadata(manifest, run).items()}
    vectors = _clustered(4000, 512, seed=1)
    for k in range(4):
        rows = vectors[k * 1000 : (k + 1) * 1000]
        paths = [f"/synthetic/{k}/{i}.jpg" for i in range(len(rows))]
        features = Features({"fc-6": rows}, {}, [(256, 256)] * len(rows), [(256, 256)] * len(rows))
        table = features_table(paths, features, metadata, ids=[f"{k:04d}{i:012d}" for i in
                               range(len(rows))], layers=["fc-6"])  # fmt: skip
        write_table(table, out / shard_name(k))
    return out


def test_approximate_recall_against_exact(synthetic_outdir: Path, tmp_path: Path) -> None:
    queries = _clustered(200, 512, seed=2)  # not in the index
    exact = build_knn(synthetic_outdir, tmp_path / "flat", index="flat")
    assert exact.vectors == 4000 and exact.plan.factory == "Flat"
    with KnnIndex.open(tmp_path / "flat") as knn:
        truth = knn.search(queries, k=10).rows
    floors = {"hnsw": 0.95, "ivf": 0.95, "ivfpq": 0.7}
    measured = {}
    for kind, floor in floors.items():
        said: list[str] = []
        result = build_knn(synthetic_outdir, tmp_path / kind, index=kind, say=said.append)
        with KnnIndex.open(tmp_path / kind) as knn:
            found = knn.search(queries, k=10).rows
            assert len(knn) == 4000
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        measured[kind] = (round(float(recall), 3), result.plan.factory, result.plan.search,
                          result.plan.train_size)  # fmt: skip
        assert recall >= floor, (kind, recall, result.plan)
        if result.plan.train_size:
            assert any(f"training {result.plan.factory} on" in line for line in said)
    print(f"\nrecall@10 against the exact index, 4000 x 512 clustered vectors: {measured}")
    auto = choose_index(4000, 512, 4 * 2**30)
    assert auto.factory == "Flat"  # below 10,000 vectors: exact


def test_by_id_on_an_ivf_index(synthetic_outdir: Path, tmp_path: Path) -> None:
    build_knn(synthetic_outdir, tmp_path / "ivf", index="ivf")
    with KnnIndex.open(tmp_path / "ivf") as knn:
        results = knn.search_ids(["0002000000000017"], k=3)
        assert results.hits(0)[0].id == "0002000000000017"
        assert results.hits(0)[0].path == "/synthetic/2/17.jpg"
        assert results.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_rows_schema() -> None:
    """rows.parquet's schema is what the docs say (id, path, path_bytes, shard)."""
    from interactive_features.runtime.knn import ROWS_SCHEMA

    assert ROWS_SCHEMA.names == ["id", "path", "path_bytes", "shard"]
    assert ROWS_SCHEMA.field("path_bytes").type == pa.binary()
