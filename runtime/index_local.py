"""The local executor of `interactive index`: decoding processes on this machine, one engine.

Decoding and resizing run in worker processes that feed a bucket-aware batcher
(`Extractor.extract_prepared`); a bounded window of images in flight keeps memory flat whatever
the collection size. The job (runtime/index.py) plans, resumes and writes; the shards come
planned, with their inputs' ids.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from .api import Extractor
from .backends import backend_status
from .images import PreparedImage
from .index import Executor, Progress, Results, Shard, ShardWork, prepare_input, shard_rows
from .inputs import Where
from .manifest import EngineError, EngineManifest


class LocalExecutor(Executor):
    """`workers` decoding processes (0: decode in this process) feeding one `backend`."""

    def __init__(self, workers: int = 1, backend: str = "auto") -> None:
        self.workers, self.backend = workers, backend

    def progress(self, enabled: bool | None, count: Callable[[], int]) -> Progress:
        return LiveProgress(enabled, count)

    def check(self, manifest: EngineManifest) -> None:
        """The backend runs here (`auto` always does: it falls back to ONNX Runtime's CPU)."""
        if self.backend == "auto":
            return
        reason = backend_status(self.backend, manifest)
        if reason is not None:
            raise EngineError(f"backend {self.backend!r} cannot run here: {reason}")

    def run(self, work: ShardWork, shards: Iterable[Shard]) -> Results:
        options = work.options
        window = max(2 * options.batch_size, 4 * max(self.workers, 1))
        with Extractor.open(work.engine, backend=self.backend) as extractor:
            pool = self._pool(work.engine) if self.workers > 0 else None
            try:
                for shard in shards:
                    n = len(shard.paths)
                    hashes: list[str | None] = [None] * n
                    stream = _prepared_stream(
                        shard, pool, window, work.manifest, options.content_hash, hashes
                    )
                    items = work.bar.track(stream)
                    features = extractor.extract_prepared(items, n, options.batch_size)
                    rows = shard_rows(shard.paths, shard.ids, features, options, hashes,
                                      shard.carried)  # fmt: skip
                    yield shard.k, rows
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)

    def _pool(self, engine: os.PathLike[str]) -> ProcessPoolExecutor:
        # fork on Linux (the default there up to Python 3.13; 3.14 moves to forkserver), so that
        # a worker's parent is this job, which _die_with_the_job relies on.
        context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
        return ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(str(engine), os.getpid()),
        )


# ------------------------------------------------------------------------------------------------
# Decoding in worker processes


_worker_manifest: EngineManifest | None = None


def _init_worker(engine: str, job_pid: int) -> None:
    global _worker_manifest
    _die_with_the_job(job_pid)
    _leave_signals_to_the_job()
    _worker_manifest = EngineManifest.load(engine)


# How long a worker outlives a SIGTERM when the job does not stop it first (see below).
TERM_GRACE_S = 5.0


def _leave_signals_to_the_job() -> None:
    """Signals that reach the whole process group (Ctrl-C; SIGTERM from systemd or a batch
    scheduler) are the job's to handle: it stops, shuts the pool down and each worker leaves
    after the image in hand, so nothing prints a traceback and nothing is left half-done.

    SIGINT is ignored here. SIGTERM must not kill a worker at once either: dying in the middle of
    sending a decoded image would leave half a message in the pool's shared result pipe, and the
    job would wait on it for ever. A worker given SIGTERM carries on and leaves on its own only if
    the pool has not stopped it within TERM_GRACE_S (the pool itself terminates its workers with
    SIGTERM when one of them crashes). This also replaces the CLI's SIGTERM handler, which a
    forked worker inherits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_soon)


_leaving = False


def _leave_soon(signum: int, frame: object) -> None:
    global _leaving
    if _leaving:
        return
    _leaving = True
    timer = threading.Timer(TERM_GRACE_S, os._exit, args=(128 + signal.SIGTERM,))
    timer.daemon = True
    timer.start()


def _die_with_the_job(job_pid: int) -> None:
    """Linux: the kernel kills this worker when the job's process dies, even by `kill -9`.

    Without it a forked worker outlives a killed job, blocked for ever on a queue whose other end
    it inherited. Elsewhere (no prctl) a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != job_pid:  # the job died before prctl took effect
        os._exit(1)


def _prepare(
    path: str, content_hash: bool, where: Where | None, error: str | None
) -> tuple[PreparedImage | str, str | None]:
    assert _worker_manifest is not None, "_init_worker runs first in every worker"
    return prepare_input(path, _worker_manifest, content_hash, where, error)


def _prepared_stream(
    shard: Shard,
    pool: ProcessPoolExecutor | None,
    window: int,
    manifest: EngineManifest,
    content_hash: bool,
    hashes: list[str | None],
) -> Iterator[tuple[int, PreparedImage | str]]:
    """(position, prepared image or error) in input order, at most `window` images in flight;
    with `content_hash`, each file's SHA-256 into `hashes[position]`. A worker is sent where an
    input's bytes are (a path, a URL, a tar member's byte range), never the bytes."""
    inputs = zip(shard.paths, shard.wheres, shard.errors, strict=True)
    if pool is None:
        for i, (path, where, error) in enumerate(inputs):
            item, hashes[i] = prepare_input(path, manifest, content_hash, where, error)
            yield i, item
        return
    pending: deque[tuple[int, Future]] = deque()
    for i, (path, where, error) in enumerate(inputs):
        pending.append((i, pool.submit(_prepare, path, content_hash, where, error)))
        if len(pending) >= window:
            j, future = pending.popleft()
            item, hashes[j] = future.result()
            yield j, item
    while pending:
        j, future = pending.popleft()
        item, hashes[j] = future.result()
        yield j, item


# ------------------------------------------------------------------------------------------------
# Progress


class LiveProgress(Progress):
    """A tqdm bar on a terminal, a plain line every `interval` seconds otherwise: done/total,
    errors, rate and ETA (the total and the ETA once the total is known)."""

    interval = 10.0

    def __init__(
        self, enabled: bool | None, count: Callable[[], int], label: str = "index"
    ) -> None:
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self.label = label
        self.bar: Any = None
        self.total: int | None = None
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", dynamic_ncols=True, smoothing=0.1)
        self.done = self.errors = 0
        self.started = self.last = time.perf_counter()
        # The total (for the ETA) is counted in the background, so that a million-file tree
        # starts at once.
        threading.Thread(target=self._set_total, args=(count,), daemon=True).start()

    def _set_total(self, count: Callable[[], int]) -> None:
        try:
            self.total = count()
            if self.bar is not None:
                self.bar.total = self.total
                self.bar.refresh()
        except Exception:  # the ETA is a nicety; the job must not depend on it
            pass

    def skip(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def track(
        self, stream: Iterator[tuple[int, PreparedImage | str]]
    ) -> Iterator[tuple[int, PreparedImage | str]]:
        for item in stream:
            self.done += 1
            self.errors += isinstance(item[1], str)
            self._show()
            yield item

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:  # plain lines for logs and pipes, any log level
            print(self.line(now), file=sys.stderr, flush=True)
            self.last = now

    def line(self, now: float | None = None) -> str:
        """`index: 65/1000 images decoded (6%), 2 errors, 3.1 images/s, ETA 5 min` (the label
        first: `index` or `extract`)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        total = self.total
        if total is None or total < self.done:
            done = f"{self.done} images decoded"
        else:
            done = f"{self.done}/{total} images decoded ({100 * self.done // max(total, 1)}%)"
        text = f"{self.label}: {done}, {self.errors} errors, {rate:.1f} images/s"
        if total is not None and total >= self.done and rate > 0:
            text += f", ETA {format_duration((total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    """`42 s`, `5 min`, `2 h 05 min`: a remaining time as people read it."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
