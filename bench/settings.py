"""`interactive bench`'s flags and the run settings they resolve to (a JSON-ready dict)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from interactive_features.bench.machine import usable_cores
from interactive_features.runtime.buckets import parse_size
from interactive_features.runtime.manifest import EngineManifest
from interactive_features.runtime.registry import REGISTRY
from interactive_features.runtime.settings import PRECISIONS, comma_list

MODES = ("engine", "e2e")
# engine-direct: the same engine with every convolution direct (`--conv direct`), timed in each
# backend beside a Winograd engine (export/winograd.py); nothing to add for an all-direct one.
PEER_NAMES = (
    "reference", "naive", "captum", "torch-forward", "engine-forward", "engine-direct",
)  # fmt: skip
DEFAULT_PEERS = "reference,torch-forward,engine-forward,engine-direct"
COMPILE_SUFFIX = "+compile"  # `--backends torch+compile`: the torch backend, compiled


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="interactive bench",
        description="Latency, throughput, memory, FLOP rate and conformance of every backend "
        "against the autograd peers and the forward-only floors, in one run; or --compare two "
        "runs.",
    )
    p.add_argument("--engine", type=Path, default=Path("engines/vgg16-last-p2-random0"))
    p.add_argument(
        "--mode", default="engine",
        help="engine (pre-decoded uint8), e2e (generated JPEG files, decoded per call), both",
    )  # fmt: skip
    p.add_argument(
        "--backends", default="available",
        help="comma list of " + ", ".join(REGISTRY) + f" (NAME{COMPILE_SUFFIX}: torch.compile), "
        "'available' (every registered one; those that cannot run here are reported skipped), "
        "or 'none'",
    )  # fmt: skip
    p.add_argument("--precision", default="fp32", help="comma list of " + ", ".join(PRECISIONS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--buckets", help="comma list WxH (default: the engine's smallest bucket)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument(
        "--peers", default=DEFAULT_PEERS,
        help=f"comma list of {', '.join(PEER_NAMES)}, 'all' or 'none' (engine-forward: our "
        "own forward-only ORIG engine in every backend)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed calls per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (at least 1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per case (0: all usable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="JSON and PNG directory")
    p.add_argument(
        "--results-md", type=Path, help="append the Markdown here (default OUT/results.md)"
    )
    p.add_argument("--cache", type=Path, help="forward-only engines (default ~/.cache/interactive)")
    p.add_argument("--profile", action="store_true", help="per-operator ORT profile per bucket")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--title", default="", help="heading of the Markdown section")
    p.add_argument(
        "--fail-on-target", action="store_true",
        help="exit 1 when a speed target is missed (default: reported, not a failure)",
    )  # fmt: skip
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    return p


def _names(flag: str, text: str, known: list[str], every: str, suffix: str = "") -> list[str]:
    """A comma list of `known` names (each may end in `suffix`); `every` means all of them,
    'none' none."""
    names = comma_list(text)
    if names == [every]:
        return list(known)
    if names == ["none"]:
        return []
    for name in names:
        if name.removesuffix(suffix) not in known:
            raise ValueError(f"{flag} {name!r}: expected one of {', '.join(known)}")
    return names


def resolve_settings(args: argparse.Namespace, manifest: EngineManifest) -> dict[str, Any]:
    """The run's settings, every flag checked (ValueError naming the flag)."""
    modes = list(MODES) if args.mode == "both" else comma_list(args.mode)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--mode {mode!r}: expected engine, e2e or both")
    if args.reps < 1 or args.warmup < 1:
        raise ValueError("--reps and --warmup must be at least 1")
    if args.buckets:
        buckets = [parse_size(b) for b in comma_list(args.buckets)]
    else:
        buckets = [smallest(manifest)]
    for bucket in buckets:
        manifest.bucket_path(bucket)  # raises, naming the export command, if it is missing
    backends = _names("--backends", args.backends, list(REGISTRY), "available", COMPILE_SUFFIX)
    peers = _names("--peers", args.peers, list(PEER_NAMES), "all")
    precisions = comma_list(args.precision)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: expected {', '.join(PRECISIONS)}")
    batches = [int(b) for b in comma_list(args.batch)]
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {args.batch!r}: expected positive integers")
    return {
        "engine": str(args.engine),
        "modes": modes,
        "backends": backends,
        "peers": peers,
        "precisions": precisions,
        "device": args.device,
        "buckets": [list(b) for b in buckets],
        "batches": batches,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads or usable_cores(),
        "seed": args.seed,
        "title": args.title,
    }


def smallest(manifest: EngineManifest) -> tuple[int, int]:
    return min(manifest.buckets, key=lambda b: (b[0] * b[1], b))
