"""Shared fixtures: narrow networks and small buckets keep the suite fast.

The narrow engine is VGG-16 at 1/8 width (same code path as full width), config `last`, p = 2,
the paper's nine layers, heatmaps on, bucket rule area 256 with three buckets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from interactive.export.exporter import (
    ExportRequest,
    beyond_tolerance,
    export_engine,
    relative_error,
)
from interactive.export.spec import load_state_dict
from interactive.runtime.manifest import is_heatmap

DATA = Path(__file__).parent / "data"
NARROW = 8
NARROW_BUCKETS = "256x256,288x224,224x288"


def photos() -> list[Path]:
    return sorted(DATA.glob("*.jpg"))


def assert_close(got: dict[str, np.ndarray], want: dict[str, torch.Tensor | np.ndarray]) -> float:
    """Every output within its fp32 tolerance; returns the largest feature error.

    Features: ALGORITHM.md's 1e-3. Heatmaps: HEATMAP_TOLERANCE (see the exporter for why).
    """
    errors = {}
    for name, ref in want.items():
        ref_np = ref.numpy() if isinstance(ref, torch.Tensor) else ref
        assert got[name].shape == ref_np.shape, name
        errors[name] = relative_error(np.asarray(got[name]), ref_np)
    bad = beyond_tolerance(errors)
    assert not bad, f"beyond tolerance: {bad}"
    return max(v for k, v in errors.items() if not is_heatmap(k))


@pytest.fixture(scope="session")
def narrow_state_dict() -> dict[str, torch.Tensor]:
    return load_state_dict("random:0", "vgg16", NARROW)


@pytest.fixture(scope="session")
def narrow_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "vgg16-narrow"
    export_engine(
        ExportRequest(out=out, width_div=NARROW, area=256, buckets=NARROW_BUCKETS, heatmaps=True),
        log=lambda line: None,
    )
    return out
