"""Engine integrity: what the runtime and the exporter refuse, in one line, instead of running
with wrong data (corrupt weights, NaN weights, concurrent writers, paths outside the directory,
malformed manifests, unreadable or garbage files, full or read-only disks), and the telemetry
ONNX Runtime must not write."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from interactive_features.export import exporter
from interactive_features.export.exporter import ExportValidationError, export_engine
from interactive_features.export.spec import random_state_dict
from interactive_features.runtime import Extractor
from interactive_features.runtime import weights as weights_module
from interactive_features.runtime.backends import open_backend
from interactive_features.runtime.backends.sessions import TELEMETRY_VARIABLE
from interactive_features.runtime.cli import main as cli_main
from interactive_features.runtime.index import read_index
from interactive_features.runtime.locks import ENGINE_LOCK, LockedError, exclusive_lock
from interactive_features.runtime.manifest import BadBucketError, EngineError, EngineManifest
from PIL import Image

from conftest import NARROW, narrow_request, photos

NARROW_EXPORT = ["--weights", "random:0", "--width-div", str(NARROW), "--area", "256"]


def cli_env(home: Path | None = None) -> dict[str, str]:
    """The test's environment, less the telemetry switch this process set on itself (so that a
    subprocess shows what the package does on its own)."""
    env = {k: v for k, v in os.environ.items() if k != TELEMETRY_VARIABLE}
    if home is not None:
        env["HOME"] = str(home)
        env.pop("XDG_CACHE_HOME", None)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "interactive_features.runtime.cli", *args]


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(home))


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *parts: str) -> str:
    """Exit 1, no traceback, and one `interactive CMD: error: ...` line holding every part."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("interactive ")]
    assert len(errors) == 1 and errors[0].startswith(f"interactive {command}: error: "), errors
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def copy_engine(narrow_engine: Path, tmp_path: Path, name: str = "engine") -> Path:
    engine = tmp_path / name
    shutil.copytree(narrow_engine, engine)
    return engine


def edit_manifest(engine: Path, edit) -> None:
    path = engine / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def extract_args(engine: Path, tmp_path: Path) -> list[str]:
    return ["extract", "--engine", str(engine), "-o", str(tmp_path / "f.parquet"), str(photos()[0])]


# --- 1. weights.bin against the manifest's sha256 ---------------------------------------------


def test_corrupt_weights_are_refused_and_good_ones_verified_once(
    narrow_engine: Path, tmp_path: Path
) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    tensors = EngineManifest.load(engine).data["weights"]["tensors"]
    name, entry = max(tensors.items(), key=lambda item: item[1]["length"])
    with Extractor.open(engine) as ex:  # verified, and remembered
        assert not ex.extract([str(photos()[0])]).errors
    started = time.perf_counter()
    Extractor.open(engine).close()
    assert time.perf_counter() - started < 0.2  # the check is not repeated
    position = entry["offset"] + entry["length"] // 2
    with open(engine / "weights.bin", "r+b") as f:  # 64 flipped bytes inside one tensor
        f.seek(position)
        block = f.read(64)
        f.seek(position)
        f.write(bytes(b ^ 0xFF for b in block))
    with pytest.raises(EngineError, match=f"tensor '{name}' .* does not match the sha256"):
        Extractor.open(engine)  # same process: the changed mtime makes it check again
    result = cli(*extract_args(engine, tmp_path))
    assert_one_line_error(result, "extract", "weights.bin", name, "sha256", "export the engine")
    assert not (tmp_path / "f.parquet").exists()
    with Extractor.open(narrow_engine) as ex:  # the untampered engine opens
        assert not ex.extract([str(photos()[0])]).errors


def test_the_check_is_memoised_by_path_size_and_mtime(narrow_engine: Path) -> None:
    path = (narrow_engine / "weights.bin").resolve()
    table = EngineManifest.load(narrow_engine).data["weights"]["tensors"]
    weights_module._verified.clear()
    started = time.perf_counter()
    weights_module.verify_weights(path, table)
    first = time.perf_counter() - started
    started = time.perf_counter()
    weights_module.verify_weights(path, table)
    again = time.perf_counter() - started
    size = path.stat().st_size
    print(f"sha256 of {size / 1e6:.1f} MB: {first * 1e3:.1f} ms, then {again * 1e6:.0f} us")
    assert again < first and again < 0.01


# --- 2. NaN and infinite weights ----------------------------------------------------------------


def test_nan_weights_and_nonfinite_outputs_are_refused(tmp_path: Path) -> None:
    sd = random_state_dict("vgg16", 0, NARROW)
    sd["features.5.weight"][0, 0, 1, 1] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    result = cli(
        "export", *NARROW_EXPORT[2:], "--weights", str(tmp_path / "nan.pth"),
        "--buckets", "256x256", "--out", str(tmp_path / "nan"),
    )  # fmt: skip
    assert_one_line_error(result, "export", "nan.pth", "'features.5.weight'", "NaN")
    assert not (tmp_path / "nan").exists()
    # finite weights whose outputs are not: the validation refuses them
    sd = random_state_dict("vgg16", 0, NARROW)
    sd["features.0.bias"].fill_(3e38)
    torch.save(sd, tmp_path / "huge.pth")
    request = narrow_request(
        tmp_path / "huge", buckets="256x256", weights=str(tmp_path / "huge.pth")
    )
    with pytest.raises(ExportValidationError, match="NaN or infinite values"):
        export_engine(request, log=lambda line: None)
    assert not list((tmp_path / "huge").glob("*.onnx"))
    assert not (tmp_path / "huge" / "manifest.json").exists()


# --- 3. one writer per engine directory ---------------------------------------------------------


def test_concurrent_exports_one_is_refused_the_other_completes(tmp_path: Path) -> None:
    out, home = tmp_path / "engine", tmp_path / "home"
    home.mkdir()
    first = subprocess.Popen(
        cli_command("export", *NARROW_EXPORT, "--buckets", "256x256", "--out", str(out)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(home),
    )  # fmt: skip
    lock = out / ENGINE_LOCK
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli("export", *NARROW_EXPORT, "--buckets", "288x224", "--out", str(out), home=home)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    line = assert_one_line_error(second, "export", f"engine directory {out} is in use by pid")
    assert f"pid {first.pid} on " in line and "export" in line and str(lock) in line
    manifest = EngineManifest.load(out)
    assert manifest.buckets == [(256, 256)]
    assert sorted(p.name for p in out.glob("*.onnx")) == ["bucket-256x256.onnx"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    table = manifest.data["weights"]["tensors"]
    assert (out / "weights.bin").stat().st_size == max(
        e["offset"] + e["length"] for e in table.values()
    )
    # ONNX Runtime wrote no telemetry (its validation sessions ran in the first export)
    assert not any(home.rglob("*")), list(home.rglob("*"))


def test_the_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with exclusive_lock(path, "thing"):
        assert f"pid {os.getpid()} on " in path.read_text()
        code = (
            "import sys; from interactive_features.runtime.locks import exclusive_lock\n"
            f"with exclusive_lock({str(path)!r}, 'thing'): pass\n"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 1 and "LockedError: thing is in use by pid" in other.stderr
        # flock: a second descriptor, even in this process, is refused too
        with (
            pytest.raises(LockedError, match=f"thing is in use by pid {os.getpid()}"),
            exclusive_lock(path, "thing"),
        ):
            pass
    with exclusive_lock(path, "thing"):  # released at the end of the block
        pass


# --- 4. manifest paths stay inside the engine directory ----------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("buckets.256x256.file", "../x.onnx"),
        ("buckets.256x256.file", "/tmp/x.onnx"),
        ("weights.file", "/etc/passwd"),
        ("weights.file", "sub/../../weights.bin"),
    ],
)
def test_manifest_paths_are_confined(
    narrow_engine: Path, tmp_path: Path, key: str, value: str
) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    shutil.copy(engine / "bucket-256x256.onnx", tmp_path / "x.onnx")  # a loadable graph outside

    def edit(data: dict) -> None:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value

    edit_manifest(engine, edit)
    with pytest.raises(EngineError, match=f"{key}: '{value}' is not a file inside the engine"):
        Extractor.open(engine)
    if value == "../x.onnx":
        result = cli(*extract_args(engine, tmp_path))
        assert_one_line_error(result, "extract", "manifest.json", key, value)


# --- 5. no ONNX Runtime telemetry ---------------------------------------------------------------


def test_onnxruntime_writes_no_telemetry(narrow_engine: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    result = cli(*extract_args(narrow_engine, tmp_path), home=home)
    assert result.returncode == 0, result.stderr
    assert not any(home.rglob("*")), list(home.rglob("*"))


# --- 6. the manifest's schema -------------------------------------------------------------------


def _set(path: list, value: object):
    def edit(data: dict) -> None:
        node = data
        for part in path[:-1]:
            node = node[part]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


def _first_tensor(data: dict) -> str:
    return next(iter(data["weights"]["tensors"]))


SCHEMA_CASES = [
    (["layers"], KeyError, "layers: missing"),
    (["layers", 0, "dim"], "64", "layers[0].dim: must be an integer, got a string"),
    (["layers", 1], "pool-2", "layers[1]: must be an object, got a string"),
    (["outputs"], "pool-1", "outputs: must be a list, got a string"),
    (["input"], [], "input: must be an object, got a list"),
    (["input", "name"], KeyError, "input.name: missing"),
    (["bucket_rule", "kind"], "areaa", "bucket_rule.kind: must be 'area' or 'fixed', got 'areaa'"),
    (["bucket_rule", "area"], True, "bucket_rule.area: must be an integer, got a boolean"),
    (["buckets", "256x256", "width"], 1.5, "buckets.256x256.width: must be an integer"),
    (["buckets", "256x256", "height"], 288, "buckets.256x256: names bucket '256x256' but holds"),
    (["buckets", "256x256", "file"], None, "buckets.256x256.file: must be a string, got null"),
    (["weights", "tensors"], KeyError, "weights.tensors: missing"),
    (["weights", "sha256"], "xyz", "weights.sha256: must be 64 lowercase hex digits"),
    (["export"], 3, "export: must be an object, got an integer"),
    (["export", "p"], 7, "export: "),
]


@pytest.mark.parametrize(("path", "value", "message"), SCHEMA_CASES)
def test_malformed_manifests_are_refused_naming_the_key(
    narrow_engine: Path, tmp_path: Path, path: list, value: object, message: str
) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    edit_manifest(engine, _set(path, value))
    with pytest.raises(EngineError) as caught:
        EngineManifest.load(engine)
    text = str(caught.value)
    assert text.startswith(f"{engine / 'manifest.json'}: {message}"), text
    assert "\n" not in text


def test_malformed_tensor_entries_and_the_cli(narrow_engine: Path, tmp_path: Path) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    data = json.loads((engine / "manifest.json").read_text())
    name = _first_tensor(data)
    for field, value, message in [
        ("offset", -1, "offset: must be at least 0, got -1"),
        ("dtype", "float128", "dtype: must be one of"),
        ("shape", [3, "x"], "shape: must be a list of sizes"),
        ("length", 4, "length 4 is not shape"),
        ("sha256", 5, "sha256: must be a string"),
    ]:
        edit_manifest(engine, _set(["weights", "tensors", name, field], value))
        with pytest.raises(EngineError, match=rf"weights\.tensors\.{name}\b.*{re.escape(message)}"):
            EngineManifest.load(engine)
        (engine / "manifest.json").write_text(json.dumps(data))
    edit_manifest(engine, _set(["bucket_rule", "kind"], "areaa"))
    result = cli(*extract_args(engine, tmp_path))
    assert_one_line_error(result, "extract", "manifest.json: bucket_rule.kind: must be")


# --- 7. unreadable, garbage and missing files; full and read-only disks ------------------------


def test_a_garbage_bucket_graph_is_a_bad_bucket_error(narrow_engine: Path, tmp_path: Path) -> None:
    """The backend raises BadBucketError naming the file; an extraction turns that bucket's
    images into error rows and goes on with the other buckets (index does not abort)."""
    engine = copy_engine(narrow_engine, tmp_path)
    (engine / "bucket-256x256.onnx").write_bytes(os.urandom(4096))
    (engine / "bucket-288x224.onnx").unlink()
    cases = [((256, 256), "INVALID_PROTOBUF"), ((288, 224), "NO_SUCHFILE")]
    backend = open_backend(EngineManifest.load(engine), "ort")
    for bucket, why in cases:
        image = np.full((1, bucket[1], bucket[0], 3), 120, np.uint8)
        with pytest.raises(BadBucketError, match=why) as caught:
            backend.run(bucket, image)
        assert caught.value.bucket == bucket
        assert f"bucket-{bucket[0]}x{bucket[1]}.onnx" in str(caught.value)
    backend.close()
    with Extractor.open(engine) as ex:
        images = [np.full((b[1], b[0], 3), 120, np.uint8) for b, _ in cases]
        images.append(np.full((288, 224, 3), 120, np.uint8))  # 224x288 works
        features = ex.extract(images)
        for i, (bucket, why) in enumerate(cases):
            assert (
                why in features.errors[i]
                and f"bucket-{bucket[0]}x{bucket[1]}.onnx" in (features.errors[i])
            )
        assert 2 not in features.errors and bool(features.ok[2]) and not features.ok[:2].any()
    out = tmp_path / "f.parquet"
    result = cli(
        "extract", "--engine", str(engine), "-o", str(out),
        str(next(p for p in photos() if p.name.startswith("coffee"))),  # bucket 288x224
    )  # fmt: skip
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "bucket-288x224.onnx" in result.stderr and "cannot open this graph" in result.stderr
    status = pq.read_table(out)["status"].to_pylist()
    assert len(status) == 1 and "bucket-288x224.onnx" in status[0]
    # index: the bad buckets' rows say why, the good bucket's row is ok, the job finishes (3).
    source = tmp_path / "source"
    source.mkdir()
    for bucket, _ in [*cases, ((224, 288), "")]:
        Image.new("RGB", bucket, (120, 90, 60)).save(source / f"{bucket[0]}x{bucket[1]}.png")
    result = cli("index", str(source), "--engine", str(engine), "-o", str(tmp_path / "index"))
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    # every row: the failed ones are in index/_errors/ (pq.read_table(dir) reads the ok ones)
    rows = {r["bucket"]: r["status"] for r in read_index(tmp_path / "index").to_pylist()}
    assert rows["224x288"] == "ok" and "INVALID_PROTOBUF" in rows["256x256"], rows
    assert "bucket-288x224.onnx" in rows["288x224"], rows


def test_unreadable_empty_and_truncated_weights(narrow_engine: Path, tmp_path: Path) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    weights = engine / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(b"")
    with pytest.raises(EngineError, match="weights.bin: the weights file is empty"):
        Extractor.open(engine)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"weights.bin: tensor .* ends at byte \d+, the file"):
        Extractor.open(engine)
    weights.unlink()
    weights.mkdir()  # open() fails: IsADirectoryError, an OSError like PermissionError
    result = cli(*extract_args(engine, tmp_path))
    assert_one_line_error(result, "extract", "weights.bin: cannot read the weights file")


def test_an_unreadable_manifest(
    narrow_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(EngineError, match="manifest.json: cannot read the manifest: Permission"):
        EngineManifest.load(narrow_engine)


def test_bad_weights_files_are_one_line(tmp_path: Path) -> None:
    sd = random_state_dict("vgg16", 0, NARROW)
    del sd["features.7.bias"]
    torch.save(sd, tmp_path / "lacking.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    cases = {
        "empty.pth": "cannot be read as a torch state dict",
        "text.pth": "cannot be read as a torch state dict",
        "lacking.pth": "the state dict lacks 'features.7.bias' (needed by conv-2-2",
    }
    runs = {
        name: subprocess.Popen(
            cli_command(
                "export",
                *NARROW_EXPORT[2:],
                "--weights",
                str(tmp_path / name),
                "--buckets",
                "256x256",
                "--out",
                str(tmp_path / f"out-{name}"),
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )  # fmt: skip
        for name in cases
    }
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert_one_line_error(done, "export", name, cases[name])
        assert not (tmp_path / f"out-{name}").exists()


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and tmpfs mounts (root)")
def test_read_only_and_full_disks_fail_before_the_work(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    command = " ".join(cli_command("export", *NARROW_EXPORT, "--buckets", "256x256", "--out"))
    script = (
        f"mount -t tmpfs -o size=1m none {mount} && mkdir {mount}/ro && "
        f"mount -t tmpfs -o ro,size=1m none {mount}/ro && "
        f"{command} {mount}/ro/engine; echo rc=$? >&2; {command} {mount}/engine; echo rc=$? >&2"
    )
    started = time.perf_counter()
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=cli_env()
    )
    seconds = time.perf_counter() - started
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("rc=1") == 2, result.stderr
    assert (
        f"interactive export: error: --out {mount}/ro/engine: cannot create the directory: "
        "Read-only file system" in result.stderr
    )
    assert (
        f"interactive export: error: --out {mount}/engine: 1.0 MB free on its filesystem, "
        "the export needs up to" in result.stderr
    )
    assert seconds < 60


def test_a_full_disk_during_the_work_is_one_line_and_records_nothing(
    narrow_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = copy_engine(narrow_engine, tmp_path)
    before = (engine / "manifest.json").read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(exporter.onnx, "save", full)
    request = narrow_request(engine, buckets="288x256", heatmaps=True)
    with pytest.raises(EngineError) as caught:
        export_engine(request, log=lambda line: None)
    assert str(caught.value) == (
        f"{engine}/bucket-288x256.onnx: cannot write: No space left on device; free some space "
        "and rerun the same command (finished buckets are kept)"
    )
    assert (engine / "manifest.json").read_bytes() == before
    assert not [p for p in engine.iterdir() if p.name.endswith(".tmp") or "288x256" in p.name]
    assert EngineManifest.load(engine).buckets == EngineManifest.load(narrow_engine).buckets


def test_a_first_export_killed_before_its_first_bucket_is_continued(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    args = ["export", *NARROW_EXPORT, "--buckets", "256x256", "--out", str(out)]
    first = subprocess.Popen(
        cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env()
    )
    deadline = time.monotonic() + 120
    while not (out / "weights.bin").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "weights.bin").exists()
    # what it left (a partly written weights.bin; maybe a temporary graph), as a kill leaves it
    (out / ".bucket-256x256.onnx.99999999.0badcafe.tmp").write_bytes(b"partial")
    (out / "manifest.json").unlink(missing_ok=True)  # killed before its first bucket, always
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "what an interrupted first export leaves; starting it again" in result.stderr
    manifest = EngineManifest.load(out)
    assert manifest.buckets == [(256, 256)]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with Extractor.open(out) as ex:
        assert not ex.extract([str(photos()[0])]).errors


def test_an_export_refuses_a_directory_of_other_files(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"\0" * 100)
    (out / "notes.txt").write_text("mine")
    assert cli_main(["export", *NARROW_EXPORT, "--buckets", "256x256", "--out", str(out)]) == 1
    assert (out / "notes.txt").exists() and (out / "weights.bin").stat().st_size == 100
