"""Activeness heatmaps (gamma-hat, export/ALGORITHM.md section 5) over the image, one panel
per layer, with a header, a scale and a colorbar.

`render_heatmaps` turns an image and its per-layer maps into one figure; `render_file` runs an
engine exported with `--heatmaps` on one image and saves that figure as a PNG; `render_index`
does it for the rows of an `interactive index` OUTDIR. Only numpy and Pillow are needed
(matplotlib, when installed, only supplies colormaps beyond the built-in inferno, viridis
and gray); this module must never import torch.

What a panel shows: the layer's map divided by the scale's peak (`scale="layer"`: the map's own
maximum; `"shared"`: the largest value of every map of the figure), clipped to [0, 1] (0 stays 0:
gamma-hat is never negative and 0 means "no activeness", so no minimum is subtracted), coloured
with the colormap, upsampled to the panel by nearest neighbour (every cell of the map is a block
of the panel, so a 3x1 map shows 3 blocks; cells of at least CELL_LINES pixels get a 1-pixel
border so that equal neighbours stay tellable apart) and blended over the photo:
``(1 - alpha) * photo + alpha * colour``, nothing rescaled afterwards (alpha 0 leaves the photo
exactly as it is). A panel's title is the layer, its map's size (W x H cells) and its maximum.

Layout (deterministic, in pixels): with ``n = 1 + len(heatmaps)`` panels of ``panel_width`` x
``panel_height`` where ``panel_height = floor(panel_width * H / W + 1/2)`` (at least 1) for an
HxW image, ``c = min(columns, n)`` columns (``columns = 0``: ``c = ceil(sqrt(n))``) and
``r = ceil(n / c)`` rows, the output is

    width  = c * panel_width + (c + 1) * GAP
    height = HEADER_HEIGHT + r * (TITLE_HEIGHT + panel_height) + (r + 1) * GAP + bar

where ``bar = COLORBAR_HEIGHT + LABEL_HEIGHT + GAP`` when there is at least one heatmap, else 0.
The header (two lines: the file name; bucket, network, config, weights and scale) fills
``y < HEADER_HEIGHT``. Panel ``k`` (0 is the image, then the layers in order) sits in row
``k // c``, column ``k % c``: its title strip starts at ``x = GAP + col * (panel_width + GAP)``,
``y = HEADER_HEIGHT + GAP + row * (TITLE_HEIGHT + panel_height + GAP)``, and its picture
``TITLE_HEIGHT`` below. The colorbar spans ``GAP <= x < width - GAP`` from the grid's bottom
(``y = HEADER_HEIGHT + r * (TITLE_HEIGHT + panel_height) + (r + 1) * GAP``) for COLORBAR_HEIGHT
rows, value 0 on the left, the peak on the right; its labels lie below it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .buckets import format_size, parse_size
from .optional import MissingDependency, optional_import
from .paths import display_name

if TYPE_CHECKING:
    from .api import Extractor
    from .images import ImageSource

GAP = 4  # pixels between panels and around the grid
HEADER_HEIGHT = 30  # the figure's two header lines
TITLE_HEIGHT = 16  # the strip above each panel holding its title
COLORBAR_HEIGHT = 12
LABEL_HEIGHT = 14  # the colorbar's labels, below it
CELL_LINES = 24  # map cells at least this many pixels wide and high get a border line
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
CELL_LINE_COLOUR = (128, 128, 128)  # mid-grey: visible on both ends of the colormaps

SCALES = ("layer", "shared")
# Per layer by default: gamma-hat's magnitude differs by ~10^4 between layers (pool layers
# collect |dlnf/dX| through their switches, conv layers sum over a window: measured on the
# bundled photos, pool-5 ~2e4 against conv-3-3 ~4), so one shared range leaves the conv panels
# black. `shared` is the choice for comparing layers' strengths.
DEFAULT_SCALE = "layer"
DEFAULT_ALPHA = 0.55
DEFAULT_COLORMAP = "inferno"
COLORMAP_SOURCES = ("auto", "matplotlib", "builtin")

# Matplotlib's colormaps sampled at 17 evenly spaced points (their published values); the
# 256-entry table interpolates linearly between them. Both are perceptually ordered dark ->
# bright, so the most active regions are the brightest.
_BUILTIN_STOPS: dict[str, list[tuple[int, int, int]]] = {
    "inferno": [
        (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
        (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49),
        (241, 115, 29), (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105),
        (252, 255, 164),
    ],
    "viridis": [
        (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
        (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128),
        (63, 188, 115), (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25),
        (253, 231, 37),
    ],
    "gray": [(0, 0, 0), (255, 255, 255)],
}  # fmt: skip


class ColormapError(ValueError):
    """An unknown colormap name; the message names some valid ones."""


def _matplotlib_colormaps() -> Any | None:
    """matplotlib's colormap registry, or None when matplotlib is not installed."""
    try:
        return optional_import("matplotlib", "", "").colormaps
    except MissingDependency:
        return None


BUILTIN_COLORMAPS = [n + r for n in _BUILTIN_STOPS for r in ("", "_r")]


def colormap_names(source: str = "auto") -> list[str]:
    """The names `colormap` accepts from `source` ("builtin": inferno, viridis, gray and their
    ``_r`` reverses; "matplotlib": matplotlib's; "auto": both, matplotlib's if installed)."""
    registry = _registry(source)
    builtin = [] if source == "matplotlib" else BUILTIN_COLORMAPS
    return builtin + sorted(set(registry or ()) - set(builtin))


def _registry(source: str) -> Any | None:
    if source not in COLORMAP_SOURCES:
        raise ValueError(f"colormap source must be one of {', '.join(COLORMAP_SOURCES)}")
    if source == "builtin":
        return None
    registry = _matplotlib_colormaps()
    if registry is None and source == "matplotlib":
        raise MissingDependency(
            "matplotlib colormaps need matplotlib; install it with "
            "`pip install 'interactive-features[viz]'`"
        )
    return registry


def colormap(name: str = DEFAULT_COLORMAP, source: str = "auto", entries: int = 256) -> np.ndarray:
    """uint8 [entries, 3]: the colour of value ``i / (entries - 1)`` in row i.

    `source` "builtin": the built-in tables (inferno, viridis, gray: matplotlib's values sampled
    at 17 points; ``NAME_r`` reversed); "matplotlib": matplotlib's own; "auto": the built-in
    table when there is one, else matplotlib's when it is installed. (So the default never
    imports matplotlib, which creates its config directory in the user's home on import.)
    Raises ColormapError naming some valid names for an unknown `name`.
    """
    x = np.linspace(0.0, 1.0, entries)
    if source == "auto" and name in BUILTIN_COLORMAPS:
        source = "builtin"
    registry = _registry(source)
    if registry is not None:
        if name not in registry:
            raise ColormapError(_unknown_colormap(name, sorted(registry), "matplotlib's"))
        table = np.asarray(registry[name](x), dtype=np.float64)[:, :3] * 255.0
    else:
        base, reverse = (name[:-2], True) if name.endswith("_r") else (name, False)
        if base not in _BUILTIN_STOPS:
            raise ColormapError(
                _unknown_colormap(name, BUILTIN_COLORMAPS, "the built-in (no matplotlib)")
            )
        stops = np.asarray(_BUILTIN_STOPS[base], dtype=np.float64)
        at = np.linspace(0.0, 1.0, len(stops))
        table = np.stack([np.interp(x, at, stops[:, c]) for c in range(3)], axis=1)
        if reverse:
            table = table[::-1]
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


def _unknown_colormap(name: str, valid: list[str], which: str) -> str:
    common = [n for n in ("inferno", "viridis", "magma", "plasma", "gray", "jet") if n in valid]
    others = [n for n in valid if n not in common and not n.endswith("_r")]
    shown = (common + others)[:8]
    return (
        f"unknown colormap {name!r}; {which} colormaps include {', '.join(shown)} "
        f"({len(valid)} in all, NAME_r reverses one)"
    )


@dataclass(frozen=True)
class Style:
    """How a figure looks. `alpha`: the overlay's opacity (0: the photo alone, 1: the colours
    alone); `scale`: "layer" (each panel's own maximum is its top colour) or "shared" (one range
    for every panel of the figure); `colormap` looked up in `colormaps` (see `colormap`)."""

    columns: int = 0
    panel_width: int = 256
    alpha: float = DEFAULT_ALPHA
    scale: str = DEFAULT_SCALE
    colormap: str = DEFAULT_COLORMAP
    colormaps: str = "auto"
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.columns < 0:
            raise ValueError(f"columns must be >= 0 (0 = automatic), got {self.columns}")
        if self.panel_width < 1:
            raise ValueError(f"panel_width must be >= 1, got {self.panel_width}")
        if not 0.0 <= self.alpha <= 1.0:  # NaN fails this too
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        object.__setattr__(self, "lut", colormap(self.colormap, self.colormaps))


@dataclass(frozen=True)
class Caption:
    """The figure's header: what the image is and what made its maps."""

    name: str  # the file's name (or "image")
    bucket: tuple[int, int] | None = None
    export: Mapping[str, Any] = field(default_factory=dict)  # a manifest's `export` record
    note: str = ""  # where the maps come from, when that is not the engine itself

    def lines(self, style: Style) -> tuple[str, str]:
        e = self.export
        parts = [f"bucket {format_size(self.bucket)}"] if self.bucket else []
        if e:
            width = f" 1/{e['width_div']} width" if e.get("width_div", 1) != 1 else ""
            parts.append(
                f"{e.get('arch', '?')}{width}, config {e.get('config', '?')}, p={e.get('p', '?')}"
            )
            parts.append(f"weights {e.get('weights', '?')}")
        parts.append(f"scale {style.scale}, {style.colormap}, alpha {style.alpha:g}")
        if self.note:
            parts.append(self.note)
        return self.name, " | ".join(parts)


def normalize_heatmap(heatmap: np.ndarray, peak: float | None = None) -> np.ndarray:
    """float32 copy in [0, 1]: divided by `peak` (None: the map's own maximum), clipped.

    NaN and infinite values become 0, negative ones are clipped to 0, and a peak of 0 leaves the
    map all zero.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    h = np.maximum(np.where(np.isfinite(h), h, 0.0), 0.0)
    top = map_peak(h) if peak is None else peak
    h = np.minimum(h / top, 1.0) if top > 0 else np.zeros_like(h)
    return h.astype(np.float32)


def map_peak(heatmap: np.ndarray) -> float:
    """The largest finite value of a map (0 for an empty, all-NaN or non-positive one)."""
    h = np.asarray(heatmap, dtype=np.float64)
    finite = h[np.isfinite(h)]
    return max(0.0, float(finite.max())) if finite.size else 0.0


def scale_peaks(heatmaps: Mapping[str, np.ndarray], scale: str) -> dict[str, float]:
    """Each map's top-of-the-colormap value: its own maximum, or the largest of all (shared)."""
    own = {name: map_peak(h) for name, h in heatmaps.items()}
    if scale == "shared":
        top = max(own.values(), default=0.0)
        return dict.fromkeys(own, top)
    return own


def upsample_nearest(values: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row index, column index) arrays taking an h x w map to `size` = (W, H) pixels by nearest
    neighbour: pixel (y, x) shows cell (rows[y], cols[x]), so each cell is one block."""
    h, w = values.shape[:2]
    width, height = size
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return rows, cols


def overlay(
    photo: np.ndarray, heatmap: np.ndarray, style: Style, peak: float | None = None
) -> np.ndarray:
    """uint8 HxWx3: `heatmap` normalised by `peak`, coloured, upsampled to the photo's size by
    nearest neighbour (cell borders drawn where cells are >= CELL_LINES pixels) and blended over
    `photo` as ``(1 - alpha) * photo + alpha * colour``."""
    height, width = photo.shape[:2]
    index = np.rint(normalize_heatmap(heatmap, peak) * (len(style.lut) - 1)).astype(np.intp)
    rows, cols = upsample_nearest(index, (width, height))
    colours = style.lut[index[rows][:, cols]].astype(np.float32)
    h, w = index.shape
    if height / h >= CELL_LINES and width / w >= CELL_LINES:
        colours[1:][rows[1:] != rows[:-1]] = CELL_LINE_COLOUR
        colours[:, 1:][:, cols[1:] != cols[:-1]] = CELL_LINE_COLOUR
    blended = (1.0 - style.alpha) * photo.astype(np.float32) + style.alpha * colours
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
    bar = COLORBAR_HEIGHT + LABEL_HEIGHT + GAP if n_layers else 0
    height = HEADER_HEIGHT + r * (TITLE_HEIGHT + ph) + (r + 1) * GAP + bar
    return c * panel_width + (c + 1) * GAP, height


def panel_origin(k: int, columns: int, panel_width: int, panel_h: int) -> tuple[int, int]:
    """(x, y) of panel k's picture (below its title strip), per the layout above."""
    row, col = divmod(k, columns)
    x = GAP + col * (panel_width + GAP)
    y = HEADER_HEIGHT + GAP + row * (TITLE_HEIGHT + panel_h + GAP) + TITLE_HEIGHT
    return x, y


def render_heatmaps(
    pixels: np.ndarray,
    heatmaps: Mapping[str, np.ndarray],
    style: Style | None = None,
    caption: Caption | None = None,
) -> Image.Image:
    """One RGB image: a header, the picture, each layer's gamma-hat over it, and a colorbar.

    `pixels`: HxWx3 uint8 RGB (the image at its bucket size, as fed to the network).
    `heatmaps`: layer name -> 2-D map (any size, typically smaller than the image; non-negative).
    Panel 0 is the image; then one panel per layer in the mapping's order (see the module's
    docstring for what a panel shows and where everything lies; `output_size` gives the size).
    """
    pixels = _checked(pixels, heatmaps)
    height, width = pixels.shape[:2]
    style = style or Style()
    caption = caption or Caption("image", (width, height))
    c, r = grid_shape(1 + len(heatmaps), style.columns)
    ph = panel_height(width, height, style.panel_width)
    photo = _resized(pixels, (style.panel_width, ph))
    peaks = scale_peaks(heatmaps, style.scale)
    titles = [f"image {width}x{height}"]
    pictures = [photo]
    for name, heatmap in heatmaps.items():
        h, w = np.shape(heatmap)
        titles.append(f"{name}  {w}x{h} map  max {map_peak(heatmap):.3g}")
        pictures.append(overlay(photo, heatmap, style, peaks[name]))

    canvas = Image.new("RGB", output_size(width, height, len(heatmaps), c, style.panel_width))
    canvas.paste(BACKGROUND, (0, 0, *canvas.size))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    first, second = caption.lines(style)
    _text(draw, (GAP, 1), first, font, canvas.width - 2 * GAP, HEADER_HEIGHT // 2)
    _text(draw, (GAP, HEADER_HEIGHT // 2), second, font, canvas.width - 2 * GAP, HEADER_HEIGHT // 2)
    for k, (title, picture) in enumerate(zip(titles, pictures, strict=True)):
        x, y = panel_origin(k, c, style.panel_width, ph)
        canvas.paste(Image.fromarray(np.ascontiguousarray(picture)), (x, y))
        _text(draw, (x + 2, y - TITLE_HEIGHT), title, font, style.panel_width - 4, TITLE_HEIGHT)
    if heatmaps:
        top = HEADER_HEIGHT + r * (TITLE_HEIGHT + ph) + (r + 1) * GAP
        shared = max(peaks.values()) if style.scale == "shared" else None
        _colorbar(canvas, draw, font, top, style, shared)
    return canvas


def _checked(pixels: np.ndarray, heatmaps: Mapping[str, np.ndarray]) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels must be an HxWx3 uint8 RGB array, got shape {pixels.shape} {pixels.dtype}"
        )
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    for name, heatmap in heatmaps.items():
        shape = np.shape(heatmap)
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"heatmap {name!r} must be a non-empty 2-D array, got shape {shape}")
    return pixels


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (pixels.shape[1], pixels.shape[0]) == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def _colorbar(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: _Font,
    top: int,
    style: Style,
    shared: float | None,
) -> None:
    """The colormap from 0 (left) to the peak (right), with its labels below."""
    length = canvas.width - 2 * GAP
    index = np.rint(np.linspace(0, len(style.lut) - 1, length)).astype(np.intp)
    bar = np.broadcast_to(style.lut[index][None], (COLORBAR_HEIGHT, length, 3))
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (GAP, top))
    y = top + COLORBAR_HEIGHT
    if shared is None:
        right, middle = "1 = the panel's max", "gamma-hat / each panel's own max (scale layer)"
    else:
        right, middle = f"{shared:.3g}", "gamma-hat, one range for every panel (scale shared)"
    _text(draw, (GAP, y), "0", font, length, LABEL_HEIGHT)
    right_width = int(draw.textlength(right, font=font))
    _text(draw, (GAP + length - right_width, y), right, font, right_width, LABEL_HEIGHT)
    room = length - 2 * right_width - 8
    if room > 40:
        text = _fit(draw, middle, font, room)
        x = GAP + (length - int(draw.textlength(text, font=font))) // 2
        _text(draw, (x, y), text, font, room, LABEL_HEIGHT)


_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont


def _text(
    draw: ImageDraw.ImageDraw,
    at: tuple[int, int],
    text: str,
    font: _Font,
    width: int,
    height: int,
) -> None:
    """`text` shortened to `width`, vertically centred in a strip of `height` from `at`."""
    text = _fit(draw, text, font, width)
    top, bottom = draw.textbbox((0, 0), text or "x", font=font)[1::2]
    draw.text((at[0], at[1] + (height - (bottom - top)) // 2 - top), text, TEXT_COLOUR, font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: int) -> str:
    """`text`, shortened with "..." until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def chosen_layers(
    available: Sequence[str], layers: Sequence[str] | None, owner: str = "this engine"
) -> list[str]:
    """`layers` in order without repeats (None: all of `available`); ValueError for an empty
    list or a name not in `available` (the message says `owner` has which)."""
    chosen = list(available) if layers is None else list(dict.fromkeys(layers))
    if not chosen:
        raise ValueError(f"no layers asked for; {owner} has {', '.join(available)}")
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise ValueError(
            f"unknown layer{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"{owner} has {', '.join(available)}"
        )
    return chosen


def check_heatmap_engine(extractor: Extractor) -> None:
    """ValueError (with the export command to fix it) when the engine has no heatmaps."""
    manifest = extractor.manifest
    if not manifest.data.get("heatmaps"):
        raise ValueError(
            f"engine {manifest.directory} was exported without heatmaps; re-export it into a new "
            f"directory with `interactive export --heatmaps`{_reexport_hint(extractor)}"
        )


def engine_figure(
    extractor: Extractor, image: ImageSource, layers: Sequence[str], style: Style, name: str
) -> Image.Image:
    """The figure of one image run through a heatmaps engine (`layers` already checked)."""
    features = extractor.extract([image])
    if 0 in features.errors:
        raise ValueError(features.errors[0])
    prepared = extractor.prepare(image)
    maps: dict[str, np.ndarray] = {}
    for t in layers:
        heatmap = features.heatmaps.get(t, [None])[0]
        if heatmap is None:  # not expected from a heatmaps engine; say so rather than crash
            raise ValueError(
                f"engine {extractor.manifest.directory} returned no heatmap for layer {t}"
            )
        maps[t] = heatmap
    caption = Caption(name, prepared.bucket, extractor.manifest.data.get("export", {}))
    return render_heatmaps(prepared.pixels, maps, style, caption)


def render_file(
    extractor: Extractor,
    image: ImageSource,
    layers: Sequence[str] | None,
    out: str | os.PathLike[str],
    style: Style | None = None,
) -> Path:
    """Run `extractor` on `image` and save its heatmaps over it as a PNG at `out`; returns `out`.

    `layers`: which layers to show, in that order (None: all of the engine's). Raises ValueError
    when the engine was exported without heatmaps, when a layer is unknown or `layers` is empty,
    and when the image cannot be processed (the message is the extractor's error for it). The
    PNG is written under a temporary name in `out`'s directory and then renamed, so `out` is never
    left half-written.
    """
    check_heatmap_engine(extractor)
    chosen = chosen_layers(list(extractor.layers), layers)
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
    figure = engine_figure(extractor, image, chosen, style or Style(), display_name(name))
    return save_png(figure, out)


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


# ------------------------------------------------------------------------------------------------
# Batch mode: the rows of an index OUTDIR


@dataclass
class IndexRow:
    """One ok row of an index: its position among the ok rows (shard order), id, path and
    bucket, and its stored heatmaps (empty when the index was made without --heatmaps)."""

    row: int
    id: str | None
    path: str  # what opens the file (path_bytes decoded where the name is not UTF-8)
    shown: str  # the `path` column, for messages
    bucket: tuple[int, int]
    maps: dict[str, np.ndarray]


@dataclass
class BatchReport:
    rows: int = 0
    written: int = 0
    failed: list[str] = field(default_factory=list)
    source: str = ""  # "index heatmap columns" or "engine DIR"


def png_name(row: IndexRow) -> str:
    """`NNNNN-ID-STEM.png`: the row's position, its `id` (the index's key) and, for people, the
    file's stem reduced to [A-Za-z0-9._-] and 40 characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(row.shown).stem)[:40].strip("._") or "image"
    return f"{row.row:05d}-{row.id or 'row'}-{stem}.png"


HEATMAP_COLUMN = re.compile(r"(.+)\.heatmap")


def index_heatmap_layers(outdir: str | os.PathLike[str]) -> list[str]:
    """The layers whose `<layer>.heatmap` column the index has (in column order)."""
    from .parquet import parquet_file
    from .vectors import feature_files

    with open(feature_files(outdir)[0], "rb") as f:
        names = parquet_file(f).schema_arrow.names
    return [m.group(1) for n in names if (m := HEATMAP_COLUMN.fullmatch(n))]


def index_rows(
    outdir: str | os.PathLike[str], layers: Sequence[str], limit: int | None = None
) -> Iterator[IndexRow]:
    """The ok rows of an index OUTDIR in shard order (the first `limit`), one shard in memory at
    a time, with the heatmap columns of `layers` (those the index has)."""
    from .parquet import parquet_file
    from .vectors import feature_files

    n = 0
    for part in feature_files(outdir):
        with open(part, "rb") as f:
            reader = parquet_file(f)
            names = reader.schema_arrow.names
            wanted = ["path", "path_bytes", "bucket", *(c for c in ("id",) if c in names)]
            maps = [t for t in layers if f"{t}.heatmap" in names]
            table = reader.read(columns=wanted + [f"{t}.heatmap" for t in maps], use_threads=False)
        for i in range(table.num_rows):
            if limit is not None and n >= limit:
                return
            raw = table["path_bytes"][i].as_py()
            shown = table["path"][i].as_py()
            yield IndexRow(
                row=n,
                id=table["id"][i].as_py() if "id" in names else None,
                path=os.fsdecode(raw) if raw is not None else shown,
                shown=shown,
                bucket=parse_size(table["bucket"][i].as_py()),
                maps={
                    t: np.asarray(table[f"{t}.heatmap"][i].as_py(), dtype=np.float32) for t in maps
                },
            )
            n += 1


def index_row_count(outdir: str | os.PathLike[str]) -> int:
    """The ok rows of an index (from the shards' footers, no data read)."""
    from .parquet import row_count
    from .vectors import feature_files

    return sum(row_count(part) for part in feature_files(outdir))


def index_run(outdir: str | os.PathLike[str]) -> dict[str, Any]:
    """The index's _manifest.json (what made it), or {} when it has none or it is unreadable."""
    import json

    from .index import RUN_MANIFEST

    try:
        data = json.loads((Path(outdir) / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


INDEX_NOTE = "maps from the index (block-averaged to <= 32 cells a side)"


def _fixed_bucket(bucket: tuple[int, int]) -> Callable[[int, int], tuple[int, int]]:
    """A bucket function giving `bucket` whatever the size (the row's recorded bucket)."""
    return lambda width, height: bucket


def render_index(
    outdir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    style: Style | None = None,
    *,
    layers: Sequence[str] | None = None,
    limit: int | None = None,
    extractor: Extractor | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> BatchReport:
    """One PNG per ok row of the index OUTDIR into directory `out` (created), named `png_name`.

    The maps come from `extractor` (a heatmaps engine: each row's image is run again, full
    resolution) when one is given, else from the index's `<layer>.heatmap` columns (made with
    `index --heatmaps`, block-averaged to <= 32 px); ValueError when there is neither. The
    photo is read again from the row's path and resized to the row's bucket as the index did. A
    row whose image cannot be read is reported in `failed` and skipped; each PNG is written
    atomically; `say` gets a progress line every 2 s.
    """
    from .images import ImageError, prepare_image

    style = style or Style()
    stored = index_heatmap_layers(outdir)
    export = index_run(outdir).get("engine", {}).get("export", {}) or {}
    report = BatchReport()
    if extractor is not None:
        check_heatmap_engine(extractor)
        chosen = chosen_layers(list(extractor.layers), layers)
        report.source = f"engine {extractor.manifest.directory}"
        stored = []
    elif stored:
        chosen = chosen_layers(stored, layers, f"{outdir} (heatmap columns)")
        report.source = "the index's heatmap columns"
    else:
        raise ValueError(
            f"{outdir} was indexed without --heatmaps; name a heatmaps engine (--engine) to "
            "compute the maps again"
        )
    total = index_row_count(outdir)
    total = total if limit is None else min(total, limit)
    say(f"viz: {total} rows of {outdir}, maps from {report.source}")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    last = time.monotonic()
    for row in index_rows(outdir, chosen if stored else [], limit):
        report.rows += 1
        name = display_name(Path(row.shown).name)
        try:
            if stored:
                pixels = prepare_image(row.path, _fixed_bucket(row.bucket)).pixels
                caption = Caption(name, row.bucket, export, INDEX_NOTE)
                figure = render_heatmaps(pixels, row.maps, style, caption)
            else:
                assert extractor is not None
                figure = engine_figure(extractor, row.path, chosen, style, name)
        except (ImageError, ValueError) as err:
            report.failed.append(f"row {row.row} ({row.shown}): {err}")
            say(f"viz: failed: row {row.row}: {err}")
            continue
        save_png(figure, target / png_name(row))
        report.written += 1
        if time.monotonic() - last >= 2.0:
            last = time.monotonic()
            say(
                f"viz: {report.rows}/{total} rows, {report.written} written, "
                f"{len(report.failed)} failed"
            )
    return report
