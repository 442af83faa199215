"""The GPU check's engine without carrying weights.bin (596 MB at full width) to the GPU host.

`strip(engine, out)` copies an engine directory's manifest and graphs (tens of KiB per bucket)
and leaves weights.bin out; `restore_weights(out)` rebuilds weights.bin on the GPU host from the
manifest's weights source (`random:SEED` only: deterministic), every tensor at its recorded
offset, and checks each tensor's sha256 and the whole file's against the manifest. A mismatch is
an error: the rebuilt engine would not be the one that was exported.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from interactive_features.runtime.manifest import MANIFEST_FILE, EngineError, EngineManifest
from interactive_features.runtime.weights import file_sha256


def strip(engine: Path, out: Path) -> Path:
    """manifest.json and every bucket-*.onnx of `engine` into `out` (no weights.bin)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in [engine / MANIFEST_FILE, *sorted(engine.glob("bucket-*.onnx"))]:
        shutil.copy2(path, out / path.name)
    return out


def weights_ok(manifest: EngineManifest) -> bool:
    """weights.bin is there and its sha256 is the manifest's."""
    info = manifest.data["weights"]
    path = manifest.directory / info["file"]
    return path.is_file() and file_sha256(path) == info.get("sha256")


def source_tensors(manifest: EngineManifest) -> dict[str, np.ndarray]:
    """The exported graph's buffers (conv weights, biases, flipped kernels), by name, rebuilt
    from the manifest's weights source the way the exporter built them."""
    from interactive_features.export.graph import AnalyticGraph
    from interactive_features.export.spec import engine_spec, load_state_dict, random_seed

    source = manifest.data["weights"]["source"]
    if random_seed(source) is None:
        raise EngineError(
            f"{manifest.directory}: weights {source!r} cannot be rebuilt here (only random:SEED "
            "weights are deterministic without a download): bring weights.bin along"
        )
    state_dict = load_state_dict(source, manifest.data["arch"], manifest.data["width_div"])
    graph = AnalyticGraph(engine_spec(manifest), state_dict)
    return {name: t.numpy() for name, t in graph.named_buffers()}


def restore_weights(directory: Path) -> dict[str, Any]:
    """Rebuild `directory`/weights.bin (see the module docstring); returns what was done."""
    manifest = EngineManifest.load(directory)
    info = manifest.data["weights"]
    table: dict[str, dict[str, Any]] = info["tensors"]
    tensors = source_tensors(manifest)
    missing = sorted(set(table) - set(tensors))
    if missing:
        raise EngineError(f"{directory}: the graph has no tensors {missing[:3]} of the table")
    path = directory / info["file"]
    partial = path.with_suffix(".partial")
    size = max(e["offset"] + e["length"] for e in table.values())
    with open(partial, "wb") as f:
        f.truncate(size)
        for name, entry in sorted(table.items(), key=lambda item: item[1]["offset"]):
            array = np.ascontiguousarray(tensors[name], dtype=np.dtype(entry["dtype"]))
            data = array.tobytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                partial.unlink()
                raise EngineError(f"{directory}: rebuilt tensor {name!r} differs from the export")
            f.seek(entry["offset"])
            f.write(data)
    digest = file_sha256(partial)
    if digest != info.get("sha256"):
        partial.unlink()
        raise EngineError(f"{directory}: rebuilt weights.bin has sha256 {digest[:12]}..., the "
                          f"manifest records {str(info.get('sha256'))[:12]}...")  # fmt: skip
    partial.replace(path)
    return {"file": str(path), "bytes": size, "tensors": len(table), "sha256": digest}
