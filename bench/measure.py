"""Running one case: a fresh `python -m interactive_features.bench.worker` process per case,
its threading libraries pinned by the environment, its result line merged back into the case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from interactive_features.bench.worker import parse_result
from interactive_features.runtime.buckets import format_size


def thread_env(threads: int) -> dict[str, str]:
    """The case processes' environment: every threading library pinned to `threads`."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def measure(
    case: dict[str, Any], env: dict[str, str], timeout: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run one case in a fresh process; the case dict comes back with its result merged in
    (status "ok", "skipped" or "failed", with a reason for the last two)."""
    if case.get("status") == "skipped":
        log(f"skip {describe(case)}: {case['reason']}")
        return case
    log(f"run  {describe(case)}")
    command = [sys.executable, "-m", "interactive_features.bench.worker", json.dumps(case)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    result = parse_result(done.stdout)
    if result is None:
        tail = done.stderr.strip().splitlines()[-3:]
        result = {"status": "failed", "reason": f"exit {done.returncode}: {' '.join(tail)}"}
    if result["status"] != "ok":
        log(f"     {result['status']}: {result['reason']}")
    return {**case, **result, "process_s": time.perf_counter() - started}


def describe(case: dict[str, Any]) -> str:
    if case["kind"] == "matmul":
        return f"matmul rate ({case['device']}, {case['threads']} threads)"
    variant = " forward-only" if case["kind"] == "backend" and case["variant"] == "forward" else ""
    bucket = format_size(tuple(case["bucket"]))
    return (
        f"{case['kind']} {case['target']}{variant} {case['mode']} {bucket} batch {case['batch']} "
        f"{case['precision']}"
    )
