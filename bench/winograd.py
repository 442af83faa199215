"""Per-layer microbenchmark: each 3x3 convolution step of an engine (forward, and the backward's
flipped-kernel convolutions) as ONNX Runtime's direct Conv against the Winograd subgraphs
F(2x2,3x3) and F(4x4,3x3) of export/winograd.py, exported by the same torch.onnx path as an
engine and run in sessions opened like the engine's (runtime.backends.ort_session), timed
interleaved in one process (median of `reps`), with each one's relative L2 error against a
float64 convolution.

    python -m interactive_features.bench.winograd --bucket 512x512 --reps 5 --json out.json

The table it prints (markdown) is what the `auto` plan of export/winograd.py was chosen from.

    python -m interactive_features.bench.winograd --engines DIRECT_DIR WINOGRAD_DIR --reps 5

times two engines (the same network exported with `--conv direct` and `--conv auto`) on one
bucket through the runtime's `ort` backend, interleaved in one process, beside the measured fp32
matmul rate (bench/machine.py) and the cost model's GFLOP (bench/cost.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from interactive_features.export.exporter import OPSET
from interactive_features.export.graph import backward_convs
from interactive_features.export.spec import FeatureSpec
from interactive_features.export.winograd import (
    TILES,
    tile_of,
    transform_kernels,
    transformed_weights,
    winograd_conv3x3,
)
from interactive_features.runtime.backends import ort_session
from interactive_features.runtime.buckets import format_size, parse_size

MODES = ("direct", *TILES)


@dataclass(frozen=True)
class ConvStep:
    """One 3x3 convolution an engine runs: unit, `forward` or `backward`, channels, map size."""

    unit: str
    direction: str
    c_in: int
    c_out: int
    height: int
    width: int

    @property
    def shape(self) -> str:
        return f"{self.c_in}->{self.c_out} @ {self.width}x{self.height}"


def conv_steps(spec: FeatureSpec, bucket: tuple[int, int]) -> list[ConvStep]:
    """Every 3x3 convolution of `spec`'s graph at `bucket`, forward then backward."""
    width, height = bucket
    units = spec.units
    steps = []
    for u in units[: spec.deepest_index() + 1]:
        if u.kernel == 3:
            w, h = spec.map_size(u.name, width, height)
            steps.append(ConvStep(u.name, "forward", u.in_channels, u.out_channels, h, w))
    for i in backward_convs(spec):
        u = units[i]
        if u.kernel == 3:
            w, h = spec.map_size(u.name, width, height)
            steps.append(ConvStep(u.name, "backward", u.out_channels, u.in_channels, h, w))
    return steps


class _Step(torch.nn.Module):
    """One step as the engine writes it: forward is conv + bias + ReLU, backward a bare conv."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("weight", weight)
        self.bias = bias
        if mode != "direct":
            m = tile_of(mode)
            self.m = m
            self.register_buffer("u", transformed_weights(weight, m))
            for name, value in transform_kernels(m).items():
                self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "direct":
            y = F.conv2d(x, self.weight, self.bias, padding=1)
        else:
            y = winograd_conv3x3(x, self.u, self.bt, self.at, self.m, self.bias)
        return F.relu(y) if self.bias is not None else y


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET, optimize=True
        )
    quiet.setLevel(level)
    program.save(str(path))


def measure_step(step: ConvStep, reps: int, threads: int, tmp: Path) -> dict[str, Any]:
    """Median seconds and relative error of every mode of one step, interleaved."""
    gen = torch.Generator().manual_seed(hash(step) % 2**31)
    std = (2.0 / (9 * step.c_in)) ** 0.5
    weight = torch.randn(step.c_out, step.c_in, 3, 3, generator=gen) * std
    forward = step.direction == "forward"
    bias = torch.randn(step.c_out, generator=gen) * 0.1 if forward else None
    x = torch.randn(1, step.c_in, step.height, step.width, generator=gen)
    if forward:
        x = x.abs()  # a ReLU's output
    exact_bias = None if bias is None else bias.double()
    exact = F.conv2d(x.double(), weight.double(), exact_bias, padding=1)
    if forward:
        exact = exact.clamp(min=0)
    feed = x.numpy()
    sessions = {}
    for mode in MODES:
        path = tmp / f"{step.unit}-{step.direction}-{mode}.onnx"
        _export(_Step(weight, bias, mode).eval(), x, path)
        sessions[mode] = ort_session(path, threads=threads, providers=["CPUExecutionProvider"])
    errors: dict[str, float] = {}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode, session in sessions.items():  # warm-up and error
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: feed})[0])
        errors[mode] = float((got.double() - exact).norm() / exact.norm())
    for _ in range(reps):
        for mode, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {session.get_inputs()[0].name: feed})
            times[mode].append(time.perf_counter() - started)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    # Each speed-up is the median of the per-repetition ratios (the two ran back to back), which
    # drifts less with a shared machine's load than a ratio of medians.
    ratios = {m: [d / t for d, t in zip(times["direct"], times[m], strict=True)] for m in TILES}
    return {
        **asdict(step),
        "seconds": median,
        "speedup": {m: statistics.median(r) for m, r in ratios.items()},
        "rel_err": errors,
    }


def best_mode(row: dict[str, Any], margin: float = 1.05) -> str:
    """The fastest mode of a measured row; Winograd only where it beats direct by `margin`."""
    mode = max(TILES, key=lambda m: row["speedup"][m])
    return mode if row["speedup"][mode] >= margin else "direct"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| unit | step | shape | direct ms | F(2,3) x | F(4,3) x | err direct | err F(2,3) | "
        "err F(4,3) | best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = ConvStep(r["unit"], r["direction"], r["c_in"], r["c_out"], r["height"], r["width"])
        e = r["rel_err"]
        lines.append(
            f"| {r['unit']} | {r['direction']} | {step.shape} | {1e3 * r['seconds']['direct']:.1f} "
            f"| {r['speedup']['f2']:.2f} | {r['speedup']['f4']:.2f} | {e['direct']:.1e} "
            f"| {e['f2']:.1e} | {e['f4']:.1e} | {best_mode(r)} |"
        )
    return "\n".join(lines)


def compare_engines(
    engines: list[Path], bucket: tuple[int, int], reps: int, threads: int, malloc: bool = False
) -> dict[str, Any]:
    """Seconds per image of each engine at `bucket`, batch 1, interleaved (median of reps), the
    speed-up of each over the first, GFLOP/s over the cost model and the fraction of the
    measured fp32 matmul rate. `malloc` adds the first engine once more, its session opened as
    before the shared arena (malloc per tensor, malloc_trim after each image: the runtime's
    default until 2026-12-02), as the first row."""
    from interactive_features.bench.cost import cost_per_image
    from interactive_features.bench.machine import machine_info, matmul_rates, peak_rate
    from interactive_features.export.spec import engine_spec
    from interactive_features.runtime.backends import open_backend
    from interactive_features.runtime.manifest import EngineManifest

    manifests = [EngineManifest.load(e) for e in engines]
    image = np.random.default_rng(0).integers(0, 256, (1, bucket[1], bucket[0], 3), np.uint8)
    runs = [_malloc_run(manifests[0], bucket, image, threads)] if malloc else []
    labels = ["malloc"] if malloc else []
    backends = [open_backend(m, "ort", threads=threads) for m in manifests]
    runs += [functools.partial(b.run, bucket, image) for b in backends]
    labels += [m.settings.conv for m in manifests]
    if malloc:
        manifests = [manifests[0], *manifests]
    outputs = [run() for run in runs]  # warm-up (and the outputs compared)
    times: list[list[float]] = [[] for _ in runs]
    rates = matmul_rates("cpu", ("fp32",))
    for _ in range(reps):
        for k, run in enumerate(runs):
            started = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - started)
    rates_after = matmul_rates("cpu", ("fp32",))
    peak = max(peak_rate(rates, "fp32") or 0.0, peak_rate(rates_after, "fp32") or 0.0)
    gflop = cost_per_image(engine_spec(manifests[0]), bucket).flop / 1e9
    rows = []
    for k, m in enumerate(manifests):
        median = statistics.median(times[k])
        ratios = [a / b for a, b in zip(times[0], times[k], strict=True)]
        diff = max(
            float(np.linalg.norm(outputs[k][n] - outputs[0][n]) / np.linalg.norm(outputs[0][n]))
            for n in m.layers
        )
        rows.append(
            {
                "engine": str(m.directory),
                "conv": labels[k],
                "winograd_units": len(m.winograd),
                "seconds": median,
                "speedup_vs_first": statistics.median(ratios),
                "gflops": gflop / median,
                "of_matmul": gflop / median / peak if peak else None,
                "max_rel_diff_vs_first": diff,
            }
        )
    for backend in backends:
        backend.close()
    return {
        "bucket": list(bucket),
        "reps": reps,
        "gflop_per_image": gflop,
        "matmul": {"before": rates, "after": rates_after},
        "machine": machine_info(),
        "engines": rows,
    }


def _malloc_run(
    manifest: Any, bucket: tuple[int, int], image: np.ndarray, threads: int
) -> Callable[[], dict[str, np.ndarray]]:
    """One image through `manifest`'s bucket as the runtime ran it before the shared arena."""
    from interactive_features.runtime.backends import engine_initializers, release_freed_memory

    session = ort_session(
        manifest.bucket_path(bucket),
        engine_initializers(manifest),
        threads=threads,
        providers=["CPUExecutionProvider"],
        arena=False,
    )

    def run() -> dict[str, np.ndarray]:
        values = session.run(manifest.outputs, {manifest.input_name: image})
        release_freed_memory()
        return dict(zip(manifest.outputs, values, strict=True))

    return run


def engines_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| engine | conv | Winograd units | s/image | vs first | GFLOP/s | of matmul | max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["engines"]:
        of = f"{r['of_matmul']:.2f}" if r["of_matmul"] is not None else "-"
        lines.append(
            f"| {r['engine']} | {r['conv']} | {r['winograd_units']} | {r['seconds']:.3f} "
            f"| {r['speedup_vs_first']:.2f}x | {r['gflops']:.0f} | {of} "
            f"| {r['max_rel_diff_vs_first']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interactive_features.bench.winograd")
    parser.add_argument("--bucket", default="512x512")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--units", default="", help="comma-separated units (default: all)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--engines", nargs="+", type=Path, help="time these engines instead")
    parser.add_argument(
        "--malloc",
        action="store_true",
        help="with --engines: also the first engine with sessions as before the shared arena",
    )
    args = parser.parse_args(argv)
    bucket = parse_size(args.bucket)
    if args.engines:
        result = compare_engines(args.engines, bucket, args.reps, args.threads, args.malloc)
        print(engines_markdown(result))
        print(f"matmul GFLOP/s: {result['matmul']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    spec = FeatureSpec(arch=args.arch)
    wanted = {u for u in args.units.split(",") if u}
    steps = [s for s in conv_steps(spec, bucket) if not wanted or s.unit in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="winograd-bench-") as tmp:
        for step in steps:
            rows.append(measure_step(step, args.reps, args.threads, Path(tmp)))
            r = rows[-1]
            print(
                f"{step.unit} {step.direction} {step.shape}: direct "
                f"{1e3 * r['seconds']['direct']:.1f} ms, F(2,3) {r['speedup']['f2']:.2f}x, "
                f"F(4,3) {r['speedup']['f4']:.2f}x, err {r['rel_err']}",
                flush=True,
            )
            for f in Path(tmp).iterdir():
                f.unlink()
    print(f"\nbucket {format_size(bucket)}, {args.reps} reps, threads {args.threads}\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"bucket": list(bucket), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
