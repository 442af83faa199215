"""`interactive index --columns`: a Parquet or CSV list's columns carried into every row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime.api import index_job
from interactive_features.runtime.index import IndexJobError, IndexOptions, read_index, run_index
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.index_sources import ColumnsError
from PIL import Image
from test_index import cli

INLINE = LocalExecutor(workers=0)


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """list.parquet (and list.csv): 4 images and a broken one, with typed extra columns."""
    root = tmp_path_factory.mktemp("columns")
    names = []
    for i in range(4):
        Image.new("RGB", (60 + 10 * i, 60), (40 * i, 90, 200)).save(root / f"p{i}.jpg")
        names.append(f"p{i}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    names.append("broken.jpg")
    table = pa.table(
        {
            "url": pa.array([f"https://example.com/{n}" for n in names]),
            "file": pa.array(names),
            "label": pa.array([3, 1, 4, 1, 5], pa.int64()),
            "score": pa.array([0.5, 0.25, None, 1.0, 2.0], pa.float32()),
            "tags": pa.array([["a"], [], ["b", "c"], None, ["d"]], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, root / "list.parquet")
    pacsv.write_csv(table.drop_columns(["tags"]), root / "list.csv")
    return root


def by_path(table: pa.Table) -> dict[str, dict]:
    return {row["path"].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


def test_parquet_columns_keep_their_types_in_ok_and_error_rows(
    narrow_engine: Path, listing: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    options = IndexOptions(path_column="file", columns=["label", "score", "tags"], shard_size=3)
    report = run_index(listing / "list.parquet", narrow_engine, out, options, INLINE)
    assert (report.images, report.errors) == (5, 1)
    rows = by_path(read_index(out))
    assert [rows[f"p{i}.jpg"]["label"] for i in range(4)] == [3, 1, 4, 1]
    assert rows["p2.jpg"]["score"] is None and rows["p1.jpg"]["score"] == 0.25
    assert rows["p2.jpg"]["tags"] == ["b", "c"] and rows["p3.jpg"]["tags"] is None
    # The failed row keeps SOURCE's columns in _errors/ (with STATUS_COLUMNS), not the features.
    failed = pq.read_table(next((out / "_errors").glob("part-*.pq")))
    assert failed["label"].to_pylist() == [5] and failed["tags"].to_pylist() == [["d"]]
    assert failed.schema.field("label").type == pa.int64() and "conv-5-3" not in failed.schema.names
    # The ok shards (what dataset readers see) keep the Parquet types.
    dataset = pq.read_table(out)
    assert dataset.schema.field("score").type == pa.float32()
    assert dataset.schema.field("tags").type == pa.list_(pa.string())
    assert dataset.num_rows == 4 and "url" not in dataset.schema.names
    # A rerun with the same columns resumes: nothing is read again.
    again = run_index(listing / "list.parquet", narrow_engine, out, options, INLINE)
    assert (again.processed, again.images) == (0, 5)
    # A changed value is a changed input (the output follows SOURCE): only its row is redone.
    changed = pq.read_table(listing / "list.parquet")
    labels = changed["label"].to_pylist()
    changed = changed.set_column(2, "label", pa.array([30, *labels[1:]], pa.int64()))
    pq.write_table(changed, tmp_path / "changed.parquet")
    (listing / "list.parquet").replace(listing / "saved.parquet")
    (tmp_path / "changed.parquet").replace(listing / "list.parquet")
    try:
        redone = run_index(listing / "list.parquet", narrow_engine, out, options, INLINE)
    finally:
        (listing / "saved.parquet").replace(listing / "list.parquet")
    assert (redone.processed, redone.new, redone.gone, redone.images) == (1, 1, 1, 5)
    assert by_path(read_index(out))["p0.jpg"]["label"] == 30
    # Other columns shape other rows: refused like any other row option.
    with pytest.raises(IndexJobError, match="columns"):
        other = IndexOptions(path_column="file", columns=["label"], shard_size=3)
        run_index(listing / "list.parquet", narrow_engine, out, other, INLINE)


def test_all_carries_every_column_but_the_path_and_csv_gives_strings(
    narrow_engine: Path, listing: Path, tmp_path: Path
) -> None:
    report = index_job(
        listing / "list.csv", narrow_engine, tmp_path / "csv", path_column="file",
        columns=["all"], workers=0,
    )  # fmt: skip
    assert report.images == 5
    table = read_index(tmp_path / "csv")
    assert {"url", "label", "score"} <= set(table.schema.names)
    assert table.schema.field("label").type == pa.string()
    assert by_path(table)["p0.jpg"]["label"] == "3"
    assert by_path(table)["broken.jpg"]["url"] == "https://example.com/broken.jpg"
    assert table.schema.names.count("path") == 1 and "file" not in table.schema.names


def test_unknown_and_clashing_columns_are_usage_errors(
    narrow_engine: Path, listing: Path, tmp_path: Path
) -> None:
    with pytest.raises(ColumnsError, match=r"\['nope'\]: not in .*its columns: \['url', 'label'"):
        options = IndexOptions(path_column="file", columns=["label", "nope"])
        run_index(listing / "list.parquet", narrow_engine, tmp_path / "a", options, INLINE)
    with pytest.raises(ColumnsError, match="needs a Parquet or CSV list"):
        run_index(listing, narrow_engine, tmp_path / "b", IndexOptions(columns=["x"]), INLINE)
    clashing = tmp_path / "clash.parquet"
    pq.write_table(
        pa.table({"path": [str(listing / "p0.jpg")], "width": [1], "pool-5.heatmap": [2]}), clashing
    )
    with pytest.raises(ColumnsError, match=r"\['width', 'pool-5.heatmap'\]: the output has its"):
        run_index(clashing, narrow_engine, tmp_path / "c", IndexOptions(columns=["all"]), INLINE)
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before OUTDIR is made
    # The CLI: exit 2, the available columns named.
    where = ["--engine", str(narrow_engine), "-o", str(tmp_path / "d"), "--path-column", "file"]
    result = cli(str(listing / "list.csv"), *where, "--columns", "label,nope")
    assert result.returncode == 2, result.stderr
    assert "--columns ['nope']: not in" in result.stderr and "'score'" in result.stderr
    assert "Traceback" not in result.stderr
