"""Weights loading: .pth state dicts, random:SEED, and the imagenet path's offline message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interactive_features.export import spec
from interactive_features.export.spec import PAPER_LAYERS, FeatureSpec, load_state_dict, units


def test_random_weights_are_deterministic_and_in_torchvision_layout() -> None:
    a, b = load_state_dict("random:1", "vgg16", 8), load_state_dict("random:1", "vgg16", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["features.0.weight"], load_state_dict("random:2", "vgg16", 8)["features.0.weight"]
    )
    full = spec.random_state_dict("vgg19", 0)
    assert full["features.0.weight"].shape == (64, 3, 3, 3)
    assert full["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert "features.34.weight" in full  # conv-5-4 of VGG-19


def test_weight_keys_follow_torchvision_module_indices() -> None:
    """torchvision's `features` counts conv, ReLU and pool modules: convs sit at these indices."""
    keys = [u.weight_key for u in units("vgg16") if not u.is_pool]
    assert keys == [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + [
        "classifier.0",
        "classifier.3",
    ]
    assert [u.weight_key for u in units("vgg19") if not u.is_pool][-3:] == [
        "features.34",
        "classifier.0",
        "classifier.3",
    ]


def test_pth_state_dict(tmp_path: Path) -> None:
    sd = spec.random_state_dict("vgg16", 5, 8)
    torch.save(sd, tmp_path / "w.pth")
    loaded = load_state_dict(str(tmp_path / "w.pth"), "vgg16", 8)
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state_dict(str(tmp_path / "nope.pth"), "vgg16")
    with pytest.raises(ValueError, match="needs"):  # a narrow state dict for a full network
        spec.conv_weights(loaded, units("vgg16")[0])


def test_imagenet_offline_says_how_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # port 9 (discard) on loopback refuses at once: the real download code, no network needed
    monkeypatch.setitem(spec.IMAGENET_URLS, "vgg16", "http://127.0.0.1:9/vgg16-397923af.pth")
    with pytest.raises(
        RuntimeError, match=r"could not download .* --weights /path/to/vgg16-397923af\.pth"
    ):
        load_state_dict("imagenet", "vgg16")


def test_bad_weights_arguments() -> None:
    with pytest.raises(ValueError, match="random:SEED"):
        load_state_dict("random:x", "vgg16")
    with pytest.raises(ValueError, match="unknown arch"):
        load_state_dict("random:0", "vgg11")


def test_feature_spec_sizes() -> None:
    s = FeatureSpec()
    assert sum(s.layer_dims().values()) == 6848  # the paper's nine layers
    assert s.map_size("fc-6", 512, 512) == (10, 10)
    assert s.map_size("pool-5", 576, 448) == (18, 14)
    assert [u.name for u in units("vgg19")].count("conv-5-4") == 1
    assert s.layers == PAPER_LAYERS


def test_a_failed_download_leaves_no_engine_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from interactive_features.export.exporter import ExportRequest, export_engine
    from interactive_features.runtime.settings import ExportSettings

    monkeypatch.setitem(spec.IMAGENET_URLS, "vgg16", "http://127.0.0.1:9/vgg16-397923af.pth")
    with pytest.raises(RuntimeError, match="could not download"):
        export_engine(
            ExportRequest(out=tmp_path / "e", settings=ExportSettings(weights="imagenet")),
            log=lambda _: None,
        )
    assert not (tmp_path / "e").exists()
