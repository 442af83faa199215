"""The analytic InterActive graph: forward pass, top-down backward pass and activeness collection
written with ordinary tensor ops (no autograd), so that it exports to one static ONNX graph per
bucket and runs unchanged as the torch backend.

Backward rules (export/ALGORITHM.md section 4): a conv/fc unit masks its incoming gradient with
its ReLU (`X_u > 0` is the same mask as `z_u > 0`) and passes it down with a transposed
convolution that reuses the forward kernel (no second copy of the weights); a pool unit routes
each gradient to the first maximum of its 2x2 window, found with a space-to-depth reshape and
ArgMax.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .reference import normalise
from .spec import FeatureSpec, conv_weights, heatmap_name
from .winograd import TILES, tile_of, transform_kernels, transformed_weights, winograd_conv3x3

# Buffers that hold weights (cast to the compute dtype of a reduced-precision engine); the box
# kernels and window indices stay as they are.
WEIGHT_SUFFIXES = (
    "_weight",
    "_bias",
    "_weight_flipped",
    *(f"_winograd_{mode}{flip}" for mode in TILES for flip in ("", "_flipped")),
)


def buffer_key(unit_name: str, what: str) -> str:
    """The graph's buffer for a unit's `what` ("weight", "bias", "weight_flipped").

    The ONNX exporter keeps buffer names, so this is also the initializer's name in an engine's
    graphs and weights table, e.g. `conv_3_2_weight`.
    """
    return f"{unit_name.replace('-', '_')}_{what}"


def state_dict_from_buffers(
    spec: FeatureSpec, buffers: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The torchvision-layout weights AnalyticGraph needs, from tensors named like its buffers
    (an exported engine's initializers). Raises KeyError naming the first missing tensor."""
    state_dict: dict[str, torch.Tensor] = {}
    for u in spec.units[: spec.deepest_index() + 1]:
        if u.is_pool:
            continue
        for what in ("weight", "bias"):
            key = buffer_key(u.name, what)
            if key not in buffers:
                raise KeyError(f"no tensor {key!r} for {u.name}")
            state_dict[f"{u.weight_key}.{what}"] = buffers[key]
    return state_dict


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """x as float32; x itself when it already is (so fp32 graphs record no Cast)."""
    return x if x.dtype == torch.float32 else x.float()


def window_switches(x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H/2, W/2, 4]: one-hot of each 2x2 window's first maximum."""
    _, c, h, w = x.shape
    windows = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
    first_max = windows.reshape(-1, c, h // 2, w // 2, 4).argmax(dim=-1, keepdim=True)
    return (first_max == window_index).to(x.dtype)


def route_to_switches(grad: torch.Tensor, switches: torch.Tensor) -> torch.Tensor:
    """Place [N, C, h, w] gradients on the switches [N, C, h, w, 4]: returns [N, C, 2h, 2w]."""
    _, c, h, w = grad.shape
    routed = (switches * grad.unsqueeze(-1)).reshape(-1, c, h, w, 2, 2)
    return routed.permute(0, 1, 2, 4, 3, 5).reshape(-1, c, 2 * h, 2 * w)


def backward_convs(spec: FeatureSpec) -> list[int]:
    """Conv/fc units whose gradient is passed further down (config `last` only): the units whose
    transposed convolution the backward pass runs."""
    if spec.config != "last":
        return []
    low = min(spec.index(t) for t in spec.layers)
    return [i for i in range(low + 2, spec.deepest_index() + 1) if not spec.units[i].is_pool]


class AnalyticGraph(nn.Module):
    """uint8 [N, H, W, 3] RGB -> one float32 [N, D_t] per requested layer (then heatmaps).

    `seed_scale` multiplies the top gradient and divides the outputs, so that reduced-precision
    engines do not underflow (export/ALGORITHM.md section 6); gamma is linear in the seed.
    `cast_weights(torch.float16)` runs the convolutions in half precision; the activeness
    collection (channel sums, box sums, means, the division by `seed_scale`) stays float32.
    `winograd` ({unit: {"forward" | "backward": "f2" | "f4"}}, export/winograd.py conv_plan)
    writes those 3x3 steps as Winograd convolutions, their transformed kernels precomputed as
    buffers (`conv_4_2_winograd_f4`, `..._f4_flipped` for the backward); the rest stay direct.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        state_dict: dict[str, torch.Tensor],
        seed_scale: float = 1.0,
        flipped_backward: bool = True,
        winograd: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.units = spec.units
        self.seed_scale = float(seed_scale)
        self.deepest = spec.deepest_index()
        self.requested = {spec.index(t): t for t in spec.layers}
        self.low = min(self.requested)
        self.register_buffer("window_index", torch.arange(4))
        for i, u in enumerate(self.units[: self.deepest + 1]):
            if not u.is_pool:
                w, b = conv_weights(state_dict, u)
                self.register_buffer(self._key(i, "weight"), w)
                self.register_buffer(self._key(i, "bias"), b)
        self.winograd = {
            self.spec.index(name): {d: tile_of(mode) for d, mode in steps.items()}
            for name, steps in (winograd or {}).items()
        }
        for i, steps in sorted(self.winograd.items()):
            self._register_winograd(i, steps)
        # The 3x3 backward steps as convolutions with flipped, transposed kernels: faster than
        # ConvTranspose in ONNX Runtime (bench/RESULTS.md) for one extra copy of those weights
        # (56 MB for VGG-16; fc-6/fc-7 keep ConvTranspose, whose copies would cost 470 MB).
        self.flipped = {
            i
            for i in backward_convs(spec)
            if flipped_backward
            and self.units[i].kernel == 3
            and "backward" not in self.winograd.get(i, {})
        }
        for i in sorted(self.flipped):
            w = self._param(i, "weight")
            self.register_buffer(
                self._key(i, "weight_flipped"), w.flip(2, 3).transpose(0, 1).contiguous()
            )
        for k in sorted({u.kernel for u in self.units if u.kernel > 1}):
            self.register_buffer(f"box_{k}x{k}", torch.ones(1, 1, k, k))

    def _register_winograd(self, i: int, steps: Mapping[str, int]) -> None:
        """The transformed kernels of unit i's Winograd steps, and each tile size's transforms."""
        if self.units[i].kernel != 3:
            raise ValueError(f"{self.units[i].name}: Winograd needs a 3x3 convolution")
        w = self._param(i, "weight")
        for direction, m in steps.items():
            if direction == "forward":
                self.register_buffer(self._key(i, f"winograd_f{m}"), transformed_weights(w, m))
            elif direction == "backward":
                flipped = w.flip(2, 3).transpose(0, 1)
                u = transformed_weights(flipped, m)
                self.register_buffer(self._key(i, f"winograd_f{m}_flipped"), u)
            else:
                raise ValueError(f"{self.units[i].name}: unknown step {direction!r}")
            for name, value in transform_kernels(m).items():
                if not hasattr(self, f"winograd_f{m}_{name}"):
                    self.register_buffer(f"winograd_f{m}_{name}", value)

    def _winograd(self, i: int, x: torch.Tensor, direction: str) -> torch.Tensor:
        """Unit i's forward (with bias) or backward step as a Winograd convolution."""
        m = self.winograd[i][direction]
        flip = "_flipped" if direction == "backward" else ""
        u = self._param(i, f"winograd_f{m}{flip}")
        bt, at = getattr(self, f"winograd_f{m}_bt"), getattr(self, f"winograd_f{m}_at")
        bias = self._param(i, "bias") if direction == "forward" else None
        return winograd_conv3x3(x, u, bt.to(x.dtype), at.to(x.dtype), m, bias)

    def _key(self, i: int, what: str) -> str:
        return buffer_key(self.units[i].name, what)

    def cast_weights(self, dtype: torch.dtype) -> AnalyticGraph:
        """Hold the weights in `dtype`; the input is cast to it after normalisation."""
        for name, value in list(self.named_buffers()):
            if name.endswith(WEIGHT_SUFFIXES):
                setattr(self, name, value.to(dtype))
        return self

    def _param(self, i: int, what: str) -> torch.Tensor:
        return getattr(self, self._key(i, what))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = normalise(images)  # the reference's own arithmetic, so both see the same pixels
        compute_dtype = self._param(0, "weight").dtype
        if x.dtype != compute_dtype:  # reduced-precision engines only: fp32 graphs are unchanged
            x = x.to(compute_dtype)
        maps: dict[int, torch.Tensor] = {}
        keep = self._kept_maps()
        for i, u in enumerate(self.units[: self.deepest + 1]):
            if u.is_pool:
                x = F.max_pool2d(x, 2, 2)
            elif "forward" in self.winograd.get(i, {}):
                x = F.relu(self._winograd(i, x, "forward"))
            else:
                x = F.relu(
                    F.conv2d(x, self._param(i, "weight"), self._param(i, "bias"), padding=u.padding)
                )
            if i in keep:
                maps[i] = x
        out: dict[str, torch.Tensor] = {}
        if self.spec.config == "orig-avg":
            out = {t: full_precision(maps[i]).mean(dim=(2, 3)) for i, t in self.requested.items()}
        elif self.spec.config == "orig-max":
            out = {t: full_precision(maps[i].amax(dim=(2, 3))) for i, t in self.requested.items()}
        elif self.spec.config == "last":
            self._backward_from(self.deepest, maps, out)
        else:  # next: each layer's score sits on the unit right above it; no deep backward
            for i in sorted(self.requested):
                self._backward_from(i + 1, maps, out)
        return tuple(out[name] for name in self.spec.output_names())

    def _kept_maps(self) -> set[int]:
        if not self.spec.interactive:
            return set(self.requested)
        if self.spec.config == "next":
            return set(self.requested) | {i + 1 for i in self.requested}
        return set(range(self.low, self.deepest + 1))

    def _seed(self, x_top: torch.Tensor) -> torch.Tensor:
        """d lnf / d X_T, [N, D, 1, 1] (the same at every position), times seed_scale."""
        positions = x_top.shape[2] * x_top.shape[3]
        mean = x_top.mean(dim=(2, 3), keepdim=True)
        slope = 2.0 * mean if self.spec.p == 2 else torch.sign(mean)
        return slope * (-self.seed_scale / positions)

    def _backward_from(
        self, top: int, maps: dict[int, torch.Tensor], out: dict[str, torch.Tensor]
    ) -> None:
        """Go down from `top`, collecting every requested layer met on the way.

        Under `next` only the unit right above one layer is visited (the loop stops at `low`
        because that layer is the only one below `top`).
        """
        low = top - 1 if self.spec.config == "next" else self.low
        grad = self._seed(maps[top])  # d lnf / d X_i for the unit i being visited
        for i in range(top, low, -1):
            u = self.units[i]
            if u.is_pool:
                if i - 1 in self.requested:
                    self._collect_below_pool(i, grad, maps, out)
                if i - 1 > low:
                    grad = route_to_switches(grad, window_switches(maps[i - 1], self.window_index))
            else:
                # The ReLU mask as a multiply: ONNX Runtime's Where is about 6x slower than
                # Greater + Cast + Mul on the CPU (7% of the whole engine at 512x512), and Sign
                # + Mul (one pass fewer) measured 1.7x slower than the three (bench/RESULTS.md).
                g = grad * (maps[i] > 0).to(grad.dtype)
                if i - 1 in self.requested:
                    self._collect_below_conv(i, g, maps, out)
                if i - 1 > low:
                    grad = self._down_through(i, g)

    def _down_through(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """d lnf / d X_{i-1} from the masked gradient g of conv/fc unit i."""
        u = self.units[i]
        if "backward" in self.winograd.get(i, {}):
            return self._winograd(i, g, "backward")
        if i in self.flipped:
            padding = u.kernel - 1 - u.padding
            return F.conv2d(g, self._param(i, "weight_flipped"), padding=padding)
        return F.conv_transpose2d(g, self._param(i, "weight"), padding=u.padding)

    def _collect_below_conv(
        self, i: int, g: torch.Tensor, maps: dict[int, torch.Tensor], out: dict[str, torch.Tensor]
    ) -> None:
        """Layer i-1 under conv/fc unit i: gamma = KxK box sum of sum_d' |g_u| (section 5)."""
        u, t = self.units[i], self.requested[i - 1]
        x_t = full_precision(maps[i - 1])
        gamma = full_precision(g).abs().sum(dim=1, keepdim=True)
        if u.kernel > 1:
            box = getattr(self, f"box_{u.kernel}x{u.kernel}")
            gamma = F.conv_transpose2d(gamma, box, padding=u.padding)
        out[t] = (x_t * gamma).mean(dim=(2, 3)) / self.seed_scale
        if self.spec.heatmaps:
            out[heatmap_name(t)] = gamma[:, 0] * (x_t.shape[1] / self.seed_scale)

    def _collect_below_pool(
        self,
        i: int,
        grad: torch.Tensor,
        maps: dict[int, torch.Tensor],
        out: dict[str, torch.Tensor],
    ) -> None:
        """Layer i-1 under pool unit i: gamma = switch * |d lnf / d X_u|.

        Where the switch is on, X_t equals the pooled value X_u, so the feature needs no switches:
        sum over the pooled map of X_u * |grad|, divided by the positions of the layer below.
        """
        t = self.requested[i - 1]
        x_t, x_u = maps[i - 1], full_precision(maps[i])
        magnitude = full_precision(grad).abs().expand_as(x_u)
        positions = x_t.shape[2] * x_t.shape[3]
        out[t] = (x_u * magnitude).sum(dim=(2, 3)) / (positions * self.seed_scale)
        if self.spec.heatmaps:
            # half switches times float32 magnitudes: float32 by type promotion
            gamma = route_to_switches(magnitude, window_switches(x_t, self.window_index))
            out[heatmap_name(t)] = gamma.sum(dim=1) / self.seed_scale
