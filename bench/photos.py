"""Seeded synthetic photos: the e2e mode's input files, and collections for `interactive index`.

Nothing is read from disk (a wheel install has no test data): each image is a smooth colour field
(bicubic upsampling of a coarse random grid) with fine grain on top, so that JPEG stores and
decodes it at about the cost of a photo, not of a flat or a white-noise image.

    python -m interactive_features.bench.photos DIR [--images 100] [--seed 0]

writes DIR/photo00000.jpg... at COLLECTION_SIZES in turn (two `common` buckets: 576x448 and
512x512), the collection the index and Ray measurements of bench/RESULTS.md use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLLECTION_SIZES = ((1600, 1200), (1400, 1400), (1024, 768))
GRID = 24  # pixels per cell of the coarse colour grid
GRAIN = 6.0  # standard deviation of the fine grain, in 8-bit levels


def photo(width: int, height: int, seed: int) -> Image.Image:
    """One synthetic RGB photo of `width` x `height`, the same for the same seed."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (height // GRID + 2, width // GRID + 2, 3), dtype=np.uint8)
    smooth = Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0.0, GRAIN, (height, width, 1))
    pixels = np.clip(np.asarray(smooth, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_photos(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """JPEGs root/photo00000.jpg... (quality 90), one per entry of `sizes`, seeds seed, seed+1..."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = root / f"photo{i:05d}.jpg"
        photo(width, height, seed + i).save(path, quality=90)
        paths.append(path)
    return paths


def bucket_inputs(
    root: Path, buckets: list[list[int]], count: int, seed: int
) -> dict[str, list[str]]:
    """The e2e mode's files, per bucket ("WxH" -> paths): `count` photos of the bucket's aspect
    ratio at 1.5x its size, so that decoding resizes them as it would real photos."""
    from interactive_features.runtime.buckets import format_size

    files = {}
    for width, height in buckets:
        key = format_size((width, height))
        size = (int(width * 1.5), int(height * 1.5))
        files[key] = [str(p) for p in write_photos(root / key, [size] * count, seed)]
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m interactive_features.bench.photos", description=__doc__
    )
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = [COLLECTION_SIZES[i % len(COLLECTION_SIZES)] for i in range(args.images)]
    paths = write_photos(args.out, sizes, args.seed)
    print(f"wrote {len(paths)} photos to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
