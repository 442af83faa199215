"""Conformance of a backend's outputs with the autograd reference (ALGORITHM.md section 6).

`conformance_report(got, want, precision)` compares every output, image by image: the worst
relative L2 error and the lowest cosine similarity, each against the tolerance of the engine's
precision. The test suite, the GPU verification script and the benchmark all judge a backend with
it, so a number in a table means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from interactive.runtime.manifest import EngineManifest, is_heatmap

from .exporter import FP32_TOLERANCE, HEATMAP_TOLERANCE, relative_error
from .reference import reference_features
from .spec import FeatureSpec, load_state_dict

REDUCED_TOLERANCE = 2e-2  # fp16/bf16 engines, ALGORITHM.md section 6
REDUCED_MIN_COSINE = 0.999
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class OutputCheck:
    """One output (a layer's features or heatmaps) of one batch against the reference."""

    name: str
    rel_err: float  # worst image: |a - b| / |b|
    cosine: float  # worst image
    max_rel_err: float
    min_cosine: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.max_rel_err and self.cosine >= self.min_cosine


@dataclass(frozen=True)
class ConformanceReport:
    label: str
    precision: str
    checks: list[OutputCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def max_feature_error(self) -> float:
        return max((c.rel_err for c in self.checks if not is_heatmap(c.name)), default=0.0)

    def table(self) -> str:
        """A fixed-width table: one row per output, verdict last."""
        lines = [
            f"{self.label} ({self.precision}): {'PASS' if self.ok else 'FAIL'}",
            f"  {'output':<20} {'rel err':>9} {'limit':>9} {'cosine':>10} {'min':>8}  verdict",
        ]
        for c in self.checks:
            lines.append(
                f"  {c.name:<20} {c.rel_err:>9.2e} {c.max_rel_err:>9.0e} {c.cosine:>10.6f} "
                f"{c.min_cosine:>8.4f}  {'ok' if c.ok else 'FAIL'}"
            )
        return "\n".join(lines)


def tolerance(output: str, precision: str) -> tuple[float, float]:
    """(largest relative L2 error, smallest cosine) allowed for `output` at `precision`.

    fp32: 1e-3 for features, the exporter's HEATMAP_TOLERANCE for heatmaps (cosine not limited
    beyond what the error implies). fp16/bf16: 2e-2 and cosine 0.999, heatmaps included (their
    fp32 limit is already 2e-2).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fp32_limit = HEATMAP_TOLERANCE if is_heatmap(output) else FP32_TOLERANCE
    if precision == "fp32":
        return fp32_limit, -1.0
    return max(fp32_limit, REDUCED_TOLERANCE), REDUCED_MIN_COSINE


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (1.0 when both are zero)."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norms == 0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(x @ y) / norms


def conformance_report(
    got: Mapping[str, np.ndarray],
    want: Mapping[str, np.ndarray | torch.Tensor],
    precision: str = "fp32",
    label: str = "",
) -> ConformanceReport:
    """Every output of `want` (the reference) against `got` (a backend), image by image.

    A missing output or a shape or dtype other than the reference's float32 fails loudly
    (AssertionError naming it): that is a contract error, not a tolerance question.
    """
    checks = []
    for name, ref in want.items():
        ref_np = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        if name not in got:
            raise AssertionError(f"{label}: output {name!r} missing (got {list(got)})")
        out = got[name]
        if out.shape != ref_np.shape or out.dtype != np.float32:
            raise AssertionError(
                f"{label}: output {name!r} is {out.dtype} {out.shape}, expected float32 "
                f"{ref_np.shape}"
            )
        max_err, min_cos = tolerance(name, precision)
        checks.append(
            OutputCheck(
                name,
                max(relative_error(a, b) for a, b in zip(out, ref_np, strict=True)),
                min(cosine(a, b) for a, b in zip(out, ref_np, strict=True)),
                max_err,
                min_cos,
            )
        )
    return ConformanceReport(label, precision, checks)


def engine_reference(manifest: EngineManifest) -> tuple[FeatureSpec, dict[str, torch.Tensor]]:
    """The spec and source weights an engine was exported from (manifest["export"]), for
    `reference_outputs`. The weights come from their source (`random:SEED`, `imagenet` or the
    .pth path), not from the engine directory: the reference must not share the engine's data."""
    from interactive.runtime.torch_backend import engine_spec

    e = manifest.data["export"]
    return engine_spec(manifest), load_state_dict(e["weights"], e["arch"], int(e["width_div"]))


def reference_outputs(
    spec: FeatureSpec, state_dict: dict[str, torch.Tensor], images: np.ndarray
) -> dict[str, np.ndarray]:
    """The autograd reference's outputs for uint8 [N, H, W, 3] images, as float32 numpy."""
    want = reference_features(spec, state_dict, torch.from_numpy(np.ascontiguousarray(images)))
    return {name: value.numpy() for name, value in want.items()}
