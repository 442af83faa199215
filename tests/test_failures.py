"""Every failure a user can cause, through the command line: one line, the documented exit code.

File names that are not UTF-8, special and unreadable files, unwritable or full outputs, bad
numbers, unexpected errors, Ctrl-C and SIGTERM in the middle of `interactive index`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import cli
from interactive_features.runtime.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from interactive_features.runtime.index import read_index
from interactive_features.runtime.paths import display_name, name_bytes
from test_index import processes_running_with

import imagegen

CLI = [sys.executable, "-m", "interactive_features.runtime.cli"]
NAME = os.fsdecode(b"caf\xff.jpg")  # a name that is not valid UTF-8


def run(
    *args: str, prefix: list[str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    command = [*(prefix or []), *CLI, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, command: str, exit_code: int) -> str:
    """The single stderr line `interactive COMMAND: error: ...`, after checking the exit code."""
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"interactive {command}: error: "), lines[0]
    return lines[0]


def without_dac_override() -> list[str]:
    """A prefix that makes permission bits apply (root ignores them), or skip."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


# --- 1. names that are not UTF-8 ---------------------------------------------------------------


def test_paths_helpers() -> None:
    assert display_name(NAME) == "caf\\xff.jpg" and display_name("café.jpg") == "café.jpg"
    assert name_bytes(NAME) == b"caf\xff.jpg" and name_bytes("café.jpg") is None
    assert display_name("a\ud800") == "a\\ud800"  # a surrogate that is no escaped byte
    assert "caf\udcff".encode("ascii", cli.ESCAPE_ERRORS) == b"caf\\xff"


def test_non_utf8_names_through_extract_and_index(narrow_engine: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = imagegen.jpeg(src, 256, 256, name=NAME)
    broken = src / os.fsdecode(b"bad\xfe.jpg")
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / os.fsdecode(b"out\xfd.parquet")
    result = run("extract", "--engine", str(narrow_engine), "-o", str(out), str(good), str(broken))
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "Traceback" not in result.stderr and "surrogates" not in result.stderr
    assert "out\\xfd.parquet" in result.stdout  # printed as in the path column
    assert "bad\\xfe.jpg: not an image" in result.stderr
    with open(out, "rb") as f:
        extracted = pq.read_table(f)
    index_out = tmp_path / "index"
    result = run("index", str(src), "--engine", str(narrow_engine), "-o", str(index_out))
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "Traceback" not in result.stderr
    indexed = read_index(index_out)  # the failed row is in index_out/_errors/ (see test_readers)
    assert pq.read_table(index_out)["path_bytes"].to_pylist() == [os.fsencode(good)]
    for table in (extracted, indexed):
        rows = {r["path_bytes"]: r for r in table.to_pylist()}
        row = rows[os.fsencode(good)]
        assert row["status"] == "ok" and row["bucket"] == "256x256"
        assert row["path"] == f"{src}/caf\\xff.jpg" and row["path"].isprintable()
        # Back to the very file: the bytes directly, or os.fsdecode of them.
        with open(row["path_bytes"], "rb") as f, open(os.fsdecode(row["path_bytes"]), "rb") as g:
            assert f.read() == g.read() == good.read_bytes()
        reason = rows[os.fsencode(broken)]["status"]
        assert reason.endswith("bad\\xfe.jpg: not an image (cannot identify format)")
    ids = dict(zip(indexed["path_bytes"].to_pylist(), indexed["id"].to_pylist(), strict=True))
    assert ids[os.fsencode(good)] == hashlib.sha1(os.fsencode(good)).hexdigest()[:16]


def test_non_utf8_list_file_and_outdir_resume(narrow_engine: Path, tmp_path: Path) -> None:
    """A list file naming a file that is not UTF-8, into an OUTDIR whose own name is not UTF-8:
    indexed, then a rerun finds it done (the shards are read back through open files)."""
    good = imagegen.jpeg(tmp_path, 256, 256, name=NAME)
    listing = tmp_path / os.fsdecode(b"list\xfc.txt")
    listing.write_bytes(os.fsencode(good) + b"\n")
    out = tmp_path / os.fsdecode(b"index\xfb")
    args = ["index", str(listing), "--engine", str(narrow_engine), "-o", str(out), "--workers", "0"]
    first = run(*args)
    assert first.returncode == EXIT_OK and "Traceback" not in first.stderr, first.stderr
    again = run(*args)
    assert again.returncode == EXIT_OK, again.stderr
    assert "0 new, 0 gone" in again.stderr, again.stderr
    parts = sorted(out.glob("part-*.parquet"))
    with open(parts[0], "rb") as f:
        row = pq.read_table(f).to_pylist()[0]
    assert len(parts) == 1 and row["status"] == "ok" and row["path_bytes"] == os.fsencode(good)


# --- 2. files that are not images --------------------------------------------------------------


def test_special_files_are_rows_with_reasons(narrow_engine: Path, tmp_path: Path) -> None:
    good = imagegen.jpeg(tmp_path, 256, 256)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it would block for ever
    locked = imagegen.jpeg(tmp_path, 256, 256, name="locked.jpg")
    locked.chmod(0)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "nowhere.jpg")
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    long_name = tmp_path / ("x" * 300 + ".jpg")
    below_a_file = good / "x.jpg"
    reasons = {
        fifo: "not a regular file (FIFO); not opened",
        locked: "permission denied",
        folder: "is a directory, not an image file",
        broken: "broken symbolic link (to ",
        loop: "too many levels of symbolic links",
        long_name: "file name too long",
        below_a_file: "no such file (a component of the path is not a directory)",
        Path("/proc/self/status"): "not a regular file (/proc or /sys pseudo-file)",
        Path("/dev/zero"): "not a regular file (character device)",
        imagegen.empty_file(tmp_path): "empty file",
    }
    out = tmp_path / "out.parquet"
    inputs = [str(good), *map(str, reasons)]
    prefix = without_dac_override()
    result = run("extract", "--engine", str(narrow_engine), "-o", str(out), *inputs, prefix=prefix)
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "Traceback" not in result.stderr
    table = pq.read_table(out)
    status = dict(zip(table["path"].to_pylist(), table["status"].to_pylist(), strict=True))
    assert status[str(good)] == "ok"
    for path, reason in reasons.items():
        assert status[str(path)].startswith(f"{path}: {reason}"), status[str(path)]
    assert status[str(broken)] == f"{broken}: broken symbolic link (to {tmp_path / 'nowhere.jpg'})"


# --- 3. one-line errors ------------------------------------------------------------------------


def test_bad_numbers_are_usage_errors(narrow_engine: Path, tmp_path: Path) -> None:
    base = ["extract", "--engine", str(narrow_engine), "-o", str(tmp_path / "o.parquet"), "a.jpg"]
    for flag, value, message in [
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--batch-size", "-3", "must be at least 1, got -3"),
        ("--batch-size", "two", "expected an integer, got 'two'"),
        ("--threads", "-1", "must be at least 0, got -1"),
    ]:
        result = run(*base, flag, value)
        assert result.returncode == EXIT_USAGE and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"interactive extract: error: argument {flag}: {message}"
        )


def test_unwritable_output_fails_before_the_work(narrow_engine: Path, tmp_path: Path) -> None:
    image = str(imagegen.jpeg(tmp_path, 256, 256))
    extract = ["extract", "--engine", str(narrow_engine), image, "-o"]
    # -o DIR writes DIR/features.parquet (tests/test_readers.py); that name a directory: refused
    blocked = tmp_path / "features.parquet"
    blocked.mkdir()
    line = one_line_error(run(*extract, str(tmp_path)), "extract", EXIT_FATAL)
    assert line.endswith(f"cannot write -o {blocked}: is a directory (give a .parquet file name)")
    line = one_line_error(run(*extract, image + "/sub/out.parquet"), "extract", EXIT_FATAL)
    assert line.endswith(f"Not a directory ({image}/sub)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = run(*extract, str(locked / "out.parquet"), prefix=without_dac_override())
    line = one_line_error(result, "extract", EXIT_FATAL)
    assert line.endswith(f"cannot write -o {locked / 'out.parquet'}: Permission denied")
    assert result.stdout == "" and not list(locked.iterdir())


def mounted(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` (sh, with "$@" = the CLI and `args`) in a private mount namespace, or skip."""
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"], capture_output=True
    ) if shutil.which("unshare") else None  # fmt: skip
    if probe is None or probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m needs CAP_SYS_ADMIN)")
    command = ["unshare", "-m", "sh", "-c", script, "sh", *CLI, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        # A full filesystem: a 64 KiB tmpfs filled up.
        ("mount -t tmpfs -o size=64k tmpfs $D && head -c 1M /dev/zero > $D/fill 2>/dev/null;",
         "No space left on device"),
        ("mount -t tmpfs -o ro tmpfs $D &&", "Read-only file system"),
    ],
)  # fmt: skip
def test_full_or_read_only_output(
    narrow_engine: Path, tmp_path: Path, setup: str, reason: str
) -> None:
    image = str(imagegen.jpeg(tmp_path, 256, 256))
    target = tmp_path / "mnt"
    target.mkdir()
    script = f'D={target}; {setup} exec "$@"'
    result = mounted(
        target,
        script,
        "extract",
        "--engine",
        str(narrow_engine),
        image,
        "-o",
        f"{target}/o.parquet",
    )
    line = one_line_error(result, "extract", EXIT_FATAL)
    assert line == f"interactive extract: error: cannot write -o {target}/o.parquet: {reason}"


def test_oserror_and_unexpected_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def failing(error: BaseException):
        def handler(args: object) -> int:
            raise error

        return handler

    cases = [
        (
            OSError(errno.ENOSPC, "No space left on device", NAME),
            "caf\\xff.jpg: No space left on device",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "/x/out: Permission denied"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/o"), "/ro/o: Read-only file system"),
        (ValueError("bad\nvalue"), "bad value"),
        (
            LookupError("boom"),
            "LookupError: boom (a bug? rerun with --log-level debug for details)",
        ),
    ]
    before = signal.getsignal(signal.SIGTERM)
    for error, line in cases:
        monkeypatch.setattr(cli, "_run_buckets", failing(error))
        assert main(["buckets"]) == EXIT_FATAL
        assert capsys.readouterr().err == f"interactive buckets: error: {line}\n"
    assert main(["buckets", "--log-level", "debug"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert err.startswith("interactive buckets: error: LookupError: boom") and "Traceback" in err
    assert signal.getsignal(signal.SIGTERM) is before  # main's SIGTERM handler is undone


def test_unreadable_engine_is_one_line(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "manifest.json").write_text("{not json")
    line = one_line_error(
        run("extract", "--engine", str(engine), "-o", str(tmp_path / "o.parquet"), "a.jpg"),
        "extract",
        EXIT_FATAL,
    )
    assert str(engine) in line


# --- 4. Ctrl-C and SIGTERM in the middle of a run ----------------------------------------------


IMAGES = 40  # 10 shards of 4


def default_sigint() -> None:
    """In the child: SIGINT as a terminal gives it. A shell without job control starts
    background commands with SIGINT ignored, and Python then leaves it ignored (the job would
    run to the end): the test must not depend on how pytest itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(IMAGES):
        imagegen.jpeg(root, 240 + i % 5, 240, name=f"img{i:03d}.jpg", seed=i)
    return root


@pytest.mark.parametrize(
    ("signum", "group", "line", "code"),
    [
        (signal.SIGINT, True, "interrupted", 130),  # Ctrl-C: the whole foreground group
        (signal.SIGTERM, True, "terminated", 143),  # systemd, batch schedulers
        (signal.SIGTERM, False, "terminated", 143),  # kill PID
    ],
)
def test_signal_mid_index(
    narrow_engine: Path, many_images: Path, tmp_path: Path, signum: int, group: bool, line: str,
    code: int,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    args = ["index", str(many_images), "--engine", str(narrow_engine), "-o", str(out)]
    args += ["--batch-size", "2", "--shard-size", "4", "--workers", "2", "--no-progress"]
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.time() + 60
    while not (out / "part-00000.parquet").exists() and time.time() < deadline:
        time.sleep(0.01)
    (os.killpg if group else os.kill)(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    # Progress lines ("index: ...", e.g. the plan at start) aside, one line says what happened.
    said = [text for text in stderr.splitlines() if not text.startswith("index: ")]
    assert (process.returncode, said, stdout) == (code, [f"interactive index: {line}"], "")
    done = len(list(out.glob("part-*.parquet")))
    assert 1 <= done < IMAGES // 4, "the signal must land mid-run"
    assert not list(out.glob(".*.tmp")), "a temporary file was left"
    assert not processes_running_with(str(out), wait_s=10), "decoding workers outlived the job"
    rerun = run(*args)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    table = pq.read_table(out)
    assert table.num_rows == IMAGES and len(set(table["id"].to_pylist())) == IMAGES
    assert set(table["status"].to_pylist()) == {"ok"}
