"""The autograd reference's side of a conformance check: what an engine should output.

The verdict itself (tolerances, worst image, cosine) is runtime/conformance.py's one
judge; this module gives it the reference outputs of an engine directory's own settings.
"""

from __future__ import annotations

import numpy as np
import torch
from interactive_features.runtime.manifest import EngineManifest
from interactive_features.runtime.settings import ExportSettings

from .reference import reference_features
from .spec import FeatureSpec, engine_spec, load_state_dict


def engine_reference(manifest: EngineManifest) -> tuple[FeatureSpec, dict[str, torch.Tensor]]:
    """The spec and source weights an engine was exported from (manifest["export"]), for
    `reference_outputs`. The weights come from their source (`random:SEED`, `imagenet` or the
    .pth path), not from the engine directory: the reference must not share the engine's data."""
    settings = ExportSettings.from_identity(manifest.data["export"])
    return engine_spec(manifest), load_state_dict(
        settings.weights, settings.arch, settings.width_div
    )


def reference_outputs(
    spec: FeatureSpec, state_dict: dict[str, torch.Tensor], images: np.ndarray
) -> dict[str, np.ndarray]:
    """The autograd reference's outputs for uint8 [N, H, W, 3] images, as float32 numpy."""
    want = reference_features(spec, state_dict, torch.from_numpy(np.ascontiguousarray(images)))
    return {name: value.numpy() for name, value in want.items()}
