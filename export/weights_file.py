"""One `weights.bin` per engine directory: ONNX external data shared by every bucket's graph.

Every large initializer of a bucket graph is moved into the shared file at a 64 KiB-aligned
offset (so ONNX Runtime can memory-map it) and recorded by name in a tensor table that the
manifest carries to the runtime. A second bucket finds its tensors already there and adds nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from interactive_features.runtime.manifest import EngineError
from interactive_features.runtime.weights import file_sha256
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGNMENT = 64 * 1024
INLINE_BYTES = 1024  # shape constants and the like stay inside the graph


def write_error(path: Path, err: OSError) -> str:
    """One line for a failed write of `path` (disk full, read-only, no permission)."""
    line = f"{path}: cannot write: {err.strerror or err}"
    if err.errno == errno.ENOSPC:
        line += "; free some space and rerun the same command (finished buckets are kept)"
    return line


class WeightsMismatchError(ValueError):
    """A graph's tensor differs from the one the engine directory already stores under its name."""


class SharedWeights:
    """The append-only weights file of one engine directory and its table of tensors."""

    def __init__(self, directory: Path, tensors: dict[str, dict[str, Any]] | None = None) -> None:
        self.directory = directory
        self.path = directory / WEIGHTS_FILE
        self.tensors: dict[str, dict[str, Any]] = dict(tensors or {})

    def externalize(self, model: onnx.ModelProto) -> None:
        """Point the model's large initializers into weights.bin, appending the new ones."""
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {init.name!r} is already external")
            array = numpy_helper.to_array(init)
            if array.nbytes < INLINE_BYTES:
                continue
            entry = self._store(init.name, np.ascontiguousarray(array))
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (
                ("location", WEIGHTS_FILE),
                ("offset", str(entry["offset"])),
                ("length", str(entry["length"])),
            ):
                item = init.external_data.add()
                item.key, item.value = key, value

    def store(self, name: str, array: np.ndarray) -> dict[str, Any]:
        """Append one tensor no graph references (or check it against the stored one)."""
        return self._store(name, np.ascontiguousarray(array))

    def _store(self, name: str, array: np.ndarray) -> dict[str, Any]:
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        known = self.tensors.get(name)
        if known is not None:
            if known["sha256"] != digest:
                raise WeightsMismatchError(
                    f"tensor {name!r} differs from the one stored in {self.path}: this engine "
                    "directory was exported with other weights; export into a new --out directory"
                )
            return known
        size = self.path.stat().st_size if self.path.exists() else 0
        offset = -(-size // ALIGNMENT) * ALIGNMENT
        try:
            with open(self.path, "ab") as f:
                f.write(b"\0" * (offset - size))
                f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):  # the table still ends at `size`
                os.truncate(self.path, size)
            raise EngineError(write_error(self.path, err)) from err
        entry = {
            "offset": offset,
            "length": array.nbytes,
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "sha256": digest,
        }
        self.tensors[name] = entry
        return entry

    def truncate_to_table(self) -> None:
        """Drop bytes past the last recorded tensor (left by a crash between write and record)."""
        end = max((e["offset"] + e["length"] for e in self.tensors.values()), default=0)
        if self.path.exists() and self.path.stat().st_size > end:
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def file_sha256(self) -> str:
        return file_sha256(self.path)
