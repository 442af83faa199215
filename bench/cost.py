"""FLOPs per image (export/ALGORITHM.md section 7), computed from the spec's unit table.

Forward: every conv/fc unit up to the deepest unit the features need. Backward: one transposed
convolution per conv/fc unit the gradient must cross on its way down from a top unit T to the
next unit of the lowest requested layer (that unit's own gradient g_u is all section 5 needs, so
nothing below it is computed). The gamma collection (a ones-kernel over summed |g_u|) and the
element-wise steps are left out: they are well under 1% of the MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

from interactive_features.export.spec import FeatureSpec


@dataclass(frozen=True)
class Cost:
    """Multiply-accumulates per image; one MAC is two FLOPs."""

    forward_mac: float
    backward_mac: float

    @property
    def mac(self) -> float:
        return self.forward_mac + self.backward_mac

    @property
    def flop(self) -> float:
        return 2 * self.mac

    def as_dict(self) -> dict[str, float]:
        return {
            "forward_gmac": self.forward_mac / 1e9,
            "backward_gmac": self.backward_mac / 1e9,
            "gflop": self.flop / 1e9,
        }


def unit_macs(spec: FeatureSpec, bucket: tuple[int, int]) -> list[float]:
    """MACs of each unit's forward pass for one (W, H) image (0 for pools)."""
    width, height = bucket
    out = []
    for u in spec.units:
        if u.is_pool:
            width, height = width // 2, height // 2
            out.append(0.0)
            continue
        width = width + 2 * u.padding - u.kernel + 1
        height = height + 2 * u.padding - u.kernel + 1
        out.append(float(width * height * u.in_channels * u.out_channels * u.kernel**2))
    return out


def backward_units(spec: FeatureSpec) -> set[int]:
    """Indices of the units whose transposed convolution the analytic backward pass runs."""
    if not spec.interactive:
        return set()
    groups: dict[int, int] = {}  # top unit -> lowest requested layer below it
    for t in spec.layers:
        top = spec.top_index(t)
        groups[top] = min(groups.get(top, top), spec.index(t))
    crossed: set[int] = set()
    for top, low in groups.items():
        # The gradient must reach X_{low+1} (the next unit's input side is not needed): cross
        # every unit j with low + 2 <= j <= top.
        crossed.update(range(low + 2, top + 1))
    return crossed


def cost_per_image(spec: FeatureSpec, bucket: tuple[int, int]) -> Cost:
    macs = unit_macs(spec, bucket)
    forward = sum(macs[: spec.deepest_index() + 1])
    backward = sum(macs[j] for j in backward_units(spec))
    return Cost(forward, backward)
