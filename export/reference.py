"""The autograd reference: ORIG and InterActive features exactly as export/ALGORITHM.md states them.

It is the oracle of every test and the baseline of the benchmark, so it favours obviousness over
speed: a plain forward pass, `torch.autograd.grad` for every gradient (one backward pass for all
layers under config `last`), and the collection rule of section 5 written out literally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import FeatureSpec, Unit, conv_weights, heatmap_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> float32 [N, 3, H, W], /255 then ImageNet mean/std (section 2.3)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    # on the images' device: the torch backend normalises on the GPU
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def apply_unit(u: Unit, x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """One unit's post-ReLU output (or pooled output)."""
    if u.is_pool:
        return F.max_pool2d(x, 2, 2)
    w, b = conv_weights(sd, u)
    return F.relu(F.conv2d(x, w, b, padding=u.padding))


def score(x_top: torch.Tensor, p: int) -> torch.Tensor:
    """ln f (up to its constant), summed over the batch: images do not interact."""
    return -(x_top.mean(dim=(2, 3)).abs() ** p).sum()


def reference_features(
    spec: FeatureSpec, sd: dict[str, torch.Tensor], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Features [N, D_t] (and heatmaps [N, H_t, W_t] if spec.heatmaps) for uint8 [N, H, W, 3]."""
    all_units = spec.units
    acts: list[torch.Tensor] = []
    x = normalise(images)
    with torch.no_grad():
        for u in all_units[: spec.deepest_index() + 1]:
            x = apply_unit(u, x, sd)
            acts.append(x)
    if spec.config == "orig-avg":
        return {t: acts[spec.index(t)].mean(dim=(2, 3)) for t in spec.layers}
    if spec.config == "orig-max":
        return {t: acts[spec.index(t)].amax(dim=(2, 3)) for t in spec.layers}
    groups: dict[int, list[str]] = {}
    for t in spec.layers:
        groups.setdefault(spec.top_index(t), []).append(t)
    out: dict[str, torch.Tensor] = {}
    for top, layers in groups.items():
        out.update(_interactive_group(spec, sd, acts, top, layers))
    return {name: out[name] for name in spec.output_names()}


def _interactive_group(
    spec: FeatureSpec,
    sd: dict[str, torch.Tensor],
    acts: list[torch.Tensor],
    top: int,
    layers: list[str],
) -> dict[str, torch.Tensor]:
    """Layers that share the top unit `top`: recompute from the lowest one with autograd on."""
    all_units = spec.units
    low = min(spec.index(t) for t in layers)
    with torch.enable_grad():
        maps = {low: acts[low].detach().requires_grad_(True)}
        pre: dict[int, torch.Tensor] = {}  # pre-activations z_u of conv/fc units
        for i in range(low + 1, top + 1):
            u = all_units[i]
            if u.is_pool:
                maps[i] = F.max_pool2d(maps[i - 1], 2, 2)
            else:
                w, b = conv_weights(sd, u)
                pre[i] = F.conv2d(maps[i - 1], w, b, padding=u.padding)
                maps[i] = F.relu(pre[i])
        # d lnf / d z_u for a conv/fc next unit; d lnf / d X_t for a pool next unit, which is
        # exactly switch * d lnf / d X_u (max_pool2d routes to its first maximum).
        wrt = []
        for t in layers:
            i = spec.index(t)
            wrt.append(maps[i] if all_units[i + 1].is_pool else pre[i + 1])
        grads = torch.autograd.grad(score(maps[top], spec.p), wrt)
    out: dict[str, torch.Tensor] = {}
    for t, g in zip(layers, grads, strict=True):
        i = spec.index(t)
        u = all_units[i + 1]
        x_t = maps[i].detach()
        if u.is_pool:
            gamma = g.abs()  # [N, D, H, W]
        else:
            ones = torch.ones(1, 1, u.kernel, u.kernel)
            gamma = F.conv_transpose2d(g.abs().sum(dim=1, keepdim=True), ones, padding=u.padding)
            gamma = gamma.expand_as(x_t)  # the same for every channel d
        out[t] = (x_t * gamma).mean(dim=(2, 3))
        if spec.heatmaps:
            out[heatmap_name(t)] = gamma.sum(dim=1)
    return out
