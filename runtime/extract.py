"""`interactive extract` as a function: images -> one Parquet file, with a summary.

The CLI's `extract` command and `make run` (interactive.export.quickstart) both call it.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .api import Extractor
from .atomic import temporary_name
from .buckets import format_size
from .parquet import features_table, write_table
from .paths import display_name

# Bytes per row besides the features (path, sizes, bucket, status, Parquet overhead): a rough
# allowance for the free-space check, which only needs the order of magnitude.
ROW_OVERHEAD = 512


class OutputError(ValueError):
    """`-o` cannot be written (missing permission, read-only or full filesystem...), found before
    any image is read."""


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
    row_bytes = 4 * sum(extractor.manifest.layer_dims.values()) + ROW_OVERHEAD
    check_output(output, len(images) * row_bytes)
    started = time.perf_counter()
    features = extractor.extract(images, batch_size=batch_size)
    seconds = time.perf_counter() - started
    data = extractor.manifest.data
    metadata = {
        "interactive.engine": display_name(os.fspath(engine)),
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


def check_output(output: str | os.PathLike[str], needed_bytes: int = 0) -> Path:
    """Raise OutputError unless the file `output` can be written, before the work it would hold.

    Its directory is created if missing, a temporary file is written there, synced and removed
    (a read-only, full or forbidden location fails here), and the filesystem must have about
    `needed_bytes` free. Nothing is left behind.
    """
    target = Path(output)
    shown = display_name(os.fspath(target))
    if target.is_dir():
        raise OutputError(f"cannot write -o {shown}: is a directory (give a .parquet file name)")
    probe, created = temporary_name(target), False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            created = True
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = _free_bytes(target.parent)
    except OSError as err:
        reason = err.strerror or str(err)
        failed = os.fspath(err.filename) if err.filename else None
        if isinstance(err, FileExistsError) and failed:  # mkdir: a file on the way
            reason = f"{display_name(failed)} is not a directory"
        elif failed and Path(failed) not in (probe, target):  # a directory on the way
            reason += f" ({display_name(failed)})"
        raise OutputError(f"cannot write -o {shown}: {reason}") from None
    finally:
        if created:
            probe.unlink(missing_ok=True)
    if free is not None and free < needed_bytes:
        raise OutputError(
            f"cannot write -o {shown}: {os.strerror(errno.ENOSPC)} (the output needs about "
            f"{_mib(needed_bytes)}, {_mib(free)} free in {display_name(os.fspath(target.parent))})"
        )
    return target


def _free_bytes(directory: Path) -> int | None:
    try:
        info = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows): the probe file must do
        return None
    return info.f_bavail * info.f_frsize


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
