"""`interactive extract` as a function: images -> one Parquet file, streamed, with a summary.

The CLI's `extract` command and `make run` (export/quickstart.py) both call it. Rows
are written as their batches finish (a ParquetWriter into the atomic temporary, renamed when
whole), so memory holds one partial batch per bucket, never the whole output; they come in the
order batches finish, not in the order of `images` (join on `path`).
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .api import Extractor
from .atomic import atomic_path, temporary_name
from .buckets import format_size
from .manifest import package_version
from .parquet import features_table, output_metadata
from .paths import display_name

# Bytes per row besides the features (path, sizes, bucket, status, Parquet overhead): a rough
# allowance for the free-space check, which only needs the order of magnitude.
ROW_OVERHEAD = 512
# -o DIR (an existing directory, a name ending with a separator, or a name without a suffix)
# writes DIR/EXTRACT_FILE.
EXTRACT_FILE = "features.parquet"


class OutputError(ValueError):
    """`-o` cannot be written (missing permission, read-only or full filesystem...), found before
    any image is read."""


class OutputNameError(ValueError):
    """`-o` names a file that is not .parquet (bad usage: extract writes Parquet only)."""


def extract_output(output: str | os.PathLike[str]) -> Path:
    """The file `-o output` means: output itself if it ends with .parquet; DIR/features.parquet
    for a directory (one that exists, a name ending with a separator, or a name without a
    suffix); OutputNameError for any other suffix (`-o out.csv` is refused, not written as
    Parquet)."""
    text = os.fspath(output)
    target = Path(text)
    if target.is_dir() or text.endswith(("/", os.sep)) or not target.suffix:
        return target / EXTRACT_FILE
    if target.suffix.lower() != ".parquet":
        raise OutputNameError(
            f"-o {display_name(text)}: extract writes Parquet only; give a .parquet file name or "
            "a directory (then DIR/features.parquet)"
        )
    return target


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
        rate = f"{n / self.seconds:.2f} images/s" if n and self.seconds > 0 else "no images"
        return (
            f"{n - failed}/{n} images in {self.seconds:.1f} s ({rate}), "
            f"{failed} failed; buckets: {self.by_bucket}; wrote {display_name(str(self.output))}"
        )


def extract_to_parquet(
    engine: str | os.PathLike[str],
    images: Sequence[str],
    output: str | os.PathLike[str],
    *,
    backend: str = "auto",
    batch_size: int = 8,
    threads: int = 0,
    progress: bool | None = None,
) -> ExtractSummary:
    """Features of `images` into the Parquet file `output` (or output/features.parquet, see
    `extract_output`): one row per image, `status` saying `ok` or why not; the file metadata is
    `output_metadata`'s (engine, weights, manifest, run). `progress`: a bar on stderr (None: on
    a terminal; plain lines every 10 s otherwise)."""
    from .index_local import LiveProgress

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    target = extract_output(output)
    extractor = Extractor.open(engine, backend=backend, threads=threads)
    row_bytes = 4 * sum(extractor.manifest.layer_dims.values()) + ROW_OVERHEAD
    check_output(target, len(images) * row_bytes)
    run = {
        "command": "extract",
        "images": len(images),
        "options": {"backend": backend, "batch_size": batch_size, "threads": threads},
        "package_version": package_version(),
    }
    metadata = output_metadata(extractor.manifest, run)
    schema = features_table([], extractor._empty(0)).schema.with_metadata(metadata)
    started = time.perf_counter()
    buckets: Counter = Counter()
    errors: list[tuple[int, str]] = []
    bar = LiveProgress(progress, lambda: len(images), label="extract")
    try:
        # An open file, not the name: pyarrow refuses a name that is not valid UTF-8.
        with atomic_path(target) as tmp, open(tmp, "wb") as f, pq.ParquetWriter(f, schema) as w:
            items = bar.track((i, extractor.try_prepare(p)) for i, p in enumerate(images))
            for positions, chunk in extractor.iter_prepared(items, batch_size):
                w.write_table(features_table([images[i] for i in positions], chunk))
                buckets.update(format_size(b) for b in chunk.buckets if b)
                errors += [(positions[j], reason) for j, reason in chunk.errors.items()]
    finally:
        bar.close()
        extractor.close()
    source = str(extractor.manifest.data["weights"]["source"])
    return ExtractSummary(
        images=len(images),
        seconds=time.perf_counter() - started,
        output=target,
        weights=source,
        by_bucket=dict(buckets.most_common()),
        errors=[reason for _, reason in sorted(errors)],
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
