"""Where an ONNX Runtime session spends its time: ORT's own per-node profile, by op type and node.

The session is the runtime's own (runtime.backends.ort_session) with profiling on; the warm-up
runs are dropped from the totals.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

TOP_NODES = 25


def profile_ort(case: dict[str, Any]) -> dict[str, Any]:
    """Run the case's bucket `warmup + reps` times with profiling on; aggregate the trace."""
    from interactive_features.bench.worker import random_batch
    from interactive_features.runtime.manifest import EngineManifest

    manifest = EngineManifest.load(case["engine"])
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        session = profiling_session(manifest, case, Path(tmp) / "trace")
        feed = {manifest.input_name: random_batch(case)}
        for _ in range(max(1, case["warmup"]) + case["reps"]):
            session.run(manifest.outputs, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    return aggregate_trace(trace, skip_runs=max(1, case["warmup"]))


def profiling_session(manifest: Any, case: dict[str, Any], prefix: Path) -> Any:
    """An InferenceSession as the ort backend opens it (runtime.backends.ort_session), profiling."""
    from interactive_features.runtime.backends import engine_initializers, ort_session

    return ort_session(
        manifest.bucket_path(tuple(case["bucket"])),
        engine_initializers(manifest),
        providers=case["options"].get("providers"),
        threads=case["threads"],
        profile_prefix=prefix,
    )


def aggregate_trace(trace: list[dict[str, Any]], skip_runs: int = 1) -> dict[str, Any]:
    """Kernel time per op type and per node (ms per run, share of all kernel time)."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        raise ValueError(f"the trace holds {len(runs)} runs; {skip_runs} are warm-up")
    since = runs[skip_runs]["ts"]
    timed = len(runs) - skip_runs
    by_type: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    node_type: dict[str, str] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < since:
            continue
        node = e["name"].removesuffix("_kernel_time")
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] += e["dur"] / 1000
        by_node[node] += e["dur"] / 1000
        node_type[node] = op
    total = sum(by_type.values())
    run_ms = float(np.mean([r["dur"] for r in runs[skip_runs:]])) / 1000

    def rows(table: dict[str, float], limit: int | None = None) -> list[dict[str, Any]]:
        ordered = sorted(table.items(), key=lambda kv: -kv[1])[:limit]
        return [
            {"name": k, "ms_per_run": v / timed, "share": v / total if total else 0.0}
            | ({"op": node_type[k]} if k in node_type and table is by_node else {})
            for k, v in ordered
        ]

    return {
        "runs": timed,
        "run_ms": run_ms,
        "kernel_ms_per_run": total / timed,
        "by_op_type": rows(by_type),
        "by_node": rows(by_node, TOP_NODES),
    }
