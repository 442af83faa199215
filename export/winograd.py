"""3x3 convolutions (stride 1, padding 1) as Winograd minimal filtering, F(2x2,3x3) and
F(4x4,3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), written
with ordinary tensor ops so that they export to plain ONNX (Conv, Transpose, MatMul).

    Y = A^T [ (G g G^T) . (B^T d B) ] A   per m x m output tile, a = m + 2 input tile

Layout: the input transform is one strided convolution of every channel alone (channels moved
into the batch, the a*a tiles of B^T (x) B^T as its kernels), transposed to frequency-major
`[a*a, N, C, P]` (P tiles), so that the channel contraction is ONE batched MatMul
`[a*a, 1, K, C] @ [a*a, N, C, P]`; the output transform is a MatMul by A^T (x) A^T and a
depth-to-space transpose. (36 strided Slices and a Concat for the tiles measured 3x slower.)

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
    """[K, C, 3, 3] -> U [a*a, 1, K, C], U = G g G^T per (K, C) pair, computed in float64 and
    rounded once to the weight's dtype."""
    g = matrix(m, "G")
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g)
    a = m + 2
    return u.reshape(a * a, 1, *weight.shape[:2]).to(weight.dtype).contiguous()


def transform_kernels(m: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The Kronecker products the graph multiplies by: `bt` (B^T (x) B^T) for the input tiles,
    as a*a convolution kernels [a*a, 1, a, a]; `at` (A^T (x) A^T, [m*m, a*a]) for the output."""
    bt, at = matrix(m, "BT"), matrix(m, "AT")
    a = m + 2
    input_kernels = torch.kron(bt, bt).reshape(a * a, 1, a, a)
    return {"bt": input_kernels.to(dtype), "at": torch.kron(at, at).to(dtype)}


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
    cropped back."""
    n, c, h, w = x.shape
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    # The input transform as one convolution of every channel alone (channels moved into the
    # batch): kernel f is B^T's tile f, stride m, so output [N*C, a*a, th, tw]; then frequency
    # first for the batched MatMul.
    pads = (1, tw * m + 1 - w, 1, th * m + 1 - h)
    d = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), pads), bt, stride=m)
    v = d.reshape(n, c, a * a, th * tw).permute(2, 0, 1, 3)
    k = u.shape[2]
    prod = torch.matmul(u, v)  # [a*a, N, K, P]
    y = (at @ prod.reshape(a * a, -1)).reshape(m, m, n, k, th, tw)
    y = y.permute(2, 3, 4, 0, 5, 1).reshape(n, k, th * m, tw * m)
    if th * m != h or tw * m != w:
        y = y[:, :, :h, :w]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


# The `auto` plan: which steps are written as Winograd, from `python -m
# interactive_features.bench.winograd --bucket 512x512` (bench/RESULTS.md, "Winograd"). Measured
# on one machine class: AMD EPYC, 2 threads, AVX-512, onnxruntime 1.32 CPU. A backward step (the
# flipped-kernel conv) of c_in -> c_out channels qualifies when both are at least
# AUTO_MIN_CHANNELS: at 256 channels and 128x128 maps the transforms' memory passes cost more than
# the 2.25-4x fewer multiplies save; from 512 channels on, F(4,3) wins (1.3-1.7x).
# Forward steps stay direct: Winograd's rounding differs between the positions of a tile, so equal
# activations (flat image regions) stop being equal and the 2x2 pools' first-maximum switches and
# the ReLU masks move away from the reference's (full-width 224x224 engine: 3.6e-4 from the
# reference with forward Winograd, 1.9e-4 backward-only, as direct). The backward is linear in the
# gradient and its masks and switches come from the forward maps, so it stays exact.
AUTO_MIN_CHANNELS = 512
AUTO_TILE = "f4"
AUTO_DIRECTIONS = ("backward",)
AUTO_MACHINE = "AMD EPYC, 2 threads, AVX-512, onnxruntime 1.32 CPU"


def _auto_mode(direction: str, c_in: int, c_out: int) -> str:
    wins = direction in AUTO_DIRECTIONS and min(c_in, c_out) >= AUTO_MIN_CHANNELS
    return AUTO_TILE if wins else "direct"


def conv_plan(spec: FeatureSpec, conv: str, backward: list[int]) -> dict[str, dict[str, str]]:
    """{unit: {"forward": mode, "backward": mode}} for the 3x3 convs written as Winograd, by the
    export setting `conv` (runtime/settings.py CONV_MODES): `direct` none, `f2`/`f4` every 3x3
    step, `auto` the measured rule above (backward steps only). `backward`: the units whose
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
