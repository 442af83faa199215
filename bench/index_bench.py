"""`interactive index` throughput and memory, in one run on one machine:

1. decode + resize alone: images/s of one process on typical photos (what a GPU engine will need
   from the host, and so how many worker processes it takes);
2. the engine alone on pre-decoded same-bucket batches vs `interactive index` end to end (files
   on disk -> Parquet), same engine, same images: the ratio is what the pipeline costs;
3. peak RSS of the index job (largest process) on a collection and on one ten times larger.

    python bench/index_bench.py --engine engines/vgg16-last-p2-random0 [--images 24]

The collection is generated from the photos in tests/data (crops at typical photo sizes in the
`common` aspect ratios). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from PIL import Image

from interactive.bench.harness import DATA, save_crop

SIZES = [(1600, 1200), (1400, 1400), (1024, 768)]  # two buckets: 576x448 and 512x512


def make_collection(root: Path, n: int) -> list[Path]:
    photos = [Image.open(p).convert("RGB") for p in sorted(DATA.glob("*.jpg"))]
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = root / f"photo{i:05d}.jpg"
        save_crop(photos[i % len(photos)], (w, h), path)
        files.append(path)
    return files


def decode_rate(engine: Path, files: list[Path]) -> float:
    from interactive.runtime.index import prepare_or_error
    from interactive.runtime.manifest import EngineManifest

    manifest = EngineManifest.load(engine)
    start = time.perf_counter()
    for f in files:
        prepare_or_error(str(f), manifest)
    return len(files) / (time.perf_counter() - start)


def engine_alone_rate(engine: Path, files: list[Path], batch_size: int) -> float:
    from interactive.runtime import Extractor
    from interactive.runtime.batching import batches_by_bucket

    ex = Extractor.open(engine)
    prepared = [(i, ex.prepare(str(f))) for i, f in enumerate(files)]
    batches = list(batches_by_bucket(prepared, batch_size))
    for batch in batches:  # warm-up: open every session once, not timed
        ex.backend.run(batch.bucket, batch.pixels[:1])
    start = time.perf_counter()
    for batch in batches:
        ex.backend.run(batch.bucket, batch.pixels)
    return len(files) / (time.perf_counter() - start)


# Runs a command and prints the peak RSS (KiB) of the largest process it waited for: a fresh
# figure per job, which the benchmark's own RUSAGE_CHILDREN (a running maximum) cannot give.
PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def index_run(engine: Path, source: Path, out: Path, batch_size: int, workers: int) -> dict:
    """The CLI in a child process; its speed excludes start-up and session opening."""
    command = [sys.executable, "-m", "interactive.runtime.cli", "index", str(source)]
    command += ["--engine", str(engine), "-o", str(out), "--batch-size", str(batch_size)]
    command += ["--workers", str(workers), "--no-progress", "--shard-size", "100000"]
    start = time.perf_counter()
    printed = subprocess.check_output([sys.executable, "-c", PEAK_RSS, *command], text=True)
    wall = time.perf_counter() - start
    code, peak_kib = map(int, printed.split())
    if code not in (0, 3):
        raise RuntimeError(f"index exited with {code}")
    manifest = json.loads((out / "_manifest.json").read_text())["result"]
    return {
        "images": manifest["images"],
        "seconds": manifest["seconds"],
        "wall_seconds": wall,
        "images_per_second": manifest["images"] / manifest["seconds"],
        "peak_rss_mb": peak_kib / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", type=Path, default=Path("engines/vgg16-last-p2-random0"))
    parser.add_argument("--images", type=int, default=24, help="collection for the speed runs")
    parser.add_argument("--rss-engine", type=Path, help="a fast (narrow) engine for the RSS runs")
    parser.add_argument("--rss-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="index-bench-"))
    files = make_collection(tmp / "photos", args.images)
    result = {
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
        "decode_images_per_second_per_process": decode_rate(args.engine, files),
        "engine_alone_images_per_second": engine_alone_rate(args.engine, files, args.batch_size),
        "index": index_run(args.engine, tmp / "photos", tmp / "out", args.batch_size, args.workers),
    }
    if args.rss_engine:
        rss = {}
        for n in (args.rss_images, 10 * args.rss_images):
            make_collection(tmp / f"rss{n}", n)
            run = index_run(args.rss_engine, tmp / f"rss{n}", tmp / f"rss-out{n}", 16, 1)
            rss[n] = run
        result["rss"] = rss
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(markdown(result, args))


def markdown(r: dict, args: argparse.Namespace) -> str:
    ratio = r["index"]["images_per_second"] / r["engine_alone_images_per_second"]
    lines = [
        f"## interactive index, {r['date']}",
        "",
        f"Command: `{r['command']}` ({os.cpu_count()} cores; engine {args.engine}; "
        f"{args.images} generated JPEGs of 1024x768 to 1600x1200 from tests/data, two "
        f"buckets; batch {args.batch_size}; {args.workers} decoding worker(s)).",
        "",
        "| measure | images/s |",
        "|---|---|",
        f"| decode + resize alone, one process | {r['decode_images_per_second_per_process']:.1f} |",
        f"| engine alone, pre-decoded batches | {r['engine_alone_images_per_second']:.3f} |",
        f"| `interactive index` end to end | {r['index']['images_per_second']:.3f} |",
        "",
        f"Pipeline ratio (index / engine alone): {ratio:.2f}.",
    ]
    if "rss" in r:
        rows = ", ".join(f"{n} images: {run['peak_rss_mb']:.0f} MB" for n, run in r["rss"].items())
        lines += ["", f"Peak RSS of the largest process of the job ({args.rss_engine}): {rows}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
