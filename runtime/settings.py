"""The one record of an engine's export settings, and the one place that knows their values.

`ExportSettings` is what `interactive export` is asked for and what the manifest records under
`export`; everything else is derived from it: the CLI's flags, choices and defaults
(`add_export_arguments`, `from_args`), the manifest's identity (`identity`, `from_identity`), the
command that adds buckets to a directory (`export_args`), the torch backend's and the
benchmark's network (export/spec.py's `FeatureSpec.from_settings`). Torch-free, so the
runtime and the CLI read it without the export stage.

Exported graphs are float32. Reduced precision (`PRECISIONS`) is a backend's or a TensorRT
build's choice, not an export setting; its seed scale lives here so that every backend scales
the same way (export/ALGORITHM.md section 6).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .buckets import format_size, parse_size

# Convs per block of each architecture (torchvision's configurations "D" and "E"); the spec
# table (interactive_features.export.spec) builds the network from it.
VGG_BLOCKS: dict[str, tuple[int, ...]] = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
ARCHS = tuple(VGG_BLOCKS)
# `last`: score on fc-7 for every layer; `next`: on the unit right above each layer;
# `orig-avg` / `orig-max`: plain pooled activations, no backward pass.
CONFIGS = ("last", "next", "orig-avg", "orig-max")
INTERACTIVE_CONFIGS = ("last", "next")
P_VALUES = (1, 2)
# The paper's nine layers (export/ALGORITHM.md section 5), the default everywhere.
PAPER_LAYERS = (
    "pool-1", "pool-2", "conv-3-3", "pool-3", "conv-4-3", "pool-4", "conv-5-3", "pool-5", "fc-6",
)  # fmt: skip
DEFAULT_AREA_SIDE = 512
# How feature rows may be post-processed: as they are, or each layer L2-normalised (the paper's).
NORMALIZATIONS = ("none", "l2")
WEIGHT_SOURCES = (
    "'imagenet' (torchvision's, via the torch hub cache), a .pth state dict, or random:SEED"
)

# How the 3x3 convolutions of an engine's graphs are written (export/winograd.py): `auto` as
# Winograd F(4x4,3x3) where the CPU benchmark measured it faster (every step with 256 channels
# on one side, bench/RESULTS.md) and direct elsewhere; `direct` everywhere direct (what GPU
# backends and TensorRT builds take); `f2`/`f4` every 3x3 step as F(2x2,3x3)/F(4x4,3x3)
# (tests, experiments).
CONV_MODES = ("auto", "direct", "f2", "f4")
# The export record's value for a setting that manifests written before it existed lack.
LEGACY_IDENTITY: dict[str, Any] = {"conv": "direct"}

# The precisions a backend or a TensorRT build may run an engine in.
PRECISIONS = ("fp32", "fp16", "bf16")
# Scales the top gradient of fp16/bf16 engines (a power of two: exact in every format). The seed
# is divided by the top unit's positions (100 for fc-7 at 512x512), so x256 brings it back to the
# size of the activations, far above fp16's subnormals (6e-8) and far below its maximum (65504).
REDUCED_SEED_SCALE = 256.0


def seed_scale_for(precision: str) -> float:
    """The seed scale every backend uses at `precision` (1 for fp32)."""
    check_precision(precision)
    return 1.0 if precision == "fp32" else REDUCED_SEED_SCALE


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def random_seed(weights: str) -> int | None:
    """SEED of a `random:SEED` weight source, None for the other sources."""
    if not weights.startswith("random:"):
        return None
    seed = weights.split(":", 1)[1]
    if not seed.isdigit():
        raise ValueError(f"--weights {weights!r}: expected random:SEED with an integer SEED")
    return int(seed)


def comma_list(text: str) -> list[str]:
    """`a, b,` -> ["a", "b"]: the one parser of comma-separated flags."""
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class ExportSettings:
    """Everything that decides an engine's numbers; two exports share a directory only when all
    of it matches. One default per setting, used by the CLI and the Python API alike."""

    arch: str = "vgg16"
    weights: str = "imagenet"  # WEIGHT_SOURCES
    config: str = "last"
    p: int = 2  # the score function's exponent
    layers: tuple[str, ...] = PAPER_LAYERS
    heatmaps: bool = False  # also output gamma-hat per layer (InterActive configs only)
    width_div: int = 1  # > 1: every width divided (narrow test networks)
    area: int = DEFAULT_AREA_SIDE  # the bucket rule's target area, as the side of a square
    fixed: str | None = None  # "224x224": one bucket for every image (the paper's ORIG baseline)
    # CONV_MODES. `auto`: direct graphs for every backend, and where Winograd wins (full-width
    # networks) a second graph per bucket for the CPU (1.3-1.5x there, bench/RESULTS.md).
    conv: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.config not in CONFIGS:
            raise ValueError(f"unknown config {self.config!r}: expected one of {CONFIGS}")
        if self.p not in P_VALUES:
            raise ValueError(f"p must be 1 or 2, got {self.p}")
        if not self.layers:
            raise ValueError("no layers requested")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers repeated in {list(self.layers)}")
        if self.heatmaps and not self.interactive:
            raise ValueError("heatmaps exist only for the InterActive configs (last, next)")
        if self.width_div < 1 or 64 % self.width_div:
            raise ValueError(f"width_div must divide 64, got {self.width_div}")
        if self.area < 32:
            raise ValueError(f"area must be at least 32 (a square's side), got {self.area}")
        if self.fixed is not None:
            object.__setattr__(self, "fixed", format_size(parse_size(self.fixed)))
        if self.conv not in CONV_MODES:
            raise ValueError(f"unknown conv {self.conv!r}: expected one of {', '.join(CONV_MODES)}")
        random_seed(self.weights)  # a malformed random:SEED fails here, before any work

    @property
    def interactive(self) -> bool:
        """True for the configs with a backward pass (`last`, `next`)."""
        return self.config in INTERACTIVE_CONFIGS

    def replace(self, **changes: Any) -> ExportSettings:
        return type(self)(**{**asdict(self), **changes})

    # --- the manifest's record ------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """manifest["export"]: JSON types, every field."""
        record = asdict(self)
        record["layers"] = list(self.layers)
        return record

    @classmethod
    def from_identity(cls, record: Mapping[str, Any]) -> ExportSettings:
        """The settings a manifest's `export` record holds (unknown keys ignored; settings newer
        than the manifest take their LEGACY_IDENTITY value)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**LEGACY_IDENTITY, **record}.items() if k in known}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    # --- the command line -----------------------------------------------------------------

    def export_args(self) -> list[str]:
        """The `interactive export` flags that reproduce these settings (inverse of from_args)."""
        args = ["--arch", self.arch, "--weights", self.weights, "--config", self.config]
        args += ["--p", str(self.p), "--layers", ",".join(self.layers)]
        if self.width_div != 1:
            args += ["--width-div", str(self.width_div)]
        if self.heatmaps:
            args.append("--heatmaps")
        if self.fixed:
            args += ["--fixed", self.fixed]
        else:
            args += ["--area", str(self.area)]
        if self.conv != ExportSettings.conv:
            args += ["--conv", self.conv]
        return args

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportSettings:
        """The settings `add_export_arguments`'s flags were given."""
        return cls(
            arch=args.arch,
            weights=args.weights,
            config=args.config,
            p=args.p,
            layers=tuple(comma_list(args.layers)),
            heatmaps=args.heatmaps,
            width_div=args.width_div,
            area=args.area,
            fixed=args.fixed,
            conv=args.conv,
        )


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The export settings' flags, with ExportSettings' defaults and this module's choices."""
    d = ExportSettings()
    parser.add_argument("--arch", default=d.arch, choices=ARCHS)
    parser.add_argument("--weights", default=d.weights, help=WEIGHT_SOURCES)
    parser.add_argument("--config", default=d.config, choices=CONFIGS)
    parser.add_argument("--p", type=int, default=d.p, choices=P_VALUES, help="score exponent")
    parser.add_argument("--layers", default=",".join(d.layers), help="comma-separated layer names")
    parser.add_argument("--heatmaps", action="store_true", help="also output gamma-hat heatmaps")
    parser.add_argument(
        "--width-div", type=int, default=d.width_div, help="narrow network (tests): 2, 4, 8..."
    )
    parser.add_argument(
        "--area", type=int, default=d.area, help="bucket rule area as a square's side"
    )
    parser.add_argument("--fixed", help="one fixed bucket WxH for every image (e.g. 224x224: ORIG)")
    parser.add_argument(
        "--conv",
        default=d.conv,
        choices=CONV_MODES,
        help="3x3 convolutions: auto (direct graphs, plus CPU graphs with Winograd F(4,3) from "
        "256 channels on: 1.3-1.5x on the CPU, weights.bin +78%%), direct (direct graphs only), "
        "f2 or f4 (every 3x3 step, one graph: experiments, CPU only)",
    )
