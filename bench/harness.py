"""`interactive bench`: every backend against the peers, side by side, in one run.

    python -m interactive.bench --engine DIR [--backends available] [--peers ...] [--buckets ...]

A run is a list of cases (backend or peer x mode x bucket x batch x precision), each timed in a
fresh process (bench/worker.py); the parent collects their samples, adds the cost model and the
measured matmul rate, computes every ratio from this run's cases only, and writes the JSON, the
Markdown table (printed and appended to --results-md) and the plots (bench/report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from interactive.bench.machine import gpu_name, machine_info, peak_rate, usable_cores
from interactive.bench.worker import parse_result
from interactive.runtime.buckets import format_size, parse_size
from interactive.runtime.manifest import EngineManifest
from interactive.runtime.registry import REGISTRY
from interactive.runtime.settings import ExportSettings

SCHEMA = "interactive-bench/1"
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
PEER_NAMES = ("reference", "naive", "captum", "torch-forward", "engine-forward")
DEFAULT_PEERS = "reference,torch-forward,engine-forward"
FULL_PEERS = ",".join(PEER_NAMES)
PEER_LABELS = {
    "reference": "autograd reference (torch eager)",
    "naive": "naive per-layer autograd",
    "captum": "Captum LayerGradientXActivation",
    "torch-forward": "torch eager forward-only ORIG",
}
COMPILE_SUFFIX = "+compile"  # `--backends torch+compile`: the torch backend, compiled
PERCENTILES = (50, 90, 99)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="interactive bench",
        description="Latency, throughput, memory and FLOP rate of every backend against the "
        "autograd peers and the forward-only floors, in one run; or --compare two runs.",
    )
    p.add_argument("--engine", type=Path, default=Path("engines/vgg16-last-p2-random0"))
    p.add_argument("--mode", default="engine", help="engine (pre-decoded uint8), e2e (files), both")
    p.add_argument(
        "--backends", default="available",
        help="comma list of " + ", ".join(REGISTRY) + f" (NAME{COMPILE_SUFFIX}: torch.compile), "
        "'available' (every registered one; those that cannot run here are reported skipped), "
        "or 'none'",
    )  # fmt: skip
    p.add_argument("--precision", default="fp32", help="comma list of fp32, bf16, fp16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--buckets", help="comma list WxH (default: the engine's smallest bucket)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument(
        "--peers", default=DEFAULT_PEERS,
        help=f"comma list of {', '.join(PEER_NAMES)}, 'all' or 'none' (engine-forward: our "
        "own forward-only ORIG engine in every backend)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed calls per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (at least 1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per case (0: all usable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="JSON and PNG directory")
    p.add_argument(
        "--results-md", type=Path, help="append the Markdown here (default OUT/results.md)"
    )
    p.add_argument("--cache", type=Path, help="forward-only engines (default ~/.cache/interactive)")
    p.add_argument("--profile", action="store_true", help="per-operator ORT profile per bucket")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--title", default="", help="heading of the Markdown section")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    return p


def comma(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    from interactive.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.compare:
        runs = [json.loads(path.read_text()) for path in args.compare]
        print(report.compare(*runs))
        return 0
    run = run_benchmark(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{run['created'].replace(':', '').replace('-', '')[:15]}"
    json_path = args.out / f"{stem}.json"
    if not args.no_plots:
        run["plots"] = [str(p) for p in report.plots(run, args.out, stem)]
    json_path.write_text(json.dumps(run, indent=1))
    text = report.markdown(run, json_path)
    print(text)
    results = args.results_md or args.out / "results.md"
    report.append(results, text)
    print(f"\nwrote {json_path}; appended to {results}", file=sys.stderr)
    return 0


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every case of the run, measured; the returned dict is the run's JSON."""
    settings = resolve_settings(args)
    manifest = EngineManifest.load(args.engine)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    forward_engine = None
    if "engine-forward" in settings["peers"]:
        forward_engine = ensure_forward_engine(manifest, settings["buckets"], args.cache, log)
    settings["forward_engine"] = str(forward_engine) if forward_engine else None
    files = make_inputs(args.out / "inputs", settings) if "e2e" in settings["modes"] else {}
    run: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "command": shlex.join(["interactive", "bench", *argv]),
        "settings": settings,
        "machine": machine_info() | {"gpu": gpu_name() if args.device == "cuda" else None},
        "engine": {k: manifest.data[k] for k in ("arch", "width_div", "config", "p", "export")},
    }
    run["cost"] = costs(manifest, settings["buckets"])
    cases = plan_cases(settings, manifest, forward_engine, files)
    env = thread_env(settings["threads"])
    matmul = measure(matmul_case(settings), env, args.timeout, log)
    run["matmul"] = {"device": settings["device"], **matmul}
    run["cases"] = [measure(case, env, args.timeout, log) for case in cases]
    if args.profile:
        run["profiles"] = [
            measure(case, env, args.timeout, log) for case in profile_cases(settings, cases)
        ]
    add_stats(run)
    return run


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    manifest = EngineManifest.load(args.engine)
    modes = ["engine", "e2e"] if args.mode == "both" else comma(args.mode)
    for mode in modes:
        if mode not in ("engine", "e2e"):
            raise ValueError(f"--mode {mode!r}: expected engine, e2e or both")
    if args.reps < 1 or args.warmup < 1:
        raise ValueError("--reps and --warmup must be at least 1")
    buckets = [parse_size(b) for b in comma(args.buckets)] if args.buckets else [smallest(manifest)]
    for bucket in buckets:
        manifest.bucket_path(bucket)  # raises, naming the export command, if it is missing
    backends = comma(args.backends)
    if backends == ["available"]:
        backends = list(REGISTRY)
    elif backends == ["none"]:
        backends = []
    for name in backends:
        if name.removesuffix(COMPILE_SUFFIX) not in REGISTRY:
            raise ValueError(f"--backends {name!r}: expected one of {', '.join(REGISTRY)}")
    peers = list(PEER_NAMES) if args.peers == "all" else comma(args.peers)
    peers = [] if peers == ["none"] else peers
    for name in peers:
        if name not in PEER_NAMES:
            raise ValueError(f"--peers {name!r}: expected one of {', '.join(PEER_NAMES)}")
    precisions = comma(args.precision)
    for precision in precisions:
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision {precision!r}: expected fp32, bf16 or fp16")
    batches = [int(b) for b in comma(args.batch)]
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {args.batch!r}: expected positive integers")
    return {
        "engine": str(args.engine),
        "modes": modes,
        "backends": backends,
        "peers": peers,
        "precisions": precisions,
        "device": args.device,
        "buckets": [list(b) for b in buckets],
        "batches": batches,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads or usable_cores(),
        "seed": args.seed,
        "title": args.title,
    }


def smallest(manifest: EngineManifest) -> tuple[int, int]:
    return min(manifest.buckets, key=lambda b: (b[0] * b[1], b))


def thread_env(threads: int) -> dict[str, str]:
    """The case processes' environment: every threading library pinned to `threads`."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def forward_settings(manifest: EngineManifest) -> ExportSettings:
    """The export settings of the forward-only ORIG engine twin of `manifest`'s engine."""
    from interactive.bench.peers import FORWARD_CONFIG

    return manifest.settings.replace(config=FORWARD_CONFIG, heatmaps=False)


def ensure_forward_engine(
    manifest: EngineManifest, buckets: list[list[int]], cache: Path | None, log: Any
) -> Path:
    """Export (once, into the cache) the forward-only engine for the same weights and layers."""
    from interactive.export.exporter import ExportRequest, export_engine

    settings = forward_settings(manifest)
    identity = settings.identity()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "interactive"
    out = root / "bench-engines" / f"{settings.arch}-{settings.config}-{digest}"
    request = ExportRequest(
        out=out, settings=settings, buckets=",".join(format_size(tuple(b)) for b in buckets)
    )
    export_engine(request, log=lambda line: log(f"forward-only engine: {line}"))
    return out


def make_inputs(root: Path, settings: dict[str, Any]) -> dict[str, list[str]]:
    """JPEG files for the e2e mode, per bucket: photos from tests/data cropped to the bucket's
    aspect ratio at 1.5x its size (so decoding resizes, as it would on real photos)."""
    from PIL import Image

    photos = sorted(DATA.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no photos in {DATA} for the e2e mode")
    files: dict[str, list[str]] = {}
    for bucket in settings["buckets"]:
        w, h = int(bucket[0] * 1.5), int(bucket[1] * 1.5)
        key = format_size(tuple(bucket))
        (root / key).mkdir(parents=True, exist_ok=True)
        files[key] = []
        for i in range(max(settings["batches"])):
            path = root / key / f"photo{i:03d}.jpg"
            with Image.open(photos[i % len(photos)]) as im:
                save_crop(im.convert("RGB"), (w, h), path)
            files[key].append(str(path))
    return files


def save_crop(photo: Any, size: tuple[int, int], path: Path) -> None:
    """`photo` scaled to cover `size`, cropped to it, saved as a JPEG (quality 90)."""
    w, h = size
    scale = max(w / photo.width, h / photo.height)
    big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
    big.crop((0, 0, w, h)).save(path, quality=90)


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
) -> list[dict[str, Any]]:
    """Every case of the run in order; cases that cannot run here come back already skipped."""
    from interactive.runtime.backends import backend_status

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
                    cases += _backend_cases(base, settings, reasons, manifest, forward_engine)
                    cases += _peer_cases(base, settings, manifest)
    for i, case in enumerate(cases):
        case["id"] = i
    return cases


def _backend_cases(
    base: dict[str, Any],
    settings: dict[str, Any],
    reasons: dict[str, str | None],
    manifest: EngineManifest,
    forward_engine: Path | None,
) -> list[dict[str, Any]]:
    cases = []
    engines = {"interactive": manifest.directory}
    if forward_engine is not None:
        engines["forward"] = forward_engine
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


def _peer_cases(
    base: dict[str, Any], settings: dict[str, Any], manifest: EngineManifest
) -> list[dict[str, Any]]:
    cases = []
    for name in settings["peers"]:
        if name == "engine-forward":  # timed in each backend, above
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


def matmul_case(settings: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "matmul", "target": "matmul", "device": settings["device"],
            "threads": settings["threads"]}  # fmt: skip


def profile_cases(settings: dict[str, Any], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ORT profile per bucket and engine variant, at the first batch size and precision."""
    out = []
    for case in cases:
        first = case["batch"] == settings["batches"][0] and case["mode"] == settings["modes"][0]
        if case.get("backend") == "ort" and first and case.get("status") != "skipped":
            out.append({**case, "kind": "profile", "id": f"profile-{case['id']}"})
    return out


def measure(case: dict[str, Any], env: dict[str, str], timeout: float, log: Any) -> dict[str, Any]:
    """Run one case in a fresh process; the case dict comes back with its result merged in."""
    if case.get("status") == "skipped":
        log(f"skip {describe(case)}: {case['reason']}")
        return case
    log(f"run  {describe(case)}")
    command = [sys.executable, "-m", "interactive.bench.worker", json.dumps(case)]
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


def costs(manifest: EngineManifest, buckets: list[list[int]]) -> dict[str, Any]:
    """Cost model per bucket: the engine's own config, and its forward-only twin."""
    from interactive.bench.cost import cost_per_image
    from interactive.bench.peers import forward_spec
    from interactive.export.spec import engine_spec

    spec = engine_spec(manifest)
    out = {}
    for bucket in buckets:
        size = (bucket[0], bucket[1])
        out[format_size(size)] = {
            "interactive": cost_per_image(spec, size).as_dict(),
            "forward": cost_per_image(forward_spec(spec), size).as_dict(),
        }
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
        for case in members:
            ratios = {}
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


# The targets of the issue, checked for every InterActive engine case that has the peers.
TARGETS = (
    ("vs_reference", ">=", 1.8, "at least 1.8x the autograd reference"),
    ("vs_torch_forward", ">=", 1.0, "at most the time of the torch eager forward-only floor"),
    ("backward_efficiency", ">=", 0.9, "GFLOP/s at least 90% of our forward-only engine's"),
)


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
