"""The command line: export -> extract -> Parquet read back with pyarrow, on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from interactive_features.runtime import Extractor
from interactive_features.runtime.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from interactive_features.runtime.parquet import layer_matrix
from interactive_features.runtime.viz import output_size
from PIL import Image

from conftest import NARROW, photos


def run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "interactive_features.runtime.cli", *args]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("command", [[], ["export"], ["buckets"], ["extract"], ["index"], ["viz"]])
def test_help_everywhere(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0 and "usage: interactive" in result.stdout


def test_buckets(capsys: pytest.CaptureFixture) -> None:
    assert main(["buckets", "500x375", "375x500", "640x360", "512x512"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "500x375 -> 576x448",
        "375x500 -> 448x576",
        "640x360 -> 672x384",
        "512x512 -> 512x512",
    ]
    assert main(["buckets", "500x375", "--log-level", "info"]) == EXIT_OK  # after the command
    assert capsys.readouterr().out == "500x375 -> 576x448\n"
    assert main(["buckets", "--json"]) == EXIT_OK
    assert len(json.loads(capsys.readouterr().out)) == 61
    assert main(["buckets", "--area", "256"]) == EXIT_OK
    assert "5 buckets" in capsys.readouterr().out


def test_usage_and_fatal_exit_codes(tmp_path: Path) -> None:
    assert run("extract").returncode == EXIT_USAGE
    assert run("buckets", "500by375").returncode == EXIT_USAGE
    result = run("extract", "--engine", str(tmp_path), "-o", str(tmp_path / "x.parquet"), "a.jpg")
    assert result.returncode == EXIT_FATAL
    assert "not an engine directory" in result.stderr


def test_export_extract_parquet_round_trip(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    result = run(
        "export", "--out", str(engine), "--weights", "random:0", "--width-div", str(NARROW),
        "--area", "256", "--buckets", "256x256,288x224", "--layers", "pool-2,conv-4-3,fc-6",
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert "[2/2] 288x224" in result.stderr and "max rel err" in result.stderr
    images = [p for p in photos() if p.name.startswith(("coffee", "chelsea"))]  # bucket 288x224
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:500])
    out = tmp_path / "features.parquet"
    result = run("extract", "--engine", str(engine), "-o", str(out), *map(str, images), str(broken))
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert f"{len(images)}/{len(images) + 1} images" in result.stdout

    table = pq.read_table(out)
    assert table.column_names == [
        "path", "path_bytes", "width", "height", "bucket", "pool-2", "conv-4-3", "fc-6", "status",
    ]  # fmt: skip
    assert table["path_bytes"].null_count == table.num_rows  # every name here is UTF-8
    assert table["status"].to_pylist() == ["ok"] * len(images) + [table["status"][-1].as_py()]
    assert "truncated" in table["status"][-1].as_py()
    assert table["bucket"].to_pylist()[: len(images)] == ["288x224"] * len(images)
    assert table.schema.field("fc-6").type.list_size == 4096 // NARROW
    with Extractor.open(engine) as ex:
        feats = ex.extract([str(p) for p in images])
    for layer in ("pool-2", "conv-4-3", "fc-6"):
        matrix = layer_matrix(table, layer)
        assert matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix[: len(images)], feats[layer])
        assert np.isnan(matrix[-1]).all()
    meta = table.schema.metadata
    assert meta[b"interactive.weights"] == b"random:0"

    result = run("extract", "--engine", str(engine), "-o", str(out), *map(str, images))
    assert result.returncode == EXIT_OK


def test_viz_writes_a_png(narrow_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    photo = str(photos()[0])
    result = run(
        "viz", photo, "--engine", str(narrow_engine), "-o", str(out), "--layers", "pool-1,fc-6"
    )
    assert result.returncode == EXIT_OK, result.stderr
    with Extractor.open(narrow_engine) as ex:
        w, h = ex.prepare(photo).bucket
    assert Image.open(out).size == output_size(w, h, 2)


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == EXIT_OK
    assert capsys.readouterr().out.startswith("interactive 0.")


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    for command, shown in [
        ("index", ["(default: 16)", "(default: 1000)", "(default: none)", "(default: path)"]),
        ("export", ["(default: vgg16)", "(default: common)", "(default: 512)", "(default: 1)"]),
        ("extract", ["(default: 8)", "(default: auto)", "(default: 0)"]),
        ("viz", ["(default: 256)"]),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for default in shown:
            assert default in text, (command, default)
        assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["buckets", "foo"],
        ["buckets", "--area", "0"],
        ["export", "--out", "x", "--layers", "pool-9"],
        ["export", "--out", "x", "--layers", "pool-1,pool-1"],
        ["export", "--out", "x", "--layers", "conv-3-4"],  # a vgg19 layer, not vgg16's
        ["export", "--out", "x", "--buckets", "12"],
        ["export", "--out", "x", "--fixed", "224"],
        ["export", "--out", "x", "--width-div", "3"],
        ["export", "--out", "x", "--weights", "random:x"],
        ["export", "--out", "x", "--config", "orig-avg", "--heatmaps"],
        ["build", "--engine", "x", "--backend", "tensorrt", "--buckets", "1x"],
        ["build", "--engine", "x", "--backend", "tensorrt", "--max-batch", "0"],
        ["index", "src", "--engine", "x", "-o", "y", "--layers", "pool-9"],
        ["viz", "a.jpg", "--engine", "x", "-o", "y.png", "--columns", "-1"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == EXIT_USAGE
    assert f"interactive {argv[0]}: error: " in capsys.readouterr().err.splitlines()[-1]


def test_layers_the_engine_lacks_exit_2(narrow_engine: Path, tmp_path: Path) -> None:
    """A real layer name that this engine did not export is bad usage too, once the manifest
    says so; an engine that cannot be read stays a fatal error (exit 1)."""
    common = ["--engine", str(narrow_engine), "--layers", "conv-1-1"]
    for argv in (
        ["index", str(tmp_path), *common, "-o", str(tmp_path / "out")],
        ["viz", str(photos()[0]), *common, "-o", str(tmp_path / "a.png")],
    ):
        result = run(*argv)
        assert result.returncode == EXIT_USAGE, result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"interactive {argv[0]}: error: ")
        assert "conv-1-1: not in this engine" in result.stderr
    assert not (tmp_path / "out").exists()
    bad = run("index", str(tmp_path), "--engine", str(tmp_path), "-o", str(tmp_path / "o"),
              "--layers", "pool-1")  # fmt: skip
    assert bad.returncode == EXIT_FATAL and "not an engine directory" in bad.stderr


def test_log_level_is_interactive_only() -> None:
    """`--log-level debug` turns on interactive's messages, not Pillow's TIFF tags and the like."""
    import logging

    root = logging.getLogger()
    saved = root.level, root.handlers[:], logging.getLogger("interactive_features").level
    try:
        assert main(["--log-level", "debug", "buckets", "500x375"]) == EXIT_OK
        assert logging.getLogger("interactive_features").getEffectiveLevel() == logging.DEBUG
        assert (
            logging.getLogger("interactive_features.runtime").getEffectiveLevel() == logging.DEBUG
        )
        for name in ("PIL", "PIL.TiffImagePlugin", "urllib3", "matplotlib", "fsspec"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("interactive_features").setLevel(saved[2])
