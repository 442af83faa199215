"""Heatmap rendering (runtime/viz.py): the grid layout, normalisation, and render_file's errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from interactive_features.export.exporter import export_engine
from interactive_features.runtime import Extractor
from interactive_features.runtime.viz import (
    GAP,
    TITLE_HEIGHT,
    colormap,
    normalize_heatmap,
    output_size,
    render_file,
    render_heatmaps,
)
from PIL import Image

from conftest import narrow_request, photos


def panel(picture: np.ndarray, k: int, columns: int, width: int, height: int) -> np.ndarray:
    """The picture part (no title) of panel k, per the layout documented in viz.py."""
    row, col = divmod(k, columns)
    x = GAP + col * (width + GAP)
    y = GAP + row * (TITLE_HEIGHT + height + GAP) + TITLE_HEIGHT
    return picture[y : y + height, x : x + width]


def photo(stem: str) -> Path:
    return next(p for p in photos() if p.name.startswith(stem))


@pytest.fixture(scope="module")
def extractor(narrow_engine: Path) -> Iterator[Extractor]:
    with Extractor.open(narrow_engine) as ex:
        yield ex


# --------------------------------------------------------------------------------------------
# render_heatmaps on synthetic arrays


def test_normalize_heatmap() -> None:
    np.testing.assert_array_equal(normalize_heatmap(np.zeros((3, 4))), np.zeros((3, 4)))
    np.testing.assert_array_equal(normalize_heatmap(np.full((2, 2), np.nan)), np.zeros((2, 2)))
    got = normalize_heatmap(np.array([[0.0, 2.0], [np.nan, 8.0]]))
    np.testing.assert_allclose(got, [[0.0, 0.25], [0.0, 1.0]])
    assert got.dtype == np.float32


def test_colormap_is_dark_to_bright() -> None:
    lut = colormap()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    brightness = lut.astype(int).sum(axis=1)
    assert brightness[0] < 10 and brightness[-1] > 600
    assert np.all(np.diff(brightness) >= -2)  # (nearly) monotonic


def test_render_heatmaps_synthetic() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # H=48, W=64
    ramp = np.arange(48, dtype=np.float32).reshape(6, 8)
    maps = {"zero": np.zeros((6, 8)), "nan": np.full((6, 8), np.nan), "ramp": ramp}
    picture = render_heatmaps(pixels, maps, panel_width=64, alpha=0.5)
    # 4 panels -> 2 columns, 2 rows; panels 64x48 (no resize): documented size.
    assert picture.mode == "RGB"
    assert picture.size == (2 * 64 + 3 * GAP, 2 * (TITLE_HEIGHT + 48) + 3 * GAP)
    assert picture.size == output_size(64, 48, 3, panel_width=64)
    got = np.asarray(picture)
    np.testing.assert_array_equal(panel(got, 0, 2, 64, 48), pixels)
    # An all-zero map and an all-NaN map are both "nothing active": the blend with colour 0.
    want = np.rint(0.5 * pixels + 0.5 * colormap()[0].astype(np.float64)).astype(np.uint8)
    np.testing.assert_allclose(panel(got, 1, 2, 64, 48), want, atol=1)
    np.testing.assert_array_equal(panel(got, 2, 2, 64, 48), panel(got, 1, 2, 64, 48))
    # The ramp is brightest at the bottom right, and its panel differs from the zero one.
    ramp_panel = panel(got, 3, 2, 64, 48).astype(int)
    assert not np.array_equal(ramp_panel, panel(got, 1, 2, 64, 48))
    assert ramp_panel[-8:, -8:].mean() > ramp_panel[:8, :8].mean()
    # Title strips hold some dark (text) pixels on the white background.
    strip = got[GAP : GAP + TITLE_HEIGHT, GAP : GAP + 64]
    assert strip.min() < 128 and strip.max() == 255


@pytest.mark.parametrize(
    ("n_layers", "columns", "grid"),
    [(0, 0, (1, 1)), (3, 0, (2, 2)), (4, 0, (3, 2)), (8, 0, (3, 3)), (9, 0, (4, 3)),
     (3, 4, (4, 1)), (3, 10, (4, 1)), (3, 1, (1, 4))],
)  # fmt: skip
def test_output_size_rule(n_layers: int, columns: int, grid: tuple[int, int]) -> None:
    pixels = np.zeros((30, 40, 3), np.uint8)
    maps = {f"l{i}": np.ones((3, 4)) for i in range(n_layers)}
    picture = render_heatmaps(pixels, maps, columns=columns, panel_width=20)
    c, r = grid
    want = (c * 20 + (c + 1) * GAP, r * (TITLE_HEIGHT + 15) + (r + 1) * GAP)  # 40x30 -> 20x15
    assert picture.size == want == output_size(40, 30, n_layers, columns, 20)


def test_render_heatmaps_rejects_bad_input() -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        render_heatmaps(pixels.astype(np.float32), {})
    with pytest.raises(ValueError, match="'x'.*2-D"):
        render_heatmaps(pixels, {"x": np.zeros((1, 2, 2))})
    with pytest.raises(ValueError, match="columns"):
        render_heatmaps(pixels, {}, columns=-1)
    with pytest.raises(ValueError, match="alpha"):
        render_heatmaps(pixels, {}, alpha=2.0)


# --------------------------------------------------------------------------------------------
# render_file on the narrow engine


def test_render_file_all_layers(extractor: Extractor, tmp_path: Path) -> None:
    source = photo("astronaut_512")
    assert extractor.prepare(source).bucket == (256, 256)
    out = render_file(extractor, source, None, tmp_path / "astronaut.png", panel_width=128)
    assert out == tmp_path / "astronaut.png"
    assert [p.name for p in tmp_path.iterdir()] == ["astronaut.png"]  # no temporary left
    with Image.open(out) as f:
        assert f.format == "PNG" and f.mode == "RGB"
        # 10 panels of 128x128 -> 4 columns, 3 rows.
        assert f.size == (4 * 128 + 5 * GAP, 3 * (TITLE_HEIGHT + 128) + 4 * GAP) == (532, 448)
        got = np.asarray(f)
    image_panel = panel(got, 0, 4, 128, 128).astype(int)
    for k in range(1, 10):
        layer_panel = panel(got, k, 4, 128, 128).astype(int)
        assert np.abs(layer_panel - image_panel).mean() > 5, f"panel {k} looks like the image"
    # The layers' maps differ from one another too.
    assert not np.array_equal(panel(got, 1, 4, 128, 128), panel(got, 9, 4, 128, 128))


def test_render_file_layer_subset(extractor: Extractor, tmp_path: Path) -> None:
    source = photo("astronaut_portrait")
    width, height = extractor.prepare(source).bucket
    assert (width, height) == (224, 288)
    out = tmp_path / "sub" / "portrait.png"
    out.parent.mkdir()
    render_file(extractor, source, ["pool-5", "conv-3-3", "pool-5"], out, columns=3)
    with Image.open(out) as f:
        # image, pool-5, conv-3-3 (the duplicate dropped): one row of three 256x329 panels.
        assert f.size == output_size(width, height, 2, 3, 256) == (3 * 256 + 4 * GAP, 329 + 24)
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
