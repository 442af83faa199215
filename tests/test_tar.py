"""WebDataset tar shards as `interactive index` SOURCE: members by byte range, samples' fields."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import Extractor
from interactive_features.runtime.index import IndexJobError, IndexOptions, read_index, run_index
from interactive_features.runtime.index_local import LocalExecutor
from interactive_features.runtime.index_sources import expand_braces
from interactive_features.runtime.inputs import Where, read_where
from interactive_features.runtime.tar_inputs import is_tar, split_key
from PIL import Image
from test_index import cli

INLINE = LocalExecutor(workers=0)
ODD = os.fsdecode(b"caf\xff.jpg")  # a member name that is not UTF-8


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + 8 * (i % 5), 64), (30 * (i % 8), 80, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def make_shard(path: Path, first: int, n: int, mode: str = "w") -> None:
    """WebDataset samples key.jpg, key.json, key.cls, key.txt (json before the image in one)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for i in range(first, first + n):
            if i % 2:
                add(tf, f"k{i:04d}.json", json.dumps({"i": i}).encode())
            add(tf, f"k{i:04d}.jpg", jpeg(i))
            if not i % 2:
                add(tf, f"k{i:04d}.json", json.dumps({"i": i}).encode())
            add(tf, f"k{i:04d}.cls", str(i).encode())
            add(tf, f"k{i:04d}.txt", f"caption {i}".encode())


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.tar: 4 full samples, then odd members an attacker might write."""
    path = tmp_path_factory.mktemp("tar") / "data.tar"
    make_shard(path, 0, 4)
    with tarfile.open(path, "a", format=tarfile.GNU_FORMAT) as tf:
        add(tf, "dir/x.seg.png", jpeg(9))  # a key with a folder, a two-dot extension
        add(tf, ODD, jpeg(10))
        add(tf, "../escape.jpg", jpeg(11))  # never extracted: just a name
        add(tf, "bad.jpg", b"\xff\xd8 not a jpeg")
        add(tf, "badcls.jpg", jpeg(12))
        add(tf, "badcls.cls", b"twelve")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k0000.jpg"
        tf.addfile(link)
        add(tf, "notes.md", b"# not an image")
    return path


def rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in read_index(out).to_pylist()}


def test_a_tar_is_indexed_member_by_member(narrow_engine: Path, shard: Path, tmp_path: Path):
    out = tmp_path / "out"
    report = run_index(shard, narrow_engine, out, IndexOptions(shard_size=5), LocalExecutor(1))
    got = rows(out)
    label = str(shard)
    assert len(got) == report.images == 10 and report.errors == 3
    first = got[f"{label}/k0000.jpg"]
    assert (first["json"], first["cls"], first["txt"]) == ('{"i": 0}', 0, "caption 0")
    assert got[f"{label}/k0003.jpg"]["json"] == '{"i": 3}'  # its .json came first
    assert got[f"{label}/dir/x.seg.png"]["status"] == "ok"
    assert got[f"{label}/dir/x.seg.png"]["cls"] is None
    assert got[f"{label}/../escape.jpg"]["status"] == "ok"
    odd = got[f"{label}/caf\\xff.jpg"]
    assert odd["status"] == "ok" and odd["path_bytes"] == os.fsencode(f"{label}/{ODD}")
    assert "not an image" in got[f"{label}/bad.jpg"]["status"]
    assert "badcls.cls: not an int64 class: 'twelve'" in got[f"{label}/badcls.jpg"]["status"]
    assert "symbolic link" in got[f"{label}/link.jpg"]["status"]
    # The features are those of the member's bytes.
    with Extractor.open(narrow_engine) as extractor:
        want = extractor.extract([jpeg(0), jpeg(10)])
    table = read_index(out)
    for name, i in ((f"{label}/k0000.jpg", 0), (f"{label}/caf\\xff.jpg", 1)):
        at = table["path"].to_pylist().index(name)
        assert np.array_equal(np.array(table["pool-5"][at].as_py(), np.float32), want["pool-5"][i])
    # A rerun reads nothing; a member appended is the one new input.
    again = run_index(shard, narrow_engine, out, IndexOptions(shard_size=5), INLINE)
    assert (again.processed, again.images) == (0, 10)
    grown = tmp_path / "grown.tar"
    grown.write_bytes(shard.read_bytes())
    out2 = tmp_path / "out2"
    run_index(grown, narrow_engine, out2, IndexOptions(), INLINE)
    make_shard(grown, 100, 1, mode="a")
    after = run_index(grown, narrow_engine, out2, IndexOptions(), INLINE)
    assert (after.new, after.gone, after.processed, after.images) == (1, 0, 1, 11)


def test_a_rewritten_member_is_indexed_again(narrow_engine: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.tar"
    make_shard(path, 0, 3)
    out = tmp_path / "out"
    run_index(path, narrow_engine, out, IndexOptions(), INLINE)
    before = rows(out)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:  # k0001.jpg changes size
        for i in range(3):
            add(tf, f"k{i:04d}.jpg", jpeg(i) if i != 1 else jpeg(4) + b"\0" * 7)
    report = run_index(path, narrow_engine, out, IndexOptions(), INLINE)
    after = rows(out)
    assert report.images == 3 and report.gone == report.new == 3
    changed = f"{path}/k0001.jpg"
    assert after[changed]["id"] != before[changed]["id"]
    assert after[changed]["width"] == 64 + 8 * 4 and after[changed]["json"] is None
    # k0000.jpg did not move, but its sample lost its .json/.cls/.txt: its row follows.
    assert after[f"{path}/k0000.jpg"]["json"] is None


def test_a_tar_changed_after_listing_or_cut_short_is_an_error_row(tmp_path: Path) -> None:
    path = tmp_path / "c.tar"
    make_shard(path, 0, 2)
    with tarfile.open(path) as tf:
        member = tf.getmember("k0001.jpg")
    where = Where(str(path), member.offset_data, member.size, member.chksum)
    assert read_where(where) == jpeg(1)
    with pytest.raises(OSError, match="changed since it was listed"):
        read_where(where._replace(header=member.chksum + 1))
    with pytest.raises(OSError, match="changed since it was listed"):
        read_where(where._replace(offset=member.offset_data + 512))
    with pytest.raises(OSError, match="more than"):  # a header claiming 8 GB is not read
        read_where(where._replace(size=8 << 30))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: member.offset_data + 100])
    with pytest.raises(OSError, match=f"truncated tar: member has 100 of its {member.size} bytes"):
        read_where(where._replace(url=str(cut)))


def test_truncated_corrupt_and_compressed_tars(narrow_engine: Path, tmp_path: Path) -> None:
    path = tmp_path / "full.tar"
    make_shard(path, 0, 3)
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        second = tf.getmember("k0001.jpg")
    (tmp_path / "cut.tar").write_bytes(data[: second.offset_data + 50])
    garbage = data[: second.offset_data - 512] + b"\x07" * 600  # a broken header mid-tar
    (tmp_path / "garbage.tar").write_bytes(garbage)
    report = run_index(tmp_path / "cut.tar", narrow_engine, tmp_path / "o1", IndexOptions(), INLINE)
    got = rows(tmp_path / "o1")
    cut = str(tmp_path / "cut.tar")
    assert got[f"{cut}/k0000.jpg"]["status"] == "ok"
    assert "truncated tar: member has 50 of" in got[f"{cut}/k0001.jpg"]["status"]
    assert "corrupt or truncated tar after" in got[cut]["status"] and report.errors == 2
    run_index(tmp_path / "garbage.tar", narrow_engine, tmp_path / "o2", IndexOptions(), INLINE)
    got = rows(tmp_path / "o2")
    assert "not a tar header after" in got[str(tmp_path / "garbage.tar")]["status"]
    (tmp_path / "z.tar").write_bytes(b"\x1f\x8b\x08" + bytes(600))
    with pytest.raises(IndexJobError, match="gzip-compressed tar"):
        run_index(tmp_path / "z.tar", narrow_engine, tmp_path / "o3", IndexOptions(), INLINE)
    assert not (tmp_path / "o3").exists()


def test_brace_patterns_and_lists_of_tars_from_the_cli(narrow_engine: Path, tmp_path: Path):
    for k in range(3):
        make_shard(tmp_path / f"data-{k:06d}.tar", 10 * k, 2)
    (tmp_path / "bad.tar").write_text("hello, not a tar\n")
    (tmp_path / "shards.txt").write_text("data-000002.tar\nbad.tar\n")
    engine = ["--engine", str(narrow_engine), "--workers", "1"]
    pattern = str(tmp_path / "data-{000000..000001}.tar")
    result = cli(pattern, *engine, "-o", str(tmp_path / "o1"))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "o1")
    assert table.num_rows == 4 and sorted(table["cls"].to_pylist()) == [0, 1, 10, 11]
    assert str(tmp_path / "data-000001.tar/k0010.jpg") in table["path"].to_pylist()
    result = cli(str(tmp_path / "shards.txt"), *engine, "-o", str(tmp_path / "o2"))
    assert result.returncode == 3, result.stderr  # partial: bad.tar is an error row
    got = rows(tmp_path / "o2")
    assert got[str(tmp_path / "data-000002.tar/k0020.jpg")]["txt"] == "caption 20"
    assert "not a tar" in got[str(tmp_path / "bad.tar")]["status"]
    # A text file named .tar as SOURCE: one line, no traceback (it was a UTF-8 decode error).
    result = cli(str(tmp_path / "bad.tar"), *engine, "-o", str(tmp_path / "o3"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("bad.tar': not a tar (bad checksum)")


def test_webdataset_keys_and_brace_expansion() -> None:
    assert split_key("a/b.c.jpg") == ("a/b", "c.jpg")
    assert split_key("x.jpg") == ("x", "jpg") and split_key("noext") == ("noext", "")
    assert split_key("d.1/x.jpg") == ("d.1/x", "jpg")  # dots in folders are not the key's
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert is_tar("https://h/s.tar?X-Amz-Signature=1") and not is_tar("s.tar?x")
    with pytest.raises(IndexJobError, match="empty"):
        expand_braces("s-{5..1}.tar")
