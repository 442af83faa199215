"""`manifest.json`: the only contract between the export stage and the runtime.

The exporter writes it after every bucket (atomically, so a crash never leaves a half-written
file); the runtime reads nothing else to know what a directory holds and how to feed it.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_json
from .buckets import bucket_for, format_size
from .settings import ExportSettings

MANIFEST_FILE = "manifest.json"
FORMAT = "interactive-engine/1"


HEATMAP_SUFFIX = ".heatmap"


def heatmap_name(layer: str) -> str:
    """The output name of a layer's heatmap (gamma-hat)."""
    return f"{layer}{HEATMAP_SUFFIX}"


def is_heatmap(output: str) -> bool:
    return output.endswith(HEATMAP_SUFFIX)


class EngineError(ValueError):
    """An engine directory is missing, malformed or lacks what the caller asked for."""


class MissingBucketError(EngineError):
    """The image's bucket has no exported graph; the message says how to export it."""

    def __init__(self, message: str, bucket: tuple[int, int]) -> None:
        super().__init__(message)
        self.bucket = bucket


@dataclass
class EngineManifest:
    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> EngineManifest:
        path = Path(directory)
        if not path.is_dir():
            raise EngineError(f"engine directory {str(path)!r} does not exist")
        file = path / MANIFEST_FILE
        if not file.is_file():
            raise EngineError(
                f"{str(path)!r} is not an engine directory (no {MANIFEST_FILE}); create one with "
                f"`interactive export --out {shlex.quote(str(path))}`"
            )
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EngineError(f"{file}: unreadable manifest ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineError(f"{file}: not an {FORMAT} manifest")
        return cls(path, data)

    @property
    def settings(self) -> ExportSettings:
        """The export settings this directory was made with (its `export` record)."""
        return ExportSettings.from_identity(self.data["export"])

    @property
    def layers(self) -> list[str]:
        return [layer["name"] for layer in self.data["layers"]]

    @property
    def layer_dims(self) -> dict[str, int]:
        return {layer["name"]: int(layer["dim"]) for layer in self.data["layers"]}

    @property
    def outputs(self) -> list[str]:
        return list(self.data["outputs"])

    @property
    def input_name(self) -> str:
        return str(self.data["input"]["name"])

    @property
    def buckets(self) -> list[tuple[int, int]]:
        entries = self.data["buckets"].values()
        return sorted((int(b["width"]), int(b["height"])) for b in entries)

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The (W, H) every image of this size is resized to under this engine's rule."""
        rule = self.data["bucket_rule"]
        if rule["kind"] == "fixed":
            if width < 1 or height < 1:
                raise ValueError(f"image size must be positive, got {width}x{height}")
            return int(rule["width"]), int(rule["height"])
        return bucket_for(width, height, int(rule["area"]))

    def bucket_path(self, bucket: tuple[int, int]) -> Path:
        entry = self.data["buckets"].get(format_size(bucket))
        if entry is None:
            raise self.missing_bucket(bucket)
        return self.directory / entry["file"]

    def missing_bucket(self, bucket: tuple[int, int]) -> MissingBucketError:
        """The error for a bucket without a graph: it names the command that exports it."""
        return MissingBucketError(
            f"bucket {format_size(bucket)} has no exported graph in {self.directory}; add it "
            f"with: {self.export_command([bucket])}",
            bucket,
        )

    def export_command(self, buckets: list[tuple[int, int]]) -> str:
        """The exact `interactive export` command that adds `buckets` to this directory."""
        args = ["interactive", "export", *self.settings.export_args()]
        args += ["--buckets", ",".join(format_size(b) for b in buckets)]
        args += ["--out", str(self.directory)]
        return shlex.join(args)


def package_version() -> str:
    """This package's installed version (recorded beside every artifact)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("interactive")
    except PackageNotFoundError:
        return "0+unknown"


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    """Atomically replace DIR/manifest.json."""
    write_json(directory / MANIFEST_FILE, data)
