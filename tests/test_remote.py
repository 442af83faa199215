"""Remote inputs through fsspec, against real servers on 127.0.0.1: Python's http.server (with
Range, a 404, a 500-then-200, a slow and a cut-short response) and moto's S3 server via s3fs."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import remote
from interactive_features.runtime.index import IndexJobError, IndexOptions, read_index, run_index
from interactive_features.runtime.index_local import LocalExecutor
from test_index import cli
from test_tar import jpeg, make_shard

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
INLINE = LocalExecutor(workers=0)
SLOW_S = 3.0  # the slow response's delay, beyond the tests' timeout


class Handler(SimpleHTTPRequestHandler):
    """Files of the served folder with Range support; /flaky/ answers 500 on the first request
    for each name, /slow/ waits SLOW_S, /broken/ promises more bytes than it sends, /norange/
    ignores Range (sends the whole file, as some servers do)."""

    hits: Counter = Counter()
    whole: Counter = Counter()  # GETs without a Range header, by path

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        route, _, name = self.path.lstrip("/").partition("/")
        Handler.hits[self.path] += 1
        if route == "flaky" and Handler.hits[self.path] == 1:
            self.send_error(500, "try again")
            return
        if route == "slow":
            time.sleep(SLOW_S)
        special = route in ("flaky", "slow", "broken", "norange")
        file = Path(self.directory) / (name if special else self.path.lstrip("/"))
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        if body and "Range" not in self.headers:
            Handler.whole[self.path] += 1
        if route == "broken" and body:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:10])
            self.close_connection = True
            return
        status, start, end = 200, 0, len(data)
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if wanted and route != "norange":
            start = int(wanted.group(1) or 0)
            end = min(int(wanted.group(2)) + 1 if wanted.group(2) else len(data), len(data))
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """2 tries, 1 s timeout, short backoff (the env variables the README documents)."""
    monkeypatch.setenv("INTERACTIVE_REMOTE_RETRIES", "2")
    monkeypatch.setenv("INTERACTIVE_REMOTE_TIMEOUT_S", "1")
    monkeypatch.setenv("INTERACTIVE_REMOTE_BACKOFF_S", "0.05")
    remote._filesystem.cache_clear()
    yield
    remote._filesystem.cache_clear()


@pytest.fixture
def served(tmp_path: Path, fast_retries: None) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args: object) -> Handler:
        return Handler(*args, directory=str(root))  # type: ignore[arg-type]

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.hits.clear()
    Handler.whole.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def statuses(out: Path) -> dict[str, str]:
    return {r["path"]: r["status"] for r in read_index(out).select(["path", "status"]).to_pylist()}


def test_http_urls_in_a_list_retries_and_failures(
    narrow_engine: Path, served: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = served
    for i in range(3):
        (root / f"a{i}.jpg").write_bytes(jpeg(i))
    urls = [f"{base}/a0.jpg", f"{base}/flaky/a1.jpg", f"{base}/missing.jpg",
            f"{base}/slow/a2.jpg", f"{base}/broken/a2.jpg"]  # fmt: skip
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"
    report = run_index(tmp_path / "urls.txt", narrow_engine, out, IndexOptions(), LocalExecutor(1))
    got = statuses(out)
    assert got[urls[0]] == "ok" and got[urls[1]] == "ok"  # 500 then 200: retried
    assert Handler.hits["/flaky/a1.jpg"] == 2
    assert got[urls[2]] == f"{urls[2]}: fetch failed: not found (404 / no such key)"
    assert got[urls[3]].startswith(f"{urls[3]}: fetch failed after 2 tries: ")
    assert "Timeout" in got[urls[3]]
    assert got[urls[4]].startswith(f"{urls[4]}: fetch failed after 2 tries: ")
    assert report.errors == 3
    ids = {r["path"]: r["id"] for r in read_index(out).to_pylist()}
    # A rerun resumes (ids are the URLs' own) and --retry-failed redoes only the failures.
    again = run_index(tmp_path / "urls.txt", narrow_engine, out, IndexOptions(), INLINE)
    assert again.processed == 0 and {r["path"]: r["id"] for r in read_index(out).to_pylist()} == ids


def test_remote_list_and_remote_tar_as_source(
    narrow_engine: Path, served: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = served
    (root / "imgs").mkdir()
    (root / "imgs" / "b.jpg").write_bytes(jpeg(3))
    pq.write_table(
        pa.table({"path": ["imgs/b.jpg", f"{base}/imgs/b.jpg"], "label": [7, 8]}),
        root / "list.parquet",
    )
    out = tmp_path / "o1"
    options = IndexOptions(columns=["label"])
    run_index(f"{base}/list.parquet", narrow_engine, out, options, INLINE)
    table = read_index(out)
    # A relative entry of a remote list is under the list's URL: both rows name one object.
    assert table["path"].to_pylist() == [f"{base}/imgs/b.jpg"] * 2
    assert table["label"].to_pylist() == [7, 8] and set(table["status"].to_pylist()) == {"ok"}
    make_shard(root / "d-000000.tar", 0, 2)
    make_shard(root / "d-000001.tar", 10, 2)
    # From the command line (SOURCE stays a str there: a Path would fold the URL's //).
    done = cli(f"{base}/d-{{000000..000001}}.tar", "--engine", str(narrow_engine), "-o",
               str(tmp_path / "cli"), "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "cli").num_rows == 4
    out = tmp_path / "o2"
    report = run_index(f"{base}/d-{{000000..000001}}.tar", narrow_engine, out, IndexOptions(),
                       LocalExecutor(1))  # fmt: skip
    table = read_index(out)
    assert report.errors == 0 and sorted(table["cls"].to_pylist()) == [0, 1, 10, 11]
    assert f"{base}/d-000001.tar/k0011.jpg" in table["path"].to_pylist()
    # Listing and members were read by range: no GET of a whole tar.
    assert not [p for p in Handler.whole if p.endswith(".tar")], Handler.whole
    # A server that ignores Range: slower (each read gets the whole tar), same bytes.
    out = tmp_path / "norange"
    options = IndexOptions(content_hash=True)
    run_index(f"{base}/norange/d-000000.tar", narrow_engine, out, options, INLINE)
    table = read_index(out)
    assert table["sha256"].to_pylist() == [hashlib.sha256(jpeg(i)).hexdigest() for i in (0, 1)]
    with pytest.raises(IndexJobError, match="fetch failed: not found"):
        run_index(f"{base}/nope.tar", narrow_engine, tmp_path / "o3", IndexOptions(), INLINE)
    with pytest.raises(IndexJobError, match="fetch failed: not found"):
        run_index(f"{base}/nope.txt", narrow_engine, tmp_path / "o4", IndexOptions(), INLINE)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, fast_retries: None) -> Iterator[str]:
    """A bucket on moto's S3 server on 127.0.0.1, reached through s3fs."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    remote._filesystem.cache_clear()
    fs, _ = remote.filesystem("s3://bucket")
    fs.mkdir("bucket")
    try:
        yield "s3://bucket"
    finally:
        remote._filesystem.cache_clear()
        server.stop()


def test_s3_objects_lists_and_tars(narrow_engine: Path, s3: str, tmp_path: Path) -> None:
    fs, _ = remote.filesystem(s3)
    fs.pipe(f"{s3}/img/c.jpg", jpeg(4))
    make_shard(tmp_path / "s.tar", 0, 3)
    fs.put(str(tmp_path / "s.tar"), f"{s3}/shards/s.tar")
    listing = f"{s3}/img/c.jpg\n{s3}/img/gone.jpg\n{s3}/shards/s.tar\n"
    fs.pipe(f"{s3}/lists/a.txt", listing.encode())
    out = tmp_path / "out"
    report = run_index(f"{s3}/lists/a.txt", narrow_engine, out, IndexOptions(), LocalExecutor(1))
    got = statuses(out)
    assert got[f"{s3}/img/c.jpg"] == "ok"
    assert got[f"{s3}/img/gone.jpg"].startswith(f"{s3}/img/gone.jpg: fetch failed: not found")
    # A list of images holding a tar: an error row (list tars in a list of their own).
    assert "a tar in a list of images" in got[f"{s3}/shards/s.tar"] and report.errors == 2
    # A folder (prefix) as SOURCE: its images, keyed by URL + ETag + size from one listing.
    fs.pipe(f"{s3}/img/d.png", jpeg(5))
    fs.pipe(f"{s3}/img/notes.md", b"not an image")
    folder = tmp_path / "folder"
    run_index(f"{s3}/img/", narrow_engine, folder, IndexOptions(), INLINE)
    assert sorted(statuses(folder)) == [f"{s3}/img/c.jpg", f"{s3}/img/d.png"]
    fs.pipe(f"{s3}/img/d.png", jpeg(6))  # replaced under the same name: a new ETag
    redone = run_index(f"{s3}/img/", narrow_engine, folder, IndexOptions(), INLINE)
    assert (redone.new, redone.gone, redone.processed, redone.images) == (1, 1, 1, 2)
    out = tmp_path / "tar"
    report = run_index(f"{s3}/shards/s.tar", narrow_engine, out, IndexOptions(), INLINE)
    table = read_index(out)
    assert report.errors == 0 and table["txt"].to_pylist() == [f"caption {i}" for i in range(3)]
    # The tar rewritten on S3 (one more sample): the rerun indexes that sample only.
    make_shard(tmp_path / "s.tar", 3, 1, mode="a")
    fs.put(str(tmp_path / "s.tar"), f"{s3}/shards/s.tar")
    again = run_index(f"{s3}/shards/s.tar", narrow_engine, out, IndexOptions(), INLINE)
    assert (again.new, again.processed, again.images) == (1, 1, 4)


def test_the_runtime_works_without_fsspec(narrow_engine: Path, tmp_path: Path) -> None:
    """fsspec absent: local inputs index as before; a URL says what to install (exit 1)."""
    (tmp_path / "x.jpg").write_bytes(jpeg(0))
    (tmp_path / "urls.txt").write_text("https://127.0.0.1:9/x.jpg\n")
    blocker = tmp_path / "block" / "fsspec"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('fsspec blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    command = [sys.executable, "-m", "interactive_features.runtime.cli", "index"]
    engine = ["--engine", str(narrow_engine), "--workers", "0"]
    ok = subprocess.run([*command, str(tmp_path), *engine, "-o", str(tmp_path / "o1")],
                        capture_output=True, text=True, env=env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    listed = [*command, str(tmp_path / "urls.txt"), *engine, "-o", str(tmp_path / "o2")]
    url = subprocess.run(listed, capture_output=True, text=True, env=env)
    assert url.returncode == 1, url.stderr
    assert url.stderr.strip().splitlines()[-1] == (
        "interactive index: error: remote inputs (URLs) need fsspec (fsspec blocked by the test); "
        "install them with pip install 'interactive-features[remote]'"
    )
