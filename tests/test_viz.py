"""Heatmap rendering (runtime/viz.py and `interactive viz`): the layout, header and colorbar, the
scales, alpha, colormaps (matplotlib's and the built-in fallback), small maps as blocks, the
batch mode over an index, and the errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from interactive_features.export.exporter import export_engine
from interactive_features.runtime import Extractor, index_job
from interactive_features.runtime import cli as cli_module
from interactive_features.runtime.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from interactive_features.runtime.index import read_index
from interactive_features.runtime.parquet import read_table, write_table
from interactive_features.runtime.viz import (
    CELL_LINE_COLOUR,
    COLORBAR_HEIGHT,
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
    DEFAULT_SCALE,
    GAP,
    HEADER_HEIGHT,
    SCALES,
    TITLE_HEIGHT,
    Caption,
    ColormapError,
    Style,
    colormap,
    colormap_names,
    normalize_heatmap,
    output_size,
    panel_height,
    panel_origin,
    render_file,
    render_heatmaps,
    render_index,
)
from PIL import Image

from conftest import narrow_request, photos


def panel(picture: np.ndarray, k: int, columns: int, width: int, height: int) -> np.ndarray:
    """The picture part (no title) of panel k, per the layout documented in viz.py."""
    x, y = panel_origin(k, columns, width, height)
    return picture[y : y + height, x : x + width]


def colorbar(picture: np.ndarray, rows: int) -> np.ndarray:
    """The colorbar's pixels: below a grid of `rows` rows of panels (viz.py's layout)."""
    height = picture.shape[0]
    top = height - (COLORBAR_HEIGHT + 14 + GAP)  # LABEL_HEIGHT = 14
    return picture[top : top + COLORBAR_HEIGHT, GAP : picture.shape[1] - GAP]


def brightness(pixels: np.ndarray) -> float:
    return float(pixels.astype(np.float64).mean())


def photo(stem: str) -> Path:
    return next(p for p in photos() if p.name.startswith(stem))


@pytest.fixture(scope="module")
def extractor(narrow_engine: Path) -> Iterator[Extractor]:
    with Extractor.open(narrow_engine) as ex:
        yield ex


# --------------------------------------------------------------------------------------------
# Scales, colormaps, styles


def test_normalize_heatmap() -> None:
    np.testing.assert_array_equal(normalize_heatmap(np.zeros((3, 4))), np.zeros((3, 4)))
    np.testing.assert_array_equal(normalize_heatmap(np.full((2, 2), np.nan)), np.zeros((2, 2)))
    got = normalize_heatmap(np.array([[0.0, 2.0], [np.nan, 8.0]]))
    np.testing.assert_allclose(got, [[0.0, 0.25], [0.0, 1.0]])
    assert got.dtype == np.float32
    # A given peak (the shared scale): divided by it, never above 1, no minimum subtracted.
    np.testing.assert_allclose(normalize_heatmap(np.array([[5.0, 10.0]]), 20.0), [[0.25, 0.5]])
    np.testing.assert_allclose(normalize_heatmap(np.array([[5.0, 40.0]]), 20.0), [[0.25, 1.0]])


@pytest.mark.parametrize("source", ["builtin", "matplotlib"])
def test_colormaps_are_dark_to_bright(source: str) -> None:
    if source == "matplotlib":
        pytest.importorskip("matplotlib")
    for name in ("inferno", "viridis", "gray"):
        lut = colormap(name, source)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        light = lut.astype(int).sum(axis=1)
        assert light[0] < light[-1] and np.all(np.diff(light) >= -2), name  # (nearly) monotonic
        np.testing.assert_array_equal(colormap(name + "_r", source), lut[::-1])


def test_builtin_tables_match_matplotlib() -> None:
    """The fallback is matplotlib's colormap (sampled at 17 points), so figures look the same
    with or without matplotlib installed (within 7 of 255 levels)."""
    pytest.importorskip("matplotlib")
    for name in ("inferno", "viridis", "gray"):
        diff = np.abs(colormap(name, "builtin").astype(int) - colormap(name, "matplotlib"))
        assert diff.max() <= 7, name


def test_unknown_colormap_names_valid_ones() -> None:
    with pytest.raises(ColormapError, match=r"unknown colormap 'magma'.*inferno, viridis, gray"):
        colormap("magma", "builtin")  # matplotlib's, but not built in
    assert colormap_names("builtin") == [
        "inferno", "inferno_r", "viridis", "viridis_r", "gray", "gray_r"
    ]  # fmt: skip
    np.testing.assert_array_equal(colormap("viridis"), colormap("viridis", "builtin"))  # auto
    pytest.importorskip("matplotlib")
    assert colormap("magma").shape == (256, 3)  # auto: matplotlib's, which has it
    assert colormap_names()[:6] == colormap_names("builtin") and "magma" in colormap_names()
    with pytest.raises(ColormapError, match=r"unknown colormap 'nope'.*inferno, viridis, magma"):
        colormap("nope")


def test_the_default_colormap_imports_no_matplotlib(tmp_path: Path) -> None:
    """matplotlib writes its config directory into the home on import: the default figure
    (built-in inferno) must not import it, nor write anything outside -o."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from interactive_features.runtime.viz import Style, render_heatmaps\n"
        "render_heatmaps(np.zeros((8, 8, 3), np.uint8), {'a': np.ones((2, 2))}, Style())\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_style_checks() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must be in"):
            Style(alpha=bad)
    with pytest.raises(ValueError, match="scale must be one of layer, shared"):
        Style(scale="log")
    with pytest.raises(ValueError, match="columns"):
        Style(columns=-1)
    with pytest.raises(ColormapError):
        Style(colormap="magma", colormaps="builtin")


def test_cli_defaults_are_the_modules() -> None:
    """cli.py writes viz's defaults out (no numpy import to build the parser): the same."""
    assert cli_module.VIZ_SCALES == SCALES and cli_module.VIZ_SCALE == DEFAULT_SCALE
    assert cli_module.VIZ_ALPHA == DEFAULT_ALPHA and cli_module.VIZ_COLORMAP == DEFAULT_COLORMAP


# --------------------------------------------------------------------------------------------
# render_heatmaps on synthetic arrays


def test_layout_header_and_colorbar() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # H=48, W=64
    maps = {"zero": np.zeros((6, 8)), "nan": np.full((6, 8), np.nan), "ramp": np.ones((6, 8))}
    caption = Caption("cat.jpg", (64, 48), {"arch": "vgg16", "config": "last", "p": 2,
                                            "weights": "random:0", "width_div": 8})  # fmt: skip
    picture = render_heatmaps(pixels, maps, Style(panel_width=64, alpha=0.5), caption)
    # 4 panels -> 2 columns, 2 rows; panels 64x48 (no resize): documented size.
    assert picture.mode == "RGB"
    bar = COLORBAR_HEIGHT + 14 + GAP
    assert picture.size == (
        2 * 64 + 3 * GAP,
        HEADER_HEIGHT + 2 * (TITLE_HEIGHT + 48) + 3 * GAP + bar,
    )
    assert picture.size == output_size(64, 48, 3, panel_width=64)
    got = np.asarray(picture)
    np.testing.assert_array_equal(panel(got, 0, 2, 64, 48), pixels)
    # An all-zero map and an all-NaN map are both "nothing active": the blend with colour 0.
    want = np.rint(0.5 * pixels + 0.5 * colormap()[0].astype(np.float64)).astype(np.uint8)
    np.testing.assert_allclose(panel(got, 1, 2, 64, 48), want, atol=1)
    np.testing.assert_array_equal(panel(got, 2, 2, 64, 48), panel(got, 1, 2, 64, 48))
    # The header's two lines and the panel titles hold dark (text) pixels on white.
    header = got[:HEADER_HEIGHT]
    assert header[: HEADER_HEIGHT // 2].min() < 128 and header[HEADER_HEIGHT // 2 :].min() < 128
    strip = got[HEADER_HEIGHT + GAP : HEADER_HEIGHT + GAP + TITLE_HEIGHT, GAP : GAP + 64]
    assert strip.min() < 128 and strip.max() == 255
    # The colorbar is the colormap, dark on the left to bright on the right, every row alike.
    cbar = colorbar(got, 2).astype(int)
    assert cbar.shape == (COLORBAR_HEIGHT, picture.width - 2 * GAP, 3)
    assert np.all(cbar == cbar[:1])
    light = cbar[0].sum(axis=1)
    assert light[0] < 20 and light[-1] > 600 and np.all(np.diff(light) >= -2)
    assert len(np.unique(cbar[0], axis=0)) > 50  # a gradient, not a few flat blocks
    np.testing.assert_array_equal(cbar[0, 0], colormap()[0])
    np.testing.assert_array_equal(cbar[0, -1], colormap()[-1])


def test_no_colorbar_without_maps() -> None:
    pixels = np.zeros((30, 40, 3), np.uint8)
    picture = render_heatmaps(pixels, {}, Style(panel_width=40))
    assert picture.size == (40 + 2 * GAP, HEADER_HEIGHT + TITLE_HEIGHT + 30 + 2 * GAP)


@pytest.mark.parametrize(
    ("n_layers", "columns", "grid"),
    [(0, 0, (1, 1)), (3, 0, (2, 2)), (4, 0, (3, 2)), (8, 0, (3, 3)), (9, 0, (4, 3)),
     (3, 4, (4, 1)), (3, 10, (4, 1)), (3, 1, (1, 4))],
)  # fmt: skip
def test_output_size_rule(n_layers: int, columns: int, grid: tuple[int, int]) -> None:
    pixels = np.zeros((30, 40, 3), np.uint8)
    maps = {f"l{i}": np.ones((3, 4)) for i in range(n_layers)}
    picture = render_heatmaps(pixels, maps, Style(columns=columns, panel_width=20))
    c, r = grid
    bar = COLORBAR_HEIGHT + 14 + GAP if n_layers else 0
    want = (c * 20 + (c + 1) * GAP, HEADER_HEIGHT + r * (TITLE_HEIGHT + 15) + (r + 1) * GAP + bar)
    assert picture.size == want == output_size(40, 30, n_layers, columns, 20)


def test_alpha_zero_keeps_the_photo_and_one_does_not() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    maps = {"a": rng.random((5, 6)), "b": rng.random((40, 60))}
    clear = np.asarray(render_heatmaps(pixels, maps, Style(panel_width=60, alpha=0.0)))
    for k in (1, 2):
        np.testing.assert_array_equal(panel(clear, k, 2, 60, 40), pixels)
    opaque = np.asarray(render_heatmaps(pixels, maps, Style(panel_width=60, alpha=1.0)))
    for k in (1, 2):
        got = panel(opaque, k, 2, 60, 40)
        assert np.abs(got.astype(int) - pixels).mean() > 30
        # alpha 1 is the colours alone: every pixel is a colormap entry.
        lut = {tuple(c) for c in colormap()}
        assert {tuple(p) for p in got.reshape(-1, 3)} <= lut


def test_small_map_is_drawn_as_blocks() -> None:
    """A 1x3 map (fc-6 of a 288x224 bucket) shows 3 flat blocks, a border between them, and
    says its size in the title; a bilinear wash would have no flat block at all."""
    pixels = np.full((64, 192, 3), 128, np.uint8)
    fc6 = np.array([[1.0, 2.0, 3.0]])
    got = np.asarray(render_heatmaps(pixels, {"fc-6": fc6}, Style(panel_width=192, alpha=1.0)))
    layer = panel(got, 1, 2, 192, 64).astype(int)
    blocks = [layer[:, 64 * j + 2 : 64 * j + 62] for j in range(3)]  # each block's inside
    for block in blocks:
        assert np.all(block == block[0, 0]), "a block is not flat"
    colours = [tuple(b[0, 0]) for b in blocks]
    assert len(set(colours)) == 3
    lut = colormap()
    assert colours == [tuple(lut[i]) for i in (85, 170, 255)]  # 1/3, 2/3, 1 of the max
    for x in (64, 128):  # one border column between cells (cells >= CELL_LINES px)
        assert np.all(layer[:, x] == CELL_LINE_COLOUR)
    # A big map's cells (< CELL_LINES px) get no border lines: a 64x192 map is the image grid.
    fine = np.asarray(
        render_heatmaps(pixels, {"x": np.ones((64, 192))}, Style(panel_width=192, alpha=1.0))
    )
    assert np.all(panel(fine, 1, 2, 192, 64) == lut[-1])


def test_shared_scale_makes_a_weak_layer_darker() -> None:
    rng = np.random.default_rng(2)
    pixels = np.full((32, 32, 3), 200, np.uint8)
    weak, strong = rng.random((4, 4)) * 1e-3, rng.random((4, 4)) * 10.0
    maps = {"weak": weak, "strong": strong}
    per_layer = np.asarray(render_heatmaps(pixels, maps, Style(panel_width=32, scale="layer")))
    shared = np.asarray(render_heatmaps(pixels, maps, Style(panel_width=32, scale="shared")))
    assert brightness(panel(shared, 1, 2, 32, 32)) < brightness(panel(per_layer, 1, 2, 32, 32)) - 40
    np.testing.assert_array_equal(panel(shared, 2, 2, 32, 32), panel(per_layer, 2, 2, 32, 32))
    # The shared colorbar's right label is the shared peak, so the two bars' labels differ.
    assert not np.array_equal(shared[-14 - GAP :], per_layer[-14 - GAP :])


def test_builtin_fallback_renders() -> None:
    """Without matplotlib (forced here) the built-in colormap draws the same figure shape."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    maps = {"a": np.arange(16.0).reshape(4, 4)}
    style = Style(panel_width=32, alpha=1.0, colormap="viridis", colormaps="builtin")
    got = np.asarray(render_heatmaps(pixels, maps, style))
    lut = colormap("viridis", "builtin")
    assert {tuple(p) for p in panel(got, 1, 2, 32, 32).reshape(-1, 3)} <= {
        *map(tuple, lut),
        CELL_LINE_COLOUR,
    }
    np.testing.assert_array_equal(colorbar(got, 1)[0, 0], lut[0])


def test_render_heatmaps_rejects_bad_input() -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        render_heatmaps(pixels.astype(np.float32), {})
    with pytest.raises(ValueError, match="'x'.*2-D"):
        render_heatmaps(pixels, {"x": np.zeros((1, 2, 2))})


# --------------------------------------------------------------------------------------------
# render_file on the narrow engine and real photos


def test_render_file_all_layers(extractor: Extractor, tmp_path: Path) -> None:
    source = photo("astronaut_512")
    assert extractor.prepare(source).bucket == (256, 256)
    out = render_file(extractor, source, None, tmp_path / "astronaut.png", Style(panel_width=128))
    assert out == tmp_path / "astronaut.png"
    assert [p.name for p in tmp_path.iterdir()] == ["astronaut.png"]  # no temporary left
    with Image.open(out) as f:
        assert f.format == "PNG" and f.mode == "RGB"
        # 10 panels of 128x128 -> 4 columns, 3 rows.
        assert f.size == output_size(256, 256, 9, 0, 128) == (532, 448 + HEADER_HEIGHT + 30)
        got = np.asarray(f)
    image_panel = panel(got, 0, 4, 128, 128).astype(int)
    for k in range(1, 10):
        layer_panel = panel(got, k, 4, 128, 128).astype(int)
        assert np.abs(layer_panel - image_panel).mean() > 5, f"panel {k} looks like the image"
    assert not np.array_equal(panel(got, 1, 4, 128, 128), panel(got, 9, 4, 128, 128))


def test_real_photo_shared_scale_darkens_conv_layers(extractor: Extractor, tmp_path: Path) -> None:
    """gamma-hat of conv-3-3 is ~10^4 smaller than pool-5's: on one shared range its panel is
    the photo darkened by the colormap's black; per layer it is not."""
    source, layers = photo("chelsea"), ["conv-3-3", "pool-5"]
    w, h = extractor.prepare(source).bucket
    ph = panel_height(w, h, 128)
    figures = {}
    for scale in SCALES:
        out = render_file(extractor, source, layers, tmp_path / f"{scale}.png",
                          Style(panel_width=128, scale=scale))  # fmt: skip
        figures[scale] = np.asarray(Image.open(out))
    conv = {s: brightness(panel(f, 1, 2, 128, ph)) for s, f in figures.items()}
    assert conv["shared"] < conv["layer"] - 20, conv
    photo_panel = brightness(panel(figures["shared"], 0, 2, 128, ph))
    assert conv["shared"] < 0.5 * photo_panel  # (1 - alpha) of the photo plus near-black


def test_real_photo_fc6_is_three_blocks(extractor: Extractor, tmp_path: Path) -> None:
    source = photo("chelsea")
    assert extractor.prepare(source).bucket == (288, 224)
    out = render_file(extractor, source, ["fc-6"], tmp_path / "fc6.png", Style(panel_width=288))
    got = np.asarray(Image.open(out)).astype(int)
    layer = panel(got, 1, 2, 288, 224)
    # 3 cells of 96 pixels: a border column at x = 96 and 192 (CELL_LINE_COLOUR blended).
    inside = layer[:, [50, 150, 250]]
    borders = layer[:, [96, 192]]
    assert np.abs(borders.mean(axis=(0, 2)) - inside.mean()).min() > 10


def test_render_file_layer_subset(extractor: Extractor, tmp_path: Path) -> None:
    source = photo("astronaut_portrait")
    width, height = extractor.prepare(source).bucket
    assert (width, height) == (224, 288)
    out = tmp_path / "sub" / "portrait.png"
    out.parent.mkdir()
    render_file(extractor, source, ["pool-5", "conv-3-3", "pool-5"], out, Style(columns=3))
    with Image.open(out) as f:
        # image, pool-5, conv-3-3 (the duplicate dropped): one row of three 256x329 panels.
        assert f.size == output_size(width, height, 2, 3, 256)
        assert f.size == (3 * 256 + 4 * GAP, HEADER_HEIGHT + 329 + 24 + COLORBAR_HEIGHT + 18)
        got = np.asarray(f)
    assert not np.array_equal(panel(got, 1, 3, 256, 329), panel(got, 2, 3, 256, 329))


def test_unknown_layer(extractor: Extractor, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"unknown layer fc-9; this engine has pool-1, .*fc-6"):
        render_file(extractor, photos()[0], ["pool-1", "fc-9"], out)
    with pytest.raises(ValueError, match="no layers"):
        render_file(extractor, photos()[0], [], out)
    assert not out.exists()


def test_broken_image(extractor: Extractor, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos()[0].read_bytes()[:300])
    out = tmp_path / "broken.png"
    with pytest.raises(ValueError, match="broken.jpg"):
        render_file(extractor, broken, None, out)
    assert not out.exists()
    with pytest.raises(ValueError, match="missing.jpg: no such file"):
        render_file(extractor, tmp_path / "missing.jpg", None, out)


def test_engine_without_heatmaps(tmp_path: Path) -> None:
    engine = tmp_path / "no-heatmaps"
    request = narrow_request(engine, buckets="256x256", layers=("pool-1",))
    request.validate = False
    export_engine(request, log=lambda line: None)
    out = tmp_path / "x.png"
    with Extractor.open(engine) as ex, pytest.raises(ValueError) as err:
        render_file(ex, photos()[0], None, out)
    message = str(err.value)
    assert "without heatmaps" in message and "interactive export --heatmaps" in message
    assert f"--out {engine}-heatmaps" in message and "--heatmaps" in message.split("e.g.:")[1]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The command line, and the batch mode over an index


def test_cli_single_image(
    narrow_engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "heat.png"
    argv = ["viz", str(photo("coffee")), "--engine", str(narrow_engine), "-o", str(out),
            "--layers", "pool-4,fc-6", "--scale", "shared", "--alpha", "0", "--colormap", "gray",
            "--panel-width", "96"]  # fmt: skip
    assert main(argv) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    got = np.asarray(Image.open(out))
    assert got.shape[:2] == output_size(288, 224, 2, 0, 96)[::-1]
    ph = panel_height(288, 224, 96)
    np.testing.assert_array_equal(panel(got, 1, 2, 96, ph), panel(got, 0, 2, 96, ph))  # alpha 0
    bar = colorbar(got, 2)[0].astype(int)
    assert np.all(bar[:, 0] == bar[:, 1]) and bar[0, 0] < 5 and bar[-1, 0] > 250  # gray


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a.jpg", "--colormap", "nope"], "unknown colormap 'nope'; "),
        (["a.jpg", "--alpha", "1.5"], "--alpha: must be in [0, 1], got 1.5"),
        (["a.jpg", "--alpha", "nan"], "--alpha: must be in [0, 1]"),
        (["a.jpg", "--alpha", "half"], "--alpha: expected a number in [0, 1], got 'half'"),
        (["a.jpg", "--scale", "log"], "--scale: invalid choice: 'log'"),
        ([], "give either IMAGE or --index OUTDIR"),
        (["a.jpg", "--index", "idx"], "give either IMAGE or --index OUTDIR"),
        (["a.jpg", "--limit", "2"], "--limit goes with --index"),
        (["a.jpg", "--index", "idx", "--limit", "0"], "--limit: must be at least 1"),
    ],
)
def test_cli_bad_usage_is_one_line_exit_2(
    args: list[str], message: str, narrow_engine: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    engine = ["--engine", str(narrow_engine)] if "--index" not in args else []
    with pytest.raises(SystemExit) as exit:
        main(["viz", *args, *engine, "-o", str(tmp_path / "x.png")])
    assert exit.value.code == EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert err[-1].startswith("interactive viz: error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "x.png").exists()


def test_cli_image_needs_an_engine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["viz", "a.jpg", "-o", str(tmp_path / "x.png")])
    assert exit.value.code == EXIT_USAGE
    assert "IMAGE needs --engine DIR" in capsys.readouterr().err.splitlines()[-1]


def test_help_states_the_default_scale(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: layer, because" in text and "so weak layers look weak" in text
    assert "(default: 0.55)" in text and "(default: inferno)" in text


@pytest.fixture(scope="module")
def heatmap_index(narrow_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of copies of the bundled photos, made with --heatmaps."""
    root = tmp_path_factory.mktemp("viz-index")
    source = root / "photos"
    source.mkdir()
    for p in photos():
        shutil.copy(p, source / p.name)
    out = root / "index"
    index_job(source, narrow_engine, out, heatmaps=True, workers=0, layers=["pool-5", "fc-6"])
    return out


def test_batch_from_the_index_columns(
    heatmap_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "figures"
    assert main(["viz", "--index", str(heatmap_index), "-o", str(out)]) == EXIT_OK
    rows = read_index(heatmap_index, errors=False)
    ids, paths = rows["id"].to_pylist(), rows["path"].to_pylist()
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == len(photos()) == len(ids)  # one PNG per row, nothing else
    for k, (row_id, path) in enumerate(zip(ids, paths, strict=True)):
        assert names[k] == f"{k:05d}-{row_id}-{Path(path).stem}.png"
    captured = capsys.readouterr()
    line = captured.out
    assert f"wrote 5 PNGs for 5 rows of {heatmap_index}" in line and "heatmap columns" in line
    assert captured.err.splitlines()[0].startswith(f"viz: 5 rows of {heatmap_index}, maps from")
    # Each figure: the row's bucket, image + pool-5 + fc-6 (the index's layers).
    buckets = rows["bucket"].to_pylist()
    for name, bucket in zip(names, buckets, strict=True):
        w, h = (int(v) for v in bucket.split("x"))
        with Image.open(out / name) as f:
            assert f.format == "PNG" and f.size == output_size(w, h, 2)
    # --limit: the first N rows only (same names).
    limited = tmp_path / "two"
    assert main(["viz", "--index", str(heatmap_index), "-o", str(limited), "--limit", "2"]) == 0
    assert sorted(p.name for p in limited.iterdir()) == names[:2]


def test_batch_through_the_engine_and_failed_rows(
    heatmap_index: Path, narrow_engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--engine runs each row's image again (full-resolution maps); a row whose image is gone
    is one failure line, the others are written, exit 3."""
    gone = heatmap_index.parent / "photos" / "coffee_480x360.jpg"
    kept = gone.read_bytes()
    gone.unlink()
    try:
        out = tmp_path / "engine"
        argv = ["viz", "--index", str(heatmap_index), "-o", str(out), "--engine",
                str(narrow_engine), "--layers", "conv-3-3"]  # fmt: skip
        assert main(argv) == EXIT_PARTIAL
    finally:
        gone.write_bytes(kept)
    captured = capsys.readouterr()
    assert "wrote 4 PNGs for 5 rows" in captured.out and f"engine {narrow_engine}" in captured.out
    assert "1 failed" in captured.out
    failures = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failures) == 1 and "coffee_480x360.jpg" in failures[0]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and not any("coffee" in n for n in names)
    with Image.open(out / names[0]) as f:  # astronaut_512 (256x256): image + conv-3-3
        assert f.size == output_size(256, 256, 1)


def test_batch_unknown_layer_is_usage(
    heatmap_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(
            ["viz", "--index", str(heatmap_index), "-o", str(tmp_path / "x"), "--layers", "pool-1"]
        )
    assert exit.value.code == EXIT_USAGE
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("interactive viz: error: --layers pool-1: no heatmap column in ")
    assert "(pool-5, fc-6)" in line and not (tmp_path / "x").exists()


def test_batch_errors(heatmap_index: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown layer pool-1; .*\(heatmap columns\) has pool-5"):
        render_index(heatmap_index, tmp_path / "x", layers=["pool-1"])
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copytree(heatmap_index, plain / "index")
    bare = plain / "index"
    for part in bare.glob("part-*.parquet"):  # the same index without its heatmap columns
        table = read_table(part)
        write_table(table.drop([c for c in table.column_names if c.endswith(".heatmap")]), part)
    with pytest.raises(ValueError, match="indexed without --heatmaps; name a heatmaps engine"):
        render_index(bare, tmp_path / "y")
    assert main(["viz", "--index", str(tmp_path / "nothing"), "-o", str(tmp_path / "z")]) == 1
    # The command falls back on the engine that made the index (its _manifest.json).
    out = tmp_path / "from-engine"
    assert main(["viz", "--index", str(bare), "-o", str(out), "--limit", "1"]) == EXIT_OK
    assert len(list(out.iterdir())) == 1
