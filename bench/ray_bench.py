"""`interactive index --ray` beside the local job: images/s on one machine, same run.

Both jobs index the same generated collection with the same engine and options, alternately in
this process (`--repeats` runs of each, the best kept): the local job (`run_index`, `--workers`
decoding processes) and the Ray job (`run_ray_index` on a local Ray instance started here,
`--actors` extraction actors plus Ray Data's decoding tasks). Ray's start-up (`ray.init`) is
timed apart; the Ray job's time includes starting its actors and opening the engine in them, as
the local job's includes opening it.

    python bench/ray_bench.py --engine engines/vgg16-narrow8-random0 --images 100 --repeats 2

Prints a Markdown section for bench/RESULTS.md (and the raw numbers as JSON on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq

from interactive.bench.index_bench import make_collection
from interactive.runtime.index import IndexOptions, IndexReport, run_index
from interactive.runtime.ray_index import ray_module, run_ray_index


def summary(report: IndexReport) -> dict:
    return {
        "images": report.images,
        "errors": report.errors,
        "seconds": report.seconds,
        "images_per_second": report.images_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", type=Path, default=Path("engines/vgg16-narrow8-random0"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="local job: decoding processes")
    parser.add_argument("--actors", type=int, default=1, help="Ray job: extraction actors")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each job; best kept")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    make_collection(tmp / "photos", args.images)
    options = IndexOptions(batch_size=args.batch_size, shard_size=args.shard_size)

    ray = ray_module()
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False
    local, on_ray = [], []
    source, quiet = tmp / "photos", {"progress": False}
    try:  # alternated, so that a busy spell on a shared machine hits both jobs alike
        for r in range(args.repeats):
            out = tmp / f"local{r}"
            local.append(
                run_index(source, args.engine, out, options, workers=args.workers, **quiet)
            )
            out = tmp / f"ray{r}"
            on_ray.append(
                run_ray_index(source, args.engine, out, options, actors=args.actors, **quiet)
            )
    finally:
        ray.shutdown()
    same_rows = pq.read_table(tmp / "ray0")["id"].equals(pq.read_table(tmp / "local0")["id"])
    result = {
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "ray_version": ray.__version__,
        "local": summary(max(local, key=lambda r: r.images_per_second)),
        "ray": summary(max(on_ray, key=lambda r: r.images_per_second)),
        "local_images_per_second": [r.images_per_second for r in local],
        "ray_images_per_second": [r.images_per_second for r in on_ray],
        "ray_init_seconds": ray_start,
        "same_ids_in_same_order": same_rows,
    }
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(markdown(result, args))


def markdown(r: dict, args: argparse.Namespace) -> str:
    ratio = r["ray"]["images_per_second"] / r["local"]["images_per_second"]
    return "\n".join(
        [
            f"## interactive index on Ray, {r['date']}",
            "",
            f"Command: `python bench/{r['command']}` ({r['cores']} cores, Ray {r['ray_version']}; "
            f"engine {args.engine}; {args.images} generated JPEGs of 1024x768 to 1600x1200 from "
            f"tests/data, two buckets; batch {args.batch_size}, shards of {args.shard_size}).",
            "",
            f"Best of {args.repeats} runs of each job, alternated (local, Ray, local, Ray...):",
            "",
            "| job | images | seconds | images/s |",
            "|---|---|---|---|",
            f"| local, {args.workers} decoding worker(s) | {r['local']['images']} | "
            f"{r['local']['seconds']:.1f} | {r['local']['images_per_second']:.1f} |",
            f"| Ray, local instance, {args.actors} actor(s) | {r['ray']['images']} | "
            f"{r['ray']['seconds']:.1f} | {r['ray']['images_per_second']:.1f} |",
            "",
            f"Ratio (Ray / local): {ratio:.2f}. Starting the local Ray instance (`ray.init`) took "
            f"a further {r['ray_init_seconds']:.1f} s, not counted above. Same ids in the same "
            f"order in both outputs: {r['same_ids_in_same_order']}.",
        ]
    )


if __name__ == "__main__":
    main()
