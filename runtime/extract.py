"""`interactive extract` as a function: images -> one Parquet file, with a summary.

The CLI's `extract` command and `make run` (interactive.export.quickstart) both call it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .api import Extractor
from .buckets import format_size
from .parquet import features_table, write_table


@dataclass
class ExtractSummary:
    """What an extraction did: counts, time, buckets, the output, each failure's reason."""

    images: int
    seconds: float
    output: Path
    weights: str
    by_bucket: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        n, failed = self.images, len(self.errors)
        rate = n / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{n - failed}/{n} images in {self.seconds:.1f} s ({rate:.2f} images/s), "
            f"{failed} failed; buckets: {self.by_bucket}; wrote {self.output}"
        )


def extract_to_parquet(
    engine: str | os.PathLike[str],
    images: list[str],
    output: str | os.PathLike[str],
    *,
    backend: str = "auto",
    batch_size: int = 8,
    threads: int = 0,
) -> ExtractSummary:
    """Features of `images` into the Parquet file `output` (one row per image, `status` saying
    `ok` or why not); the file's metadata records the engine, its weights and its manifest."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    extractor = Extractor.open(engine, backend=backend, threads=threads)
    started = time.perf_counter()
    features = extractor.extract(images, batch_size=batch_size)
    seconds = time.perf_counter() - started
    data = extractor.manifest.data
    metadata = {
        "interactive.engine": str(engine),
        "interactive.weights": data["weights"]["source"],
        "interactive.manifest": json.dumps(
            {k: v for k, v in data.items() if k not in ("weights", "buckets")}
        ),
    }
    path = write_table(features_table(images, features, metadata), output)
    return ExtractSummary(
        images=len(images),
        seconds=seconds,
        output=path,
        weights=data["weights"]["source"],
        by_bucket=dict(Counter(format_size(b) for b in features.buckets if b)),
        errors=[reason for _, reason in sorted(features.errors.items())],
    )
