"""Full-width VGG-16 (random weights, the real code path): ONNX Runtime vs the autograd reference.

The issue's acceptance check: config `last`, p = 2, the paper's nine layers, `--area 256`, buckets
256x256 and 288x224, through both the Python API and the CLI; plus the 224x224 fixed bucket.

Each test prints its per-image, per-layer errors (`pytest -s`, and pytest shows them on a failure):
the judge takes the worst image, and one image's pooling switch or ReLU mask that flips on a
near-tie moves the worst figure by 10x (bench/RESULTS.md, "Accuracy of the full-width engine").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from interactive_features.export.reference import reference_features
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec, load_state_dict
from interactive_features.runtime import Extractor
from interactive_features.runtime.conformance import relative_error
from interactive_features.runtime.parquet import layer_matrix

from conftest import assert_close, photos

pytestmark = pytest.mark.slow
SPEC = FeatureSpec("vgg16", "last", 2, PAPER_LAYERS)


def export(out: Path, *args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "interactive_features.runtime.cli",
        "export",
        "--out",
        str(out),
    ]
    command += ["--weights", "random:0", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return load_state_dict("random:0", "vgg16")


def reference_for(ex: Extractor, images: list, state_dict: dict) -> dict[str, np.ndarray]:
    """The reference on exactly the pixels the runtime fed its engine, image by image."""
    rows: dict[str, list[np.ndarray]] = {t: [] for t in PAPER_LAYERS}
    for image in images:
        pixels = torch.from_numpy(ex.prepare(image).pixels[None])
        for t, v in reference_features(SPEC, state_dict, pixels).items():
            rows[t].append(v.numpy()[0])
    return {t: np.stack(v) for t, v in rows.items()}


def image_label(image: str | np.ndarray) -> str:
    """A photo's file name, or `random WxH` for a generated array (width first, as the photos)."""
    if isinstance(image, str):
        return Path(image).name
    return f"random {image.shape[1]}x{image.shape[0]}"


def error_table(got: dict[str, np.ndarray], want: dict[str, np.ndarray], labels: list[str]) -> str:
    """Relative L2 error of every layer's feature for every image, plus two summary rows.

    "worst image" is what the judge limits (runtime/conformance.py); "all images together" is the
    error of the stacked matrix, the figure this test printed until 2026-12-01 (RESULTS.md's
    2026-11-25 numbers). A cell far above its row's others is one image's discrete event.
    """
    layers = list(want)
    cells = [[relative_error(got[t][i], want[t][i]) for t in layers] for i in range(len(labels))]
    width = max(len(s) for s in [*labels, "all images together"])
    lines = [" ".join([f"{'image':<{width}}", *(f"{t:>9}" for t in layers)])]
    rows = [*zip(labels, cells, strict=True), ("worst image", list(np.max(cells, axis=0)))]
    rows.append(("all images together", [relative_error(got[t], want[t]) for t in layers]))
    for label, row in rows:
        lines.append(" ".join([f"{label:<{width}}", *(f"{e:>9.2e}" for e in row)]))
    worst = np.unravel_index(int(np.argmax(cells)), np.shape(cells))
    lines.append(f"largest: {layers[worst[1]]} of {labels[worst[0]]}")
    return "\n".join(lines)


def test_area_256_api_and_cli(tmp_path: Path, state_dict: dict) -> None:
    engine = tmp_path / "vgg16-last-p2"
    # the direct graphs (what GPU backends take); the default's CPU graphs: the Winograd test
    export(engine, "--area", "256", "--buckets", "256x256,288x224", "--conv", "direct")
    rng = np.random.default_rng(99)
    images: list = [str(p) for p in photos() if "portrait" not in p.name]  # portrait: 224x288
    images += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(300, 300), (640, 500)]]
    labels = [image_label(im) for im in images]
    with Extractor.open(engine) as ex:
        feats = ex.extract(images, batch_size=4)
        assert not feats.errors
        assert {ex.prepare(im).bucket for im in images} == {(256, 256), (288, 224)}
        want = reference_for(ex, images, state_dict)
    got = {t: feats[t] for t in PAPER_LAYERS}
    print(f"\narea 256, API, error against the reference:\n{error_table(got, want, labels)}")
    api_err = assert_close(got, want)

    paths = [p for p in images if isinstance(p, str)]
    out = tmp_path / "features.parquet"
    command = [
        sys.executable,
        "-m",
        "interactive_features.runtime.cli",
        "extract",
        "--engine",
        str(engine),
    ]
    result = subprocess.run([*command, "-o", str(out), *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    cli = {t: layer_matrix(table, t) for t in PAPER_LAYERS}
    cli_want = {t: v[: len(paths)] for t, v in want.items()}
    cli_table = error_table(cli, cli_want, labels[: len(paths)])
    print(f"area 256, CLI, error against the reference:\n{cli_table}")
    cli_err = assert_close(cli, cli_want)
    print(
        f"\nfull-width VGG-16 area 256: max per-layer rel err API {api_err:.2e}, CLI {cli_err:.2e}"
    )


def test_fixed_224(tmp_path: Path, state_dict: dict) -> None:
    engine = tmp_path / "vgg16-224"
    export(engine, "--fixed", "224x224")
    images = [str(p) for p in photos()]
    with Extractor.open(engine) as ex:
        assert ex.bucket_for(4000, 1000) == (224, 224)
        feats = ex.extract(images, batch_size=8)
        got = {t: feats[t] for t in PAPER_LAYERS}
        want = reference_for(ex, images, state_dict)
    table = error_table(got, want, [image_label(im) for im in images])
    print(f"\nfixed 224x224, error against the reference:\n{table}")
    err = assert_close(got, want)
    print(f"\nfull-width VGG-16 fixed 224x224: max per-layer rel err {err:.2e}")


def test_winograd_engine_area_256(tmp_path: Path, state_dict: dict) -> None:
    """The default `--conv auto`'s CPU graphs (F(4,3) Winograd, forward and backward, conv-3-1 ..
    conv-5-3) on the same images: every layer within the fp32 tolerance of the reference."""
    engine = tmp_path / "vgg16-auto"
    export(engine, "--area", "256", "--buckets", "256x256,288x224")
    rng = np.random.default_rng(99)
    images: list = [str(p) for p in photos() if "portrait" not in p.name]
    images += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(300, 300), (640, 500)]]
    with Extractor.open(engine) as ex:
        assert len(ex.manifest.winograd) == 9 and ex.manifest.cpu_graphs
        feats = ex.extract(images, batch_size=4)
        assert not feats.errors
        want = reference_for(ex, images, state_dict)
    got = {t: feats[t] for t in PAPER_LAYERS}
    table = error_table(got, want, [image_label(im) for im in images])
    print(f"\narea 256, --conv auto, error against the reference:\n{table}")
    err = assert_close(got, want)
    print(f"\nfull-width VGG-16 area 256 --conv auto: max per-layer rel err {err:.2e}")
