"""A run's numbers from its samples: the cost model per bucket, latency percentiles and rates per
case, every ratio between cases of the same run (never across runs), and the speed targets."""

from __future__ import annotations

from typing import Any

import numpy as np
from interactive_features.bench.machine import peak_rate
from interactive_features.runtime.buckets import format_size
from interactive_features.runtime.manifest import EngineManifest

PERCENTILES = (50, 90, 99)
# Speed targets, checked for every InterActive engine case whose group has the peer or twin.
TARGETS = (
    ("vs_reference", ">=", 1.8, "at least 1.8x the autograd reference"),
    ("vs_torch_forward", ">=", 1.0, "at most the time of the torch eager forward-only floor"),
    ("backward_efficiency", ">=", 0.9, "GFLOP/s at least 90% of our forward-only engine's"),
)


def costs(manifest: EngineManifest, buckets: list[list[int]]) -> dict[str, Any]:
    """Cost model per bucket: the engine's own config, and its forward-only twin."""
    from interactive_features.bench.cost import cost_per_image
    from interactive_features.bench.peers import forward_spec
    from interactive_features.export.spec import engine_spec

    spec = engine_spec(manifest)
    out = {}
    for bucket in buckets:
        size = (bucket[0], bucket[1])
        out[format_size(size)] = {
            "interactive": cost_per_image(spec, size).as_dict(),
            "forward": cost_per_image(forward_spec(spec), size).as_dict(),
        }
        out[format_size(size)]["direct"] = out[format_size(size)]["interactive"]
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples, dtype=np.float64)
    out = {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}
    return out | {"max": float(values.max()), "mean": float(values.mean())}


def case_stats(case: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Latency percentiles per batch and per image, images/s, GFLOP/s and fraction of matmul."""
    batch = case["batch"]
    per_batch = percentiles(case["samples_s"])
    per_image = {k: v / batch for k, v in per_batch.items()}
    bucket = format_size(tuple(case["bucket"]))
    gflop = run["cost"][bucket][case["variant"]]["gflop"]
    gflops = gflop * batch / per_batch["p50"]
    peak = peak_rate(run["matmul"].get("gflops", {}), case["precision"])
    return {
        "batch_s": per_batch,
        "image_s": per_image,
        "images_per_s": batch * len(case["samples_s"]) / sum(case["samples_s"]),
        "gflop_per_image": gflop,
        "gflops": gflops,
        "matmul_fraction": gflops / peak if peak else None,
    }


def group_key(case: dict[str, Any]) -> tuple[Any, ...]:
    """Cases that compare directly: same mode, bucket, batch, precision and device."""
    return (case["mode"], tuple(case["bucket"]), case["batch"], case["precision"], case["device"])


def add_stats(run: dict[str, Any]) -> None:
    """Stats per case, then every ratio between cases of this run (never across runs)."""
    ok = [c for c in run["cases"] if c.get("status") == "ok"]
    for case in ok:
        case["stats"] = case_stats(case, run)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for case in ok:
        groups.setdefault(group_key(case), []).append(case)
    run["ratios"] = []
    for members in groups.values():
        peers = {c["peer"]: c for c in members if c["kind"] == "peer"}
        forwards = {
            c["target"]: c for c in members if c["kind"] == "backend" and c["variant"] == "forward"
        }
        directs = {
            c["target"]: c for c in members if c["kind"] == "backend" and c["variant"] == "direct"
        }
        for case in members:
            ratios = {}
            direct = directs.get(case["target"]) if case["variant"] == "interactive" else None
            if direct is not None and case["kind"] == "backend":
                ratios["vs_direct"] = (
                    direct["stats"]["image_s"]["p50"] / case["stats"]["image_s"]["p50"]
                )
            for peer, label in (
                ("reference", "vs_reference"),
                ("torch-forward", "vs_torch_forward"),
            ):
                if peer in peers and peers[peer] is not case:
                    ratios[label] = (
                        peers[peer]["stats"]["image_s"]["p50"] / case["stats"]["image_s"]["p50"]
                    )
            twin = forwards.get(case["target"]) if case["kind"] == "backend" else None
            if twin is not None and twin is not case:
                ratios["backward_efficiency"] = case["stats"]["gflops"] / twin["stats"]["gflops"]
            case["ratios"] = ratios
            run["ratios"].extend(
                {"case": case["id"], "ratio": name, "value": value}
                for name, value in ratios.items()
            )
    run["targets"] = targets(ok)


def targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        if case["kind"] != "backend" or case["variant"] != "interactive":
            continue
        for ratio, _, limit, text in TARGETS:
            value = case["ratios"].get(ratio)
            if value is not None:
                out.append(
                    {"case": case["id"], "target": text, "ratio": ratio, "value": value,
                     "limit": limit, "met": value >= limit}
                )  # fmt: skip
    return out
