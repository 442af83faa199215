"""Shared fixtures: narrow networks and small buckets keep the suite fast.

The narrow engine is VGG-16 at 1/8 width (same code path as full width), config `last`, p = 2,
the paper's nine layers, heatmaps on, bucket rule area 256 with three buckets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from interactive_features.export.exporter import ExportRequest, export_engine
from interactive_features.export.spec import load_state_dict
from interactive_features.runtime.conformance import conformance_report
from interactive_features.runtime.settings import ExportSettings

DATA = Path(__file__).parent / "data"
NARROW = 8
NARROW_BUCKETS = "256x256,288x224,224x288"


def photos() -> list[Path]:
    return sorted(DATA.glob("*.jpg"))


def assert_close(got: dict[str, np.ndarray], want: dict[str, torch.Tensor | np.ndarray]) -> float:
    """Every output within its fp32 tolerance (the one judge, runtime/conformance.py: worst
    image, features 1e-3, heatmaps HEATMAP_TOLERANCE); returns the largest feature error."""
    for name, ref in want.items():
        assert np.asarray(got[name]).shape == tuple(ref.shape), name
    report = conformance_report({k: np.asarray(v) for k, v in got.items()}, want, "fp32")
    assert report.ok, report.summary()
    return report.max_feature_error


def narrow_request(out: Path, buckets: str = NARROW_BUCKETS, **settings: object) -> ExportRequest:
    """An export of the narrow test network (random:0 weights, area 256) into `out`."""
    values: dict = {"weights": "random:0", "width_div": NARROW, "area": 256, **settings}
    return ExportRequest(out=out, settings=ExportSettings(**values), buckets=buckets)


@pytest.fixture(scope="session")
def narrow_state_dict() -> dict[str, torch.Tensor]:
    return load_state_dict("random:0", "vgg16", NARROW)


@pytest.fixture(scope="session")
def narrow_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "vgg16-narrow"
    export_engine(narrow_request(out, heatmaps=True), log=lambda line: None)
    return out
