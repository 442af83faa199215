"""The analytic graph (torch) against the autograd reference: every arch, config, p, shape."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from interactive_features.export.graph import AnalyticGraph, route_to_switches, window_switches
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec, load_state_dict, units

from conftest import NARROW, assert_close

STATE_DICTS: dict[str, dict[str, torch.Tensor]] = {}


def state_dict(arch: str) -> dict[str, torch.Tensor]:
    if arch not in STATE_DICTS:
        STATE_DICTS[arch] = load_state_dict("random:3", arch, NARROW)
    return STATE_DICTS[arch]


def run_both(spec: FeatureSpec, images: torch.Tensor) -> tuple[dict, dict]:
    sd = state_dict(spec.arch)
    graph = AnalyticGraph(spec, sd)
    got = dict(zip(spec.output_names(), (t.numpy() for t in graph(images)), strict=True))
    return got, reference_features(spec, sd, images)


def random_images(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size[1], size[0], 3), dtype=torch.uint8, generator=gen)


def every_layer_below_top(arch: str) -> tuple[str, ...]:
    return tuple(u.name for u in units(arch)[:-1])


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("config", ["last", "next"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("size", [(256, 256), (288, 224)])
def test_interactive_matches_reference(arch: str, config: str, p: int, size: tuple) -> None:
    spec = FeatureSpec(arch, config, p, every_layer_below_top(arch), NARROW, heatmaps=True)
    got, want = run_both(
        spec, random_images(2, size, seed=zlib.crc32(f"{arch}{config}{p}{size}".encode()))
    )
    assert_close(got, want)


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("config", ["orig-avg", "orig-max"])
def test_orig_matches_reference(arch: str, config: str) -> None:
    layers = tuple(u.name for u in units(arch))  # fc-7 included: ORIG has no top unit
    spec = FeatureSpec(arch, config, 2, layers, NARROW)
    got, want = run_both(spec, random_images(2, (224, 288), seed=7))
    assert_close(got, want)


@pytest.mark.parametrize("layers", [("conv-1-1",), ("conv-4-2", "pool-1"), ("fc-6", "conv-2-2")])
@pytest.mark.parametrize("config", ["last", "next"])
def test_any_layer_subset(layers: tuple[str, ...], config: str) -> None:
    spec = FeatureSpec("vgg16", config, 2, layers, NARROW, heatmaps=True)
    got, want = run_both(spec, random_images(1, (256, 256), seed=11))
    assert list(got) == spec.output_names()
    assert_close(got, want)


def test_paper_layers_shapes() -> None:
    spec = FeatureSpec("vgg16", "last", 2, PAPER_LAYERS, NARROW, heatmaps=True)
    got, _ = run_both(spec, random_images(3, (288, 224), seed=1))
    for t in PAPER_LAYERS:
        assert got[t].shape == (3, spec.layer_dims()[t])
        w, h = spec.map_size(t, 288, 224)
        assert got[f"{t}.heatmap"].shape == (3, h, w)


def test_top_layer_is_refused_for_interactive_configs() -> None:
    with pytest.raises(ValueError, match="strictly below fc-7"):
        FeatureSpec("vgg16", "last", 2, ("fc-7",))
    with pytest.raises(ValueError, match="unknown layer"):
        FeatureSpec("vgg16", "last", 2, ("conv-5-4",))  # VGG-19 only


def tied_windows() -> torch.Tensor:
    """[1, 3, 4, 6] maps whose 2x2 windows hold every kind of tie (2, 3 and 4 equal maxima)."""
    x = torch.tensor(
        [
            [[1.0, 1.0, 2.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0, 5.0, 1.0]],
            [[0.0, 3.0, 7.0, 7.0, 0.0, 0.0], [3.0, 0.0, 1.0, 7.0, 0.0, 0.0]],
        ]
    ).reshape(1, 1, 4, 6)
    return torch.cat([x, x.flip(-1), x.flip(-2)], dim=1)


def test_switches_take_first_maximum_like_max_pool2d() -> None:
    x = tied_windows().requires_grad_(True)
    grad_out = torch.rand(1, 3, 2, 3) + 0.5
    (F.max_pool2d(x, 2, 2) * grad_out).sum().backward()
    routed = route_to_switches(grad_out, window_switches(x.detach(), torch.arange(4)))
    assert torch.equal(routed, x.grad)
    assert (x.grad != 0).sum() == 3 * 6  # exactly one position per window


def test_pool_ties_in_the_network_follow_first_maximum() -> None:
    """A constant image makes exactly tied windows inside conv-1-2's map (positive values)."""
    spec = FeatureSpec("vgg16", "last", 2, ("conv-1-2", "pool-1"), NARROW, heatmaps=True)
    images = torch.full((1, 256, 256, 3), 120, dtype=torch.uint8)
    sd = state_dict("vgg16")
    x = reference_features(FeatureSpec("vgg16", "orig-max", 2, ("conv-1-2",), NARROW), sd, images)
    assert x["conv-1-2"].min() > 0  # the tie is between positive values, not dead units
    got, want = run_both(spec, images)
    heat = want["conv-1-2.heatmap"][0]
    # interior windows are exact ties; the reference puts everything on their top-left corner
    interior = heat[8:-8, 8:-8]
    assert (interior[0::2, 0::2] > 0).all() and (interior[1::2, :] == 0).all()
    assert_close(got, want)
