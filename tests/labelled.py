"""A small labelled collection: one folder per class, classes that differ by colour and texture.

Each class has its own texture (stripes, checks, fine noise, rings) and its own colour range,
jittered per image (colour, period, phase, orientation, noise), so the classes are separable by
features of a network with random weights while no two images are alike. Images are JPEGs at
the narrow test engine's bucket sizes (tests/conftest.py NARROW_BUCKETS), so none is resampled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from imagegen import photo_like

JITTER = 60  # colour jitter per channel: the classes' colour ranges overlap
CLUTTER = 0.4  # the share of a random smooth background in every image
Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _stripes(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-0.4, 0.4)
    period = rng.uniform(10, 18)
    t = y * np.cos(angle) + x * np.sin(angle)
    return 0.5 + 0.5 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))


def _checks(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = rng.integers(20, 36)
    dy, dx = rng.integers(0, cell, size=2)
    return (((y + dy) // cell + (x + dx) // cell) % 2).astype(np.float64)


def _noise(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, size=np.broadcast(y, x).shape)


def _rings(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.3, 0.7, size=2) * np.array([y.shape[0], x.shape[1]])
    period = rng.uniform(14, 24)
    return 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(y - cy, x - cx) / period)


# class name -> (texture, RGB of the dark end, RGB of the light end)
CLASSES: dict[str, tuple[Texture, tuple[int, int, int], tuple[int, int, int]]] = {
    "stripes": (_stripes, (120, 20, 10), (250, 170, 90)),
    "checks": (_checks, (10, 30, 110), (120, 170, 250)),
    "noise": (_noise, (20, 90, 20), (150, 230, 120)),
    "rings": (_rings, (60, 60, 60), (210, 210, 200)),
}


def labelled_image(label: str, width: int, height: int, seed: int) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`."""
    texture, dark, light = CLASSES[label]
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    t = texture(y, x, rng)[..., None]
    dark_end, light_end = np.asarray(dark, np.float64), np.asarray(light, np.float64)
    contrast = rng.uniform(0.3, 1.0)
    mid = (dark_end + light_end) / 2 + rng.uniform(-JITTER, JITTER, size=3)
    pixels = mid + (t - 0.5) * contrast * (light_end - dark_end)
    # a smooth random background mixed in: clutter that the classes share
    pixels = (1 - CLUTTER) * pixels + CLUTTER * photo_like(width, height, seed)
    pixels += rng.normal(0, 8, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def labelled_collection(
    root: Path,
    per_class: int = 15,
    classes: tuple[str, ...] = tuple(CLASSES),
    sizes: tuple[tuple[int, int], ...] = ((256, 256),),
) -> dict[Path, str]:
    """Write `per_class` JPEGs per class into root/<class>/ (sizes taken in turn); returns
    path -> class."""
    written: dict[Path, str] = {}
    for c, label in enumerate(classes):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            pixels = labelled_image(label, width, height, seed=1000 * c + i)
            path = folder / f"{label}-{i:02d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            written[path] = label
    return written
