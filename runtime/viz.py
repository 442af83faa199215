"""Activeness heatmaps (gamma-hat, export/ALGORITHM.md section 5) over the image, one panel
per layer.

`render_heatmaps` turns an image and its per-layer maps into one grid image (the paper's
visualisation figure); `render_file` runs an engine exported with `--heatmaps` on one image and
saves that grid as a PNG. Only numpy and Pillow are used (no matplotlib); this module must never
import torch.

Layout (deterministic, in pixels): with ``n = 1 + len(heatmaps)`` panels of ``panel_width`` x
``panel_height`` where ``panel_height = floor(panel_width * H / W + 1/2)`` (at least 1) for an
HxW image, ``c = min(columns, n)`` columns (``columns = 0``: ``c = ceil(sqrt(n))``) and
``r = ceil(n / c)`` rows, the output is

    width  = c * panel_width + (c + 1) * GAP
    height = r * (TITLE_HEIGHT + panel_height) + (r + 1) * GAP

Panel ``k`` (0 is the image, then the layers in order) sits in row ``k // c``, column ``k % c``:
its title strip starts at ``x = GAP + col * (panel_width + GAP)``,
``y = GAP + row * (TITLE_HEIGHT + panel_height + GAP)``, and its picture ``TITLE_HEIGHT`` below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path

if TYPE_CHECKING:
    from .api import Extractor
    from .images import ImageSource

GAP = 4  # pixels between panels and around the grid
TITLE_HEIGHT = 16  # the strip above each panel holding its title
BACKGROUND = (255, 255, 255)
TITLE_COLOUR = (0, 0, 0)

# Matplotlib's "inferno" sampled at 11 evenly spaced points (its published values); the 256-entry
# table interpolates linearly between them. Perceptually ordered dark -> bright, so the most active
# regions are the brightest.
_INFERNO_STOPS = np.array(
    [
        (0, 0, 4),
        (22, 11, 57),
        (66, 10, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def colormap(entries: int = 256) -> np.ndarray:
    """uint8 [entries, 3]: the inferno-like colour of value ``i / (entries - 1)`` in row i."""
    stops = np.linspace(0.0, 1.0, len(_INFERNO_STOPS))
    x = np.linspace(0.0, 1.0, entries)
    table = np.stack([np.interp(x, stops, _INFERNO_STOPS[:, c]) for c in range(3)], axis=1)
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


_LUT = colormap()


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """float32 copy in [0, 1]: divided by its maximum.

    NaN and infinite values become 0, negative ones are clipped to 0, and a map whose maximum is 0
    stays all zero.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    h = np.where(np.isfinite(h), h, 0.0)
    h = np.maximum(h, 0.0)
    peak = float(h.max()) if h.size else 0.0
    if peak > 0:
        h = h / peak
    return h.astype(np.float32)


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """uint8 HxWx3: `heatmap` normalised, upsampled bilinearly to HxW, coloured, blended over.

    Each pixel is ``(1 - alpha) * image + alpha * colour(value)``.
    """
    height, width = pixels.shape[:2]
    normalised = Image.fromarray(normalize_heatmap(heatmap))  # mode "F"
    upsampled = np.asarray(normalised.resize((width, height), Image.Resampling.BILINEAR))
    index = np.clip(np.rint(upsampled * 255.0), 0, 255).astype(np.uint8)
    colours = _LUT[index].astype(np.float32)
    blended = (1.0 - alpha) * pixels.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def grid_shape(n_panels: int, columns: int = 0) -> tuple[int, int]:
    """(columns, rows) of the grid: ``columns = 0`` picks ``ceil(sqrt(n_panels))``."""
    if n_panels < 1:
        raise ValueError(f"need at least one panel, got {n_panels}")
    if columns < 0:
        raise ValueError(f"columns must be >= 0 (0 = automatic), got {columns}")
    c = columns if columns > 0 else math.isqrt(n_panels - 1) + 1
    c = min(c, n_panels)
    return c, -(-n_panels // c)


def panel_height(image_width: int, image_height: int, panel_width: int) -> int:
    """The panel height for an image of that size: its aspect kept, rounded half up."""
    return max(1, (2 * panel_width * image_height + image_width) // (2 * image_width))


def output_size(
    image_width: int, image_height: int, n_layers: int, columns: int = 0, panel_width: int = 256
) -> tuple[int, int]:
    """(width, height) of what `render_heatmaps` returns for an image and `n_layers` maps."""
    c, r = grid_shape(1 + n_layers, columns)
    ph = panel_height(image_width, image_height, panel_width)
    return c * panel_width + (c + 1) * GAP, r * (TITLE_HEIGHT + ph) + (r + 1) * GAP


def render_heatmaps(
    pixels: np.ndarray,
    heatmaps: Mapping[str, np.ndarray],
    *,
    columns: int = 0,
    panel_width: int = 256,
    alpha: float = 0.55,
) -> Image.Image:
    """One RGB image: the picture, then each layer's gamma-hat over it, in a grid of panels.

    `pixels`: HxWx3 uint8 RGB (the image at its bucket size, as fed to the network).
    `heatmaps`: layer name -> 2-D map (any size, typically smaller than the image; non-negative).
    Panel 0 is the image titled "image"; then one panel per layer in the mapping's order, titled
    with the layer's name: the map divided by its own maximum (all-zero maps stay zero, NaN -> 0),
    upsampled bilinearly to HxW, coloured with an inferno-like colormap and blended over the image
    with opacity `alpha`. Every panel is then resized to `panel_width` wide, aspect kept.

    Size: with ``n = 1 + len(heatmaps)``, ``c = min(columns, n)`` (``columns = 0``:
    ``ceil(sqrt(n))``), ``r = ceil(n / c)`` and
    ``panel_height = max(1, floor(panel_width * H / W + 1/2))``, the result is
    ``c * panel_width + (c + 1) * GAP`` wide and ``r * (TITLE_HEIGHT + panel_height) +
    (r + 1) * GAP`` high (GAP = 4, TITLE_HEIGHT = 16); see `output_size`.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels must be an HxWx3 uint8 RGB array, got shape {pixels.shape} {pixels.dtype}"
        )
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    if panel_width < 1:
        raise ValueError(f"panel_width must be >= 1, got {panel_width}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for name, heatmap in heatmaps.items():
        shape = np.shape(heatmap)
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"heatmap {name!r} must be a non-empty 2-D array, got shape {shape}")

    titles = ["image", *heatmaps]
    pictures = [pixels] + [overlay(pixels, h, alpha) for h in heatmaps.values()]
    c, r = grid_shape(len(pictures), columns)
    ph = panel_height(width, height, panel_width)
    canvas = Image.new("RGB", output_size(width, height, len(heatmaps), c, panel_width), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (title, picture) in enumerate(zip(titles, pictures, strict=True)):
        row, col = divmod(k, c)
        x = GAP + col * (panel_width + GAP)
        y = GAP + row * (TITLE_HEIGHT + ph + GAP)
        panel = Image.fromarray(np.ascontiguousarray(picture))
        if panel.size != (panel_width, ph):
            panel = panel.resize((panel_width, ph), Image.Resampling.LANCZOS)
        canvas.paste(panel, (x, y + TITLE_HEIGHT))
        text = _fit(draw, title, font, panel_width - 4)
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        draw.text((x + 2, y + (TITLE_HEIGHT - (bottom - top)) // 2 - top), text, TITLE_COLOUR, font)
    return canvas


def _fit(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont,
    width: int,
) -> str:
    """`text`, shortened with "..." until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def render_file(
    extractor: Extractor,
    image: ImageSource,
    layers: Sequence[str] | None,
    out: str | os.PathLike[str],
    *,
    columns: int = 0,
    panel_width: int = 256,
    alpha: float = 0.55,
) -> Path:
    """Run `extractor` on `image` and save its heatmaps over it as a PNG at `out`; returns `out`.

    `layers`: which layers to show, in that order (None: all of the engine's). Raises ValueError
    when the engine was exported without heatmaps, when a layer is unknown or `layers` is empty,
    and when the image cannot be processed (the message is the extractor's error for it). The
    PNG is written under a temporary name in `out`'s directory and then renamed, so `out` is never
    left half-written.
    """
    manifest = extractor.manifest
    if not manifest.data.get("heatmaps"):
        raise ValueError(
            f"engine {manifest.directory} was exported without heatmaps; re-export it into a new "
            f"directory with `interactive export --heatmaps`{_reexport_hint(extractor)}"
        )
    available = list(extractor.layers)
    chosen = available if layers is None else list(dict.fromkeys(layers))
    if not chosen:
        raise ValueError(f"no layers asked for; this engine has {', '.join(available)}")
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise ValueError(
            f"unknown layer{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"this engine has {', '.join(available)}"
        )

    features = extractor.extract([image])
    if 0 in features.errors:
        raise ValueError(features.errors[0])
    prepared = extractor.prepare(image)
    maps: dict[str, np.ndarray] = {}
    for t in chosen:
        heatmap = features.heatmaps.get(t, [None])[0]
        if heatmap is None:  # not expected from a heatmaps engine; say so rather than crash
            raise ValueError(f"engine {manifest.directory} returned no heatmap for layer {t}")
        maps[t] = heatmap
    picture = render_heatmaps(
        prepared.pixels, maps, columns=columns, panel_width=panel_width, alpha=alpha
    )
    return save_png(picture, out)


def _reexport_hint(extractor: Extractor) -> str:
    """The tail of the no-heatmaps error: ", e.g.: <this engine's export command, --heatmaps on,
    into DIR-heatmaps>", or "" when the manifest lacks what it takes to build that command."""
    manifest = extractor.manifest
    try:
        data = dict(manifest.data)
        data["export"] = {**data["export"], "heatmaps": True}
        twin = type(manifest)(Path(f"{manifest.directory}-heatmaps"), data)
        return f", e.g.: {twin.export_command(manifest.buckets)}"
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""


def save_png(picture: Image.Image, out: str | os.PathLike[str]) -> Path:
    """Save `picture` as PNG at `out` atomically (temporary name beside it, then rename)."""
    target = Path(out)
    with atomic_path(target) as tmp:
        picture.save(tmp, format="PNG")
    return target
