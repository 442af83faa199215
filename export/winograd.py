"""3x3 convolutions (stride 1, padding 1) as Winograd minimal filtering, F(2x2,3x3) and
F(4x4,3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), written
with ordinary tensor ops so that they export to plain ONNX (Conv, Transpose, MatMul).

    Y = A^T [ (G g G^T) . (B^T d B) ] A   per m x m output tile, a = m + 2 input tile

Layout (`winograd_conv3x3`): no transposes. The channel planes are stacked into one tall image,
so that one strided convolution by the a*a tiles of B^T (x) B^T writes frequency-major
`[N, a*a, C, P]` (P tiles); the channel contraction is ONE batched MatMul
`[1, a*a, K, C] @ [N, a*a, C, P]`; the output transform one transposed convolution by the tiles
of A^T (x) A^T with stride m. (The first designs moved channels into the batch and transposed
to frequency-major and back: 20-25% slower at 256 channels @ 128x128; 36 strided Slices and a
Concat for the tiles: 3x slower.)

The weight transform U = G g G^T is precomputed at export time (`transformed_weights`) and stored
as its own initializer, shared by all buckets like every weight (computing it in the graph would
be constant-folded by ONNX Runtime into a private copy per session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .spec import FeatureSpec

# The layout of the stored kernels and of the graph's steps, recorded in the manifest
# (`winograd_layout`): 2 is `winograd_conv3x3`'s tall image (U [1, a*a, K, C], output kernels
# [a*a, 1, m, m]); 1 (engines of 2026-12-01, no record) moved channels into the batch.
LAYOUT = 2

# Tile sizes: F(m x m, 3 x 3) for m in TILES; "f2" and "f4" name them in settings and manifests.
TILES = {"f2": 2, "f4": 4}

# Lavin and Gray's matrices; F(4,3) with the interpolation points 0, +-1, +-2.
_F2 = {
    "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    "G": [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
}
_F4 = {
    "BT": [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    "G": [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    "AT": [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
}
_MATRICES = {2: _F2, 4: _F4}


def tile_of(mode: str) -> int:
    """The output tile m of a Winograd mode ("f2" -> 2, "f4" -> 4)."""
    if mode not in TILES:
        raise ValueError(f"unknown Winograd mode {mode!r}: expected one of {', '.join(TILES)}")
    return TILES[mode]


def matrix(m: int, name: str) -> torch.Tensor:
    """B^T, G or A^T of F(m, 3) in float64 (exact for these small rationals)."""
    return torch.tensor(_MATRICES[m][name], dtype=torch.float64)


def transformed_weights(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[K, C, 3, 3] -> U [1, a*a, K, C], U = G g G^T per (K, C) pair, computed in float64 and
    rounded once to the weight's dtype. (The leading 1 broadcasts over the batch.)"""
    g = matrix(m, "G")
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g)
    a = m + 2
    return u.reshape(1, a * a, *weight.shape[:2]).to(weight.dtype).contiguous()


def transform_kernels(m: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The Kronecker products the graph multiplies by, as convolution kernels: `bt` (B^T (x) B^T,
    [a*a, 1, a, a]) for the input tiles, `at` (A^T (x) A^T, [a*a, 1, m, m]) for the output tiles
    (a transposed convolution with stride m: tile f's contribution to each output pixel)."""
    bt, at = matrix(m, "BT"), matrix(m, "AT")
    a = m + 2
    input_kernels = torch.kron(bt, bt).reshape(a * a, 1, a, a)
    output_kernels = torch.kron(at, at).T.reshape(a * a, 1, m, m)
    return {"bt": input_kernels.to(dtype), "at": output_kernels.contiguous().to(dtype)}


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    bt: torch.Tensor,
    at: torch.Tensor,
    m: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) for x [N, C, H, W], with u = transformed_weights(g, m) and
    bt, at = transform_kernels(m). Any H, W: the map is padded up to whole tiles and the output
    cropped back.

    Every op reads its input in the layout the previous one wrote (no transposes): the C channel
    planes, padded to a whole number of tile rows plus one, are stacked into one tall image, so
    that one strided convolution by B^T's tiles writes frequency-major [N, a*a, C, tiles] (each
    plane's extra tile row straddles into the next plane and is dropped at the end). The channel
    contraction is one batched MatMul per frequency; the output transform one transposed
    convolution with stride m, which writes the tiles back in place.
    """
    n, c, h, w = x.shape
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    plane = m * (th + 1)  # th tile rows and the straddling one, a multiple of the stride
    pads = (1, tw * m + 1 - w, 1, plane - h - 1)
    tall = F.pad(x, pads).reshape(n, 1, c * plane, tw * m + 2)
    # a - m more rows at the bottom give the last plane's straddling row too: C * (th + 1) rows.
    d = F.conv2d(F.pad(tall, (0, 0, 0, a - m)), bt, stride=m)
    v = d.reshape(n, a * a, c, (th + 1) * tw)
    k = u.shape[2]
    prod = torch.matmul(u, v).reshape(n, a * a, k * (th + 1), tw)  # [N, a*a, K, tiles]
    y = F.conv_transpose2d(prod, at, stride=m).reshape(n, k, plane, tw * m)
    y = y[:, :, :h, :w]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


# The `auto` plan: which steps are written as Winograd, from `python -m
# interactive_features.bench.winograd --bucket 512x512` (bench/RESULTS.md, "Winograd"). Measured
# on one machine class: AMD EPYC, 2 threads, AVX-512, onnxruntime 1.32 CPU. A step (forward, or
# the backward's flipped-kernel conv) qualifies when one side has at least AUTO_MIN_CHANNELS
# channels: from conv-3-1 (128 -> 256 @ 128x128) down, F(4,3) measured 1.4-4x the direct Conv;
# at 128 -> 128 @ 256x256 and above (fewer channels, larger maps) the transforms' memory passes
# cost what the fewer multiplies save (0.7-1.05x). F(2,3) and F(4,3) tie at 32x32; F(4,3) wins
# elsewhere, so `auto` uses it throughout. Winograd's rounding differs between the positions of
# a tile, so on flat image regions a forward map's equal activations may stop being equal and a
# 2x2 pool's first-maximum switch move: the features stay within the fp32 tolerance of the
# autograd reference (measured per layer at export, and in bench/RESULTS.md), not bit-close to
# the direct engine.
AUTO_MIN_CHANNELS = 256
AUTO_TILE = "f4"
AUTO_DIRECTIONS = ("forward", "backward")
AUTO_MACHINE = "AMD EPYC, 2 threads, AVX-512, onnxruntime 1.32 CPU"


def _auto_mode(direction: str, c_in: int, c_out: int) -> str:
    wins = direction in AUTO_DIRECTIONS and max(c_in, c_out) >= AUTO_MIN_CHANNELS
    return AUTO_TILE if wins else "direct"


def conv_plan(spec: FeatureSpec, conv: str, backward: list[int]) -> dict[str, dict[str, str]]:
    """{unit: {"forward": mode, "backward": mode}} for the 3x3 convs written as Winograd, by the
    export setting `conv` (runtime/settings.py CONV_MODES): `direct` none, `f2`/`f4` every 3x3
    step, `auto` the measured rule above. `backward`: the units whose
    backward step the graph runs (export/graph.py backward_convs). Units with no Winograd step
    are left out."""
    plan: dict[str, dict[str, str]] = {}
    if conv == "direct":
        return plan
    for i, u in enumerate(spec.units[: spec.deepest_index() + 1]):
        if u.kernel != 3:
            continue
        steps = {"forward": (u.in_channels, u.out_channels)}
        if i in backward:
            steps["backward"] = (u.out_channels, u.in_channels)
        modes = {d: conv if conv in TILES else _auto_mode(d, *ch) for d, ch in steps.items()}
        modes = {d: mode for d, mode in modes.items() if mode != "direct"}
        if modes:
            plan[u.name] = modes
    return plan
