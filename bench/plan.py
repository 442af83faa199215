"""The cases of a run: backend and peer x mode x bucket x batch x precision, in order.

Each case is a JSON-ready dict that bench/worker.py runs in a fresh process. Cases that cannot
run here (the registry's reason, or a precision or config a target does not have) come back
already skipped, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from interactive_features.bench.settings import COMPILE_SUFFIX
from interactive_features.runtime.buckets import format_size
from interactive_features.runtime.manifest import EngineManifest
from interactive_features.runtime.settings import ExportSettings

Case = dict[str, Any]


def forward_settings(manifest: EngineManifest) -> ExportSettings:
    """The export settings of the forward-only ORIG engine twin of `manifest`'s engine."""
    from interactive_features.bench.peers import FORWARD_CONFIG

    return manifest.settings.replace(config=FORWARD_CONFIG, heatmaps=False)


def ensure_forward_engine(
    manifest: EngineManifest, buckets: list[list[int]], cache: Path | None, log: Any
) -> Path:
    """Export (once, into the cache) the forward-only engine for the same weights and layers."""
    return ensure_twin_engine(forward_settings(manifest), buckets, cache, log, "forward-only")


def ensure_direct_engine(
    manifest: EngineManifest, buckets: list[list[int]], cache: Path | None, log: Any
) -> Path | None:
    """Export (once, into the cache) the engine's all-direct twin (`--conv direct`): the engine
    a Winograd engine is measured against. None when the engine has no Winograd step."""
    if not manifest.winograd:
        return None
    settings = manifest.settings.replace(conv="direct")
    return ensure_twin_engine(settings, buckets, cache, log, "direct-convolution")


def ensure_twin_engine(
    settings: ExportSettings, buckets: list[list[int]], cache: Path | None, log: Any, what: str
) -> Path:
    """Export (once, into the cache, keyed by the settings) an engine the run compares with."""
    from interactive_features.export.exporter import ExportRequest, export_engine

    identity = settings.identity()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "interactive"
    out = root / "bench-engines" / f"{settings.arch}-{settings.config}-{digest}"
    request = ExportRequest(
        out=out, settings=settings, buckets=",".join(format_size(tuple(b)) for b in buckets)
    )
    export_engine(request, log=lambda line: log(f"{what} engine: {line}"))
    return out


def backend_options(name: str, settings: dict[str, Any], precision: str) -> dict[str, Any]:
    """What each backend is opened with: threads and providers for ORT (CPU); `precision` for
    the others, plus device and compile for torch and the largest batch for ort-tensorrt."""
    base = name.removesuffix(COMPILE_SUFFIX)
    if base == "ort":
        options: dict[str, Any] = {"threads": settings["threads"]}
        if settings["device"] == "cpu":
            options["providers"] = ["CPUExecutionProvider"]
        return options
    options = {"precision": precision}
    if base == "torch":  # eager unless asked: the backend's own default may compile on a GPU
        options |= {"device": settings["device"], "compile": name.endswith(COMPILE_SUFFIX)}
    if base == "ort-tensorrt":
        options["max_batch"] = max(settings["batches"])
    return options


def plan_cases(
    settings: dict[str, Any],
    manifest: EngineManifest,
    forward_engine: Path | None,
    files: dict[str, list[str]],
    outputs: Path,
    direct_engine: Path | None = None,
) -> list[Case]:
    """Every case of the run in order. A backend or peer case that runs saves its last call's
    outputs to `outputs`/case-ID.npz, for the conformance verdicts (bench/judge.py). Cases of
    one mode, bucket and batch share their seed and files, so they see the same inputs."""
    from interactive_features.runtime.backends import backend_status

    reasons = {
        n: backend_status(n.removesuffix(COMPILE_SUFFIX), manifest) for n in settings["backends"]
    }
    cases = []
    for mode in settings["modes"]:
        for bucket in settings["buckets"]:
            for batch in settings["batches"]:
                for precision in settings["precisions"]:
                    base = {
                        "mode": mode,
                        "bucket": bucket,
                        "batch": batch,
                        "precision": precision,
                        "device": settings["device"],
                        "threads": settings["threads"],
                        "reps": settings["reps"],
                        "warmup": settings["warmup"],
                        "seed": settings["seed"] + batch,
                    }
                    if mode == "e2e":
                        base["files"] = files[format_size(tuple(bucket))][:batch]
                    twins = {"forward": forward_engine, "direct": direct_engine}
                    cases += _backend_cases(base, settings, reasons, manifest, twins)
                    cases += _peer_cases(base, settings, manifest)
    for i, case in enumerate(cases):
        case["id"] = i
        if case.get("status") != "skipped":
            case["outputs_file"] = str(outputs / f"case-{i}.npz")
    return cases


def _backend_cases(
    base: Case,
    settings: dict[str, Any],
    reasons: dict[str, str | None],
    manifest: EngineManifest,
    twins: dict[str, Path | None],
) -> list[Case]:
    cases = []
    engines = {"interactive": manifest.directory}
    engines |= {variant: path for variant, path in twins.items() if path is not None}
    for name in settings["backends"]:
        reason = reasons[name]
        if reason is None and name == "ort" and base["precision"] != "fp32":
            reason = "the ort backend runs the exported fp32 graph only"
        for variant, engine in engines.items():
            case = {
                **base,
                "kind": "backend",
                "backend": name.removesuffix(COMPILE_SUFFIX),
                "target": name,
                "variant": variant,
                "engine": str(engine),
                "options": backend_options(name, settings, base["precision"]),
            }
            if reason is not None:
                case.update(status="skipped", reason=reason)
            cases.append(case)
    return cases


def _peer_cases(base: Case, settings: dict[str, Any], manifest: EngineManifest) -> list[Case]:
    cases = []
    for name in settings["peers"]:
        if name in ("engine-forward", "engine-direct"):  # timed in each backend, above
            continue
        case = {
            **base,
            "kind": "peer",
            "peer": name,
            "target": name,
            "variant": "forward" if name == "torch-forward" else "interactive",
            "engine": str(manifest.directory),
            "options": {},
        }
        if name in ("naive", "captum") and manifest.data["config"] != "last":
            case.update(status="skipped", reason=f"{name} computes config 'last' only")
        cases.append(case)
    return cases


def matmul_case(settings: dict[str, Any]) -> Case:
    return {"kind": "matmul", "target": "matmul", "device": settings["device"],
            "threads": settings["threads"]}  # fmt: skip


def profile_cases(settings: dict[str, Any], cases: list[Case]) -> list[Case]:
    """One ORT profile per bucket and engine variant, at the first batch size and precision."""
    out = []
    for case in cases:
        first = case["batch"] == settings["batches"][0] and case["mode"] == settings["modes"][0]
        if case.get("backend") == "ort" and first and case.get("status") != "skipped":
            profile = {k: v for k, v in case.items() if k != "outputs_file"}
            out.append({**profile, "kind": "profile", "id": f"profile-{case['id']}"})
    return out
