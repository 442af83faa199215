"""The torch-side peers the engines are measured against, each `images uint8 NHWC -> features`.

- `reference`: export/reference.py's reference_features, the autograd oracle (one backward
  pass for all layers under `last`).
- `naive`: one forward pass with autograd on, then one `torch.autograd.grad` per layer, each from
  the score (retain_graph), as a research script computing one layer at a time would.
- `captum`: Captum's LayerGradientXActivation with the same score as the forward function. It
  expresses the InterActive feature exactly only where the layer's next unit is a pool: there
  gamma_t = switch * |dlnf/dX_u| = |dlnf/dX_t| and X_t >= 0, so the feature is the spatial mean of
  |gradient x activation| at X_t. Where the next unit u is a conv or fc unit, gamma_t sums |g_u|
  over every connection (d' and the KxK window), which no Captum attribution computes: Captum gives
  g_u (LayerGradientXActivation with multiply_by_inputs=False on u's conv) and X_t
  (LayerActivation), and the window sum and the product are ours. Multiply_by_inputs is fixed per
  attributor, so this costs two forward+backward passes and one more forward.
- `torch-forward`: the ORIG features (config orig-avg, same layers) in torch eager: what the
  features cost without any backward pass.

All run on `device` ("cpu" or "cuda") in fp32, or in bf16 autocast (`precision="bf16"`; on CUDA
the input is channels_last, which the reference's NHWC -> NCHW permute already gives). On CUDA
TF32 is off, as in the torch backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from interactive_features.export.reference import apply_unit, normalise, reference_features, score
from interactive_features.export.spec import FeatureSpec, Unit, conv_weights
from torch import nn
from torch.nn.utils import skip_init

PeerFn = Callable[[np.ndarray], dict[str, np.ndarray]]
PEERS = ("reference", "naive", "captum", "torch-forward")
FORWARD_CONFIG = "orig-avg"  # the forward-only floor's config (peer and engine alike)


@contextlib.contextmanager
def precision_scope(device: str, precision: str) -> Iterator[None]:
    """Tensors made inside land on `device`; bf16/fp16 run under autocast. On CUDA, TF32 is
    off (`fp32_math`), as in the torch backend, so that "vs reference" compares the same math."""
    from interactive_features.export.torch_backend import fp32_math

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    tf32 = fp32_math() if device.startswith("cuda") else contextlib.nullcontext()
    with torch.device(device), torch.no_grad(), tf32:
        if precision == "fp32":
            yield
        elif precision in dtypes:
            with torch.autocast(device_type=device, dtype=dtypes[precision]):
                yield
        else:
            raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")


def make_peer(
    name: str, spec: FeatureSpec, sd: dict[str, torch.Tensor], device: str, precision: str
) -> PeerFn:
    """A callable computing peer `name`'s outputs for one uint8 [N, H, W, 3] batch: the
    reference computes what the engine of `spec` outputs (heatmaps too if it has them), naive
    and captum the features only, torch-forward the ORIG features."""
    if name in ("naive", "captum"):  # no heatmaps: neither computes gamma-hat maps
        spec = replace(spec, heatmaps=False)
    sd = {k: v.to(device) for k, v in sd.items()}
    net = _Network(spec, sd) if name == "captum" else None  # built once, outside the timing
    compute: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
        "reference": lambda x: reference_features(spec, sd, x),
        "naive": lambda x: naive_features(spec, sd, x),
        "captum": lambda x: captum_features(spec, net, x),
        "torch-forward": lambda x: reference_features(forward_spec(spec), sd, x),
    }
    if name not in compute:
        raise ValueError(f"unknown peer {name!r}: expected one of {', '.join(PEERS)}")
    fn = compute[name]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images).to(device)
        with precision_scope(device, precision):
            out = fn(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}  # .cpu() syncs a GPU

    return run


def forward_spec(spec: FeatureSpec) -> FeatureSpec:
    """The same network and layers with no backward pass (the ORIG features)."""
    return replace(spec, config=FORWARD_CONFIG, heatmaps=False)


def activeness_feature(x_t: torch.Tensor, g: torch.Tensor, u: Unit) -> torch.Tensor:
    """export/ALGORITHM.md section 5: mean over space of X_t * gamma_t.

    `g` is dlnf/dX_t when the next unit `u` is a pool (switch * |dlnf/dX_u| = |dlnf/dX_t|), and
    g_u = dlnf/dz_u when it is a conv or fc unit.
    """
    if u.is_pool:
        return (x_t * g.abs()).mean(dim=(2, 3))
    ones = torch.ones(1, 1, u.kernel, u.kernel, dtype=g.dtype, device=g.device)
    gamma = F.conv_transpose2d(g.abs().sum(dim=1, keepdim=True), ones, padding=u.padding)
    return (x_t * gamma).mean(dim=(2, 3))


def _interactive_only(spec: FeatureSpec) -> None:
    if not spec.interactive or spec.config != "last":
        raise ValueError(f"this peer computes config 'last' only, not {spec.config!r}")


def naive_features(
    spec: FeatureSpec, sd: dict[str, torch.Tensor], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One forward pass with autograd on, then one backward pass per layer (config `last`)."""
    _interactive_only(spec)
    all_units = spec.units
    with torch.enable_grad():
        x = normalise(images).requires_grad_(True)
        maps, pre = [], {}
        for i, u in enumerate(all_units):
            if u.is_pool:
                x = apply_unit(u, x, sd)
            else:
                w, b = conv_weights(sd, u)
                pre[i] = F.conv2d(x, w, b, padding=u.padding)
                x = F.relu(pre[i])
            maps.append(x)
        s = score(maps[-1], spec.p)
        out = {}
        for t in spec.layers:
            i = spec.index(t)
            u = all_units[i + 1]
            wrt = maps[i] if u.is_pool else pre[i + 1]
            (g,) = torch.autograd.grad(s, wrt, retain_graph=True)
            out[t] = activeness_feature(maps[i].detach(), g, u)
    return out


class _Network(nn.Module):
    """The units as modules (conv and ReLU apart, so Captum can hook z_u and X_t) -> score."""

    def __init__(self, spec: FeatureSpec, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        _interactive_only(spec)
        self.p = spec.p
        self.outputs = nn.ModuleList()  # module whose output is X_i, per unit
        self.convs: dict[int, nn.Module] = {}  # module whose output is z_i, per conv/fc unit
        layers: list[nn.Module] = []
        for i, u in enumerate(spec.units):
            if u.is_pool:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                w, b = conv_weights(sd, u)
                conv = skip_init(
                    nn.Conv2d, u.in_channels, u.out_channels, u.kernel, padding=u.padding
                )
                conv.weight, conv.bias = nn.Parameter(w), nn.Parameter(b)
                self.convs[i] = conv
                layers += [conv, nn.ReLU()]
            self.outputs.append(layers[-1])
        self.body = nn.Sequential(*layers).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ln f per image [N] (the attribution target)."""
        top = self.body(x)
        return -(top.mean(dim=(2, 3)).abs() ** self.p).sum(dim=1)


def captum_features(spec: FeatureSpec, net: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `last` features through Captum (see the module docstring for what it cannot say)."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    all_units = spec.units
    x = normalise(images)
    pool_next = [t for t in spec.layers if all_units[spec.index(t) + 1].is_pool]
    conv_next = [t for t in spec.layers if t not in pool_next]
    out: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        if pool_next:
            modules = [net.outputs[spec.index(t)] for t in pool_next]
            gxa = LayerGradientXActivation(net, modules).attribute(x)
            for t, a in zip(pool_next, gxa, strict=True):
                out[t] = a.abs().mean(dim=(2, 3))  # X_t >= 0: |X_t * g| = X_t * |g|
        if conv_next:
            below = [net.outputs[spec.index(t)] for t in conv_next]
            above = [net.convs[spec.index(t) + 1] for t in conv_next]
            grads = LayerGradientXActivation(net, above, multiply_by_inputs=False).attribute(x)
            acts = LayerActivation(net, below).attribute(x)
            for t, g, a in zip(conv_next, grads, acts, strict=True):
                out[t] = activeness_feature(a, g, all_units[spec.index(t) + 1])
    return {t: out[t].detach() for t in spec.layers}
