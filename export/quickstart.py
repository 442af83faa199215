"""`make run`: export the default engine for the buckets SOURCE needs, extract, summarise.

    python -m interactive_features.export.quickstart SOURCE [--out OUT] [--engine DIR]
        [--weights imagenet|PATH|random:SEED] [--width-div 1] [--area 512]

`--weights random:0 --width-div 8 --area 256` is a smoke run of the narrow test network (seconds,
`make run QUICKSTART_ARGS=...`). Exit codes as `interactive extract`: 3 when some images failed.

Tries torchvision's ImageNet weights first; where they cannot be fetched (offline), falls back to
`random:0` weights into a separate engine directory and says so loudly at start, at the end and in
the Parquet file's metadata (`interactive.weights`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interactive_features.runtime.buckets import bucket_for, format_size
from interactive_features.runtime.extract import extract_to_parquet
from interactive_features.runtime.images import ImageError, image_size
from interactive_features.runtime.index_sources import IMAGE_SUFFIXES, iter_sources
from interactive_features.runtime.settings import ExportSettings

from .exporter import ExportRequest, export_engine

BANNER = "!" * 78


def image_files(source: Path) -> list[Path]:
    """SOURCE itself if it is an image file, else the images of the tree in `index` order."""
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"SOURCE {str(source)!r} is neither an image nor a directory")
    files = [Path(p) for p in iter_sources(source)]
    if not files:
        raise FileNotFoundError(
            f"SOURCE {str(source)!r} holds no images ({sorted(IMAGE_SUFFIXES)})"
        )
    return files


def needed_buckets(files: list[Path], area_side: int = 512) -> list[tuple[int, int]]:
    """The buckets of the readable images (headers only); unreadable ones are reported later."""
    buckets = set()
    for f in files:
        try:
            buckets.add(bucket_for(*image_size(f), area=area_side * area_side))
        except ImageError:
            continue
    return sorted(buckets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interactive_features.export.quickstart")
    parser.add_argument("source", type=Path, help="an image or a directory of images")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where features.parquet goes")
    parser.add_argument("--engine", type=Path, help="engine directory (default under engines/)")
    parser.add_argument(
        "--weights", default="imagenet",
        help="imagenet (random:0 where it cannot be downloaded), a .pth file or random:SEED",
    )  # fmt: skip
    parser.add_argument("--width-div", type=int, default=1, help="8: the narrow test network")
    parser.add_argument("--area", type=int, default=512, help="bucket area as a square's side")
    args = parser.parse_args(argv)
    files = image_files(args.source)
    shape = {"width_div": args.width_div, "area": args.area}
    buckets = needed_buckets(files, args.area)
    print(f"{len(files)} images in {args.source}, buckets {[format_size(b) for b in buckets]}")
    weights = args.weights
    default = "engines/vgg16-last-p2" if weights == "imagenet" else "engines/quickstart"
    engine = args.engine or Path(default)
    try:
        export_engine(_request(engine, weights, buckets, **shape), log=_err)
    except RuntimeError as err:
        if weights != "imagenet" or "could not download" not in str(err):
            raise
        weights, engine = "random:0", args.engine or Path("engines/vgg16-last-p2-random0")
        _shout(
            f"ImageNet weights unavailable ({str(err).split(' (')[0]}).\n"
            f"Using RANDOM weights (random:0) into {engine}: the features are only a smoke run."
        )
        export_engine(_request(engine, weights, buckets, **shape), log=_err)
    summary = extract_to_parquet(engine, [str(f) for f in files], args.out / "features.parquet")
    print(summary.line())
    for reason in summary.errors:
        print(f"  failed: {reason}", file=sys.stderr)
    if weights.startswith("random:"):
        _shout(f"These features came from RANDOM weights ({weights}), not ImageNet ones.")
    print(f"features: {summary.output} (engine {engine}, weights {weights})")
    return 3 if summary.errors else 0


def _request(
    engine: Path, weights: str, buckets: list[tuple[int, int]], **shape: int
) -> ExportRequest:
    settings = ExportSettings(weights=weights, **shape)
    listed = ",".join(format_size(b) for b in buckets)
    if not listed:  # no readable image: the square bucket of the area
        listed = f"{settings.area}x{settings.area}"
    return ExportRequest(out=engine, settings=settings, buckets=listed)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _shout(text: str) -> None:
    print(f"{BANNER}\n{text}\n{BANNER}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
