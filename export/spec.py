"""VGG-16/19 as a list of named units (export/ALGORITHM.md section 1), from torchvision-format
weights.

The spec table below drives everything: the autograd reference, the analytic graph and the exporter
all walk the same `Unit` list, so a layer name means the same tensor everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from interactive_features.runtime.manifest import EngineError, EngineManifest, heatmap_name
from interactive_features.runtime.settings import (
    ARCHS,
    INTERACTIVE_CONFIGS,
    PAPER_LAYERS,
    VGG_BLOCKS,
    ExportSettings,
    random_seed,
)

# Every conv is 3x3 with its block's width (the convs per block: VGG_BLOCKS), every block ends
# in a 2x2 max pool.
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
FC_WIDTH = 4096
IMAGENET_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


@dataclass(frozen=True)
class Unit:
    """One unit of the network: a conv/fc (with ReLU) or a 2x2 max pool."""

    name: str  # "conv-3-2", "pool-3", "fc-6"
    kind: str  # "conv" or "pool" ("fc" units are convs with kind "conv")
    in_channels: int
    out_channels: int
    kernel: int = 1
    padding: int = 0
    weight_key: str = ""  # torchvision state-dict prefix, e.g. "features.7"

    @property
    def is_pool(self) -> bool:
        return self.kind == "pool"


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    return arch


def units(arch: str, width_div: int = 1) -> list[Unit]:
    """The units of `arch` in order; `width_div` > 1 divides every width (narrow test networks)."""
    check_arch(arch)
    if width_div < 1 or 64 % width_div:
        raise ValueError(f"width_div must divide 64, got {width_div}")
    out: list[Unit] = []
    channels, module = 3, 0  # module: index in torchvision's `features` (conv, ReLU, ..., pool)
    for block, (convs, width) in enumerate(zip(VGG_BLOCKS[arch], BLOCK_WIDTHS, strict=True), 1):
        for index in range(1, convs + 1):
            key = f"features.{module}"
            out.append(
                Unit(f"conv-{block}-{index}", "conv", channels, width // width_div, 3, 1, key)
            )
            channels, module = width // width_div, module + 2
        out.append(Unit(f"pool-{block}", "pool", channels, channels))
        module += 1
    fc = FC_WIDTH // width_div
    out.append(Unit("fc-6", "conv", channels, fc, 7, 0, "classifier.0"))
    out.append(Unit("fc-7", "conv", fc, fc, 1, 0, "classifier.3"))
    return out


def unit_index(arch_units: list[Unit], name: str) -> int:
    for i, u in enumerate(arch_units):
        if u.name == name:
            return i
    raise ValueError(f"unknown layer {name!r}: expected one of {[u.name for u in arch_units]}")


def random_state_dict(arch: str, seed: int, width_div: int = 1) -> dict[str, torch.Tensor]:
    """Seeded weights in torchvision's layout and with torchvision's initialisation scheme.

    Biases get a small positive offset (torchvision uses zero) so that random networks keep most
    ReLUs alive through 16-19 layers; that makes tests sensitive to every layer.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for u in units(arch, width_div):
        if u.is_pool:
            continue
        if u.weight_key.startswith("features"):
            fan_out = u.out_channels * u.kernel * u.kernel
            std = (2.0 / fan_out) ** 0.5
            w = torch.randn(u.out_channels, u.in_channels, 3, 3, generator=gen) * std
        else:
            fan_in = u.in_channels * u.kernel * u.kernel
            w = torch.randn(u.out_channels, fan_in, generator=gen) * (2.0 / fan_in) ** 0.5
        sd[f"{u.weight_key}.weight"] = w
        sd[f"{u.weight_key}.bias"] = torch.rand(u.out_channels, generator=gen) * 0.02
    fc = FC_WIDTH // width_div
    sd["classifier.6.weight"] = torch.randn(1000, fc, generator=gen) * 0.01
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


def load_state_dict(weights: str, arch: str, width_div: int = 1) -> dict[str, torch.Tensor]:
    """Resolve `--weights`: a `.pth` path, `imagenet` (torch.hub cache) or `random:SEED`."""
    seed = random_seed(weights)
    if seed is not None:
        return random_state_dict(arch, seed, width_div)
    if weights == "imagenet":
        if width_div != 1:
            raise ValueError("the ImageNet weights are full width: drop the width divisor")
        sd = _imagenet_state_dict(arch)
        check_state_dict(sd, arch, width_div, f"--weights imagenet ({IMAGENET_URLS[arch]})")
        return sd
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"--weights {weights!r}: no such file (expected a .pth state dict, 'imagenet' or "
            "'random:SEED')"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, text, truncated, unreadable, not a torch file
        detail = " ".join(str(err).split())[:200] or "no detail"
        raise ValueError(
            f"--weights {weights!r}: cannot be read as a torch state dict "
            f"({type(err).__name__}: {detail})"
        ) from err
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"--weights {weights!r}: not a state dict (got {type(sd).__name__})")
    check_state_dict(sd, arch, width_div, f"--weights {weights!r}")
    return sd


def check_state_dict(
    sd: dict[str, torch.Tensor], arch: str, width_div: int = 1, source: str = "state dict"
) -> None:
    """Every tensor the network uses is there, is a tensor, and is finite: a ValueError naming
    `source` and the first tensor that is not (a NaN or an infinity in a weight makes every
    feature NaN)."""
    for u in units(arch, width_div):
        if u.is_pool:
            continue
        for key in (f"{u.weight_key}.weight", f"{u.weight_key}.bias"):
            value = sd.get(key)
            if value is None:
                raise ValueError(
                    f"{source}: the state dict lacks {key!r} (needed by {u.name}; a torchvision "
                    f"{arch} state dict has it)"
                )
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
            if value.is_floating_point():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    raise ValueError(
                        f"{source}: tensor {key!r} has {bad} NaN or infinite values of "
                        f"{value.numel()}; refusing to export it"
                    )


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    url = IMAGENET_URLS[arch]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except Exception as err:  # URLError, HTTPError, socket errors: all mean "offline"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        raise RuntimeError(
            f"could not download the ImageNet weights for {arch} from {url} ({err}). "
            f"On a machine without internet, download that file elsewhere and either copy it to "
            f"{cache} or pass it with --weights /path/to/{url.rsplit('/', 1)[1]}."
        ) from err


def conv_weights(sd: dict[str, torch.Tensor], u: Unit) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's weight as a conv kernel (fc-6 becomes 4096x512x7x7, fc-7 4096x4096x1x1)."""
    try:
        w, b = sd[f"{u.weight_key}.weight"], sd[f"{u.weight_key}.bias"]
    except KeyError as err:
        raise KeyError(f"state dict lacks {err.args[0]!r} needed by {u.name}") from err
    shape = (u.out_channels, u.in_channels, u.kernel, u.kernel)
    if w.numel() != shape[0] * shape[1] * shape[2] * shape[3]:
        raise ValueError(
            f"{u.weight_key}.weight has shape {tuple(w.shape)}, {u.name} needs {shape} "
            "(wrong arch or width?)"
        )
    return w.reshape(shape).float().contiguous(), b.float().contiguous()


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute: export/ALGORITHM.md sections 3-5 for one network and one set of layers.

    `config`: `last` (T = fc-7 for every layer), `next` (T = the unit after each layer), `orig-avg`
    or `orig-max` (no backward pass). `heatmaps` adds a gamma-hat output per layer.
    """

    arch: str = "vgg16"
    config: str = "last"
    p: int = 2
    layers: tuple[str, ...] = PAPER_LAYERS
    width_div: int = 1
    heatmaps: bool = False

    def __post_init__(self) -> None:
        # The settings' own checks (arch, config, p, repeated layers, heatmaps); then the names.
        ExportSettings(
            arch=self.arch,
            config=self.config,
            p=self.p,
            layers=self.layers,
            width_div=self.width_div,
            heatmaps=self.heatmaps,
        )
        all_units = self.units
        for name in self.layers:
            i = unit_index(all_units, name)
            if self.interactive and i >= len(all_units) - 1:
                raise ValueError(
                    f"layer {name!r} has no unit above it: config {self.config!r} needs a layer "
                    f"strictly below fc-7"
                )

    @classmethod
    def from_settings(cls, settings: ExportSettings) -> FeatureSpec:
        """The network and outputs an export with `settings` computes."""
        return cls(
            settings.arch,
            settings.config,
            settings.p,
            settings.layers,
            settings.width_div,
            settings.heatmaps,
        )

    @property
    def units(self) -> list[Unit]:
        return units(self.arch, self.width_div)

    @property
    def interactive(self) -> bool:
        return self.config in INTERACTIVE_CONFIGS

    def index(self, layer: str) -> int:
        return unit_index(self.units, layer)

    def top_index(self, layer: str) -> int:
        """Index of the unit T whose score drives `layer` (the layer itself for ORIG)."""
        i = self.index(layer)
        if self.config == "last":
            return len(self.units) - 1
        return i + 1 if self.config == "next" else i

    def deepest_index(self) -> int:
        return max(self.top_index(t) for t in self.layers)

    def layer_dims(self) -> dict[str, int]:
        all_units = self.units
        return {t: all_units[self.index(t)].out_channels for t in self.layers}

    def map_size(self, layer: str, width: int, height: int) -> tuple[int, int]:
        """(W_t, H_t) of a layer's map for a (width, height) input."""
        w, h = width, height
        for u in self.units[: self.index(layer) + 1]:
            if u.is_pool:
                w, h = w // 2, h // 2
            else:
                w, h = w + 2 * u.padding - u.kernel + 1, h + 2 * u.padding - u.kernel + 1
        return w, h

    def output_names(self) -> list[str]:
        names = list(self.layers)
        if self.heatmaps:
            names += [heatmap_name(t) for t in self.layers]
        return names


def engine_spec(manifest: EngineManifest) -> FeatureSpec:
    """The FeatureSpec an engine directory was exported with (its manifest's `export` record),
    checked against the outputs the manifest lists."""
    spec = FeatureSpec.from_settings(ExportSettings.from_identity(manifest.data["export"]))
    if spec.output_names() != manifest.outputs:
        raise EngineError(
            f"{manifest.directory}: the export record gives outputs {spec.output_names()}, "
            f"the manifest lists {manifest.outputs}"
        )
    return spec
