"""`manifest.json`: the only contract between the export stage and the runtime.

The exporter writes it after every bucket (atomically, so a crash never leaves a half-written
file); the runtime reads nothing else to know what a directory holds and how to feed it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


class BadBucketError(EngineError):
    """A bucket's graph file exists in the manifest but cannot be opened (unreadable, garbage,
    not a graph ONNX Runtime takes). Carries the bucket, so that a job over many images can
    turn that bucket's images into error rows and go on with the others."""

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
        except OSError as err:
            raise EngineError(f"{file}: cannot read the manifest: {err.strerror or err}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EngineError(f"{file}: unreadable manifest ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineError(f"{file}: not an {FORMAT} manifest")
        validate_manifest(data, file)
        return cls(path, data)

    @property
    def settings(self) -> ExportSettings:
        """The export settings this directory was made with (its `export` record)."""
        return ExportSettings.from_identity(self.data["export"])

    @property
    def winograd(self) -> dict[str, dict[str, str]]:
        """{unit: {"forward" | "backward": "f2" | "f4"}}: the 3x3 steps this engine's graphs
        write as Winograd convolutions (export --conv); empty for an all-direct engine."""
        return {unit: dict(steps) for unit, steps in self.data.get("winograd", {}).items()}

    @property
    def cpu_graphs(self) -> bool:
        """True when every bucket has two graphs (export --conv auto): `file` with direct
        convolutions, for every backend, and `cpu_file` with the `winograd` steps, which the
        ONNX Runtime CPU backend runs (`bucket_path(bucket, cpu=True)`)."""
        return bool(self.data.get("cpu_graphs", False))

    def direct_convolutions_reason(self, what: str) -> str | None:
        """Why `what` (a GPU backend, a TensorRT build) cannot take this engine's graphs, or None:
        Winograd graphs are for the CPU; GPUs run their own convolution algorithms. An engine
        with `cpu_graphs` has direct graphs for them."""
        if not self.winograd or self.cpu_graphs:
            return None
        return (
            f"{what} takes direct convolutions, and {self.directory} writes "
            f"{len(self.winograd)} layers as Winograd (exported with --conv "
            f"{self.settings.conv}, for CPU engines): export it again with --conv direct"
        )

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
        if rule["kind"] != "area":
            raise EngineError(f"{self.directory}: unknown bucket_rule.kind {rule['kind']!r}")
        return bucket_for(width, height, int(rule["area"]))

    def bucket_path(self, bucket: tuple[int, int], cpu: bool = False) -> Path:
        """The bucket's graph file; `cpu=True`: the one for the ONNX Runtime CPU backend (its
        Winograd graph where the engine has `cpu_graphs`, else the same file)."""
        entry = self.data["buckets"].get(format_size(bucket))
        if entry is None:
            raise self.missing_bucket(bucket)
        key = "cpu_file" if cpu and "cpu_file" in entry else "file"
        return self.directory / engine_relative(entry[key], f"buckets.{format_size(bucket)}.{key}")

    @property
    def weights_path(self) -> Path:
        """The weights file (the manifest's `weights.file`, inside the directory)."""
        return self.directory / engine_relative(self.data["weights"]["file"], "weights.file")

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


# The distribution name on PyPI and the import package's name. The PyPI name `interactive` is an
# unrelated 2015 package whose import package `Interactive` would share a folder with ours on
# case-insensitive file systems (macOS, Windows); the command stays `interactive` (it installs no
# script) and `python -m interactive_features.runtime.cli` is the
# spelling no other package's script can shadow.
DISTRIBUTION = "interactive-features"
PACKAGE = "interactive_features"


def package_version() -> str:
    """This package's installed version (recorded beside every artifact)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    """Atomically replace DIR/manifest.json."""
    write_json(directory / MANIFEST_FILE, data)


# --- the manifest's schema ---------------------------------------------------------------------
# The keys the runtime reads, with their types; every error is one line:
# "<file>: <key path>: <what is wrong>". Keys not listed here are not checked (they are records,
# not inputs: versions, times, validation results).

_SHA256 = re.compile(r"[0-9a-f]{64}")
# The dtypes a weights table may hold, with their sizes in bytes.
_DTYPES = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1,
           "uint8": 1, "bool": 1}  # fmt: skip
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number", type(None): "null"}  # fmt: skip


class _Invalid(Exception):
    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"{key}: {what}")


def _key(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _get(obj: dict[str, Any], path: str, key: str, kind: type | tuple[type, ...]) -> Any:
    """obj[key], checked to be of `kind` (bool is never an int here)."""
    where = _key(path, key)
    if key not in obj:
        raise _Invalid(where, "missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise _Invalid(where, f"must be {names}, got {_type_name(value)} {value!r:.60}")
    return value


def _count(obj: dict[str, Any], path: str, key: str, minimum: int = 0) -> int:
    value: int = _get(obj, path, key, int)
    if value < minimum:
        raise _Invalid(_key(path, key), f"must be at least {minimum}, got {value}")
    return value


def engine_relative(value: str, key: str) -> PurePosixPath:
    """A manifest's file name as a path confined to the engine directory: relative, without
    `..`, not empty. Anything else is an EngineError naming the key and the path."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or path == PurePosixPath("."):
        raise EngineError(
            f"{key}: {value!r} is not a file inside the engine directory (absolute paths and "
            "'..' are refused)"
        )
    return path


def _file(obj: dict[str, Any], path: str, key: str) -> str:
    value: str = _get(obj, path, key, str)
    try:
        engine_relative(value, _key(path, key))
    except EngineError as err:
        raise _Invalid(_key(path, key), str(err).split(": ", 1)[1]) from None
    return value


def _check_manifest(data: dict[str, Any]) -> None:
    layers = _get(data, "", "layers", list)
    if not layers:
        raise _Invalid("layers", "must list at least one layer")
    for i, layer in enumerate(layers):
        where = _key("layers", i)
        if not isinstance(layer, dict):
            raise _Invalid(where, f"must be an object, got {_type_name(layer)}")
        _get(layer, where, "name", str)
        _count(layer, where, "dim", 1)
    outputs = _get(data, "", "outputs", list)
    for i, name in enumerate(outputs):
        if not isinstance(name, str):
            raise _Invalid(_key("outputs", i), f"must be a string, got {_type_name(name)}")
    _get(_get(data, "", "input", dict), "input", "name", str)

    rule = _get(data, "", "bucket_rule", dict)
    kind = _get(rule, "bucket_rule", "kind", str)
    if kind == "area":
        _count(rule, "bucket_rule", "area", 1)
    elif kind == "fixed":
        _count(rule, "bucket_rule", "width", 1)
        _count(rule, "bucket_rule", "height", 1)
    else:
        raise _Invalid("bucket_rule.kind", f"must be 'area' or 'fixed', got {kind!r}")

    for name, entry in _get(data, "", "buckets", dict).items():
        where = _key("buckets", name)
        if not isinstance(entry, dict):
            raise _Invalid(where, f"must be an object, got {_type_name(entry)}")
        _file(entry, where, "file")
        if "cpu_file" in entry or data.get("cpu_graphs"):
            _file(entry, where, "cpu_file")
        width, height = _count(entry, where, "width", 1), _count(entry, where, "height", 1)
        if name != f"{width}x{height}":
            raise _Invalid(where, f"names bucket {name!r} but holds {width}x{height}")

    weights = _get(data, "", "weights", dict)
    _file(weights, "weights", "file")
    if "sha256" in weights and not _SHA256.fullmatch(str(weights["sha256"])):
        raise _Invalid("weights.sha256", "must be 64 lowercase hex digits")
    for name, entry in _get(weights, "weights", "tensors", dict).items():
        where = _key("weights.tensors", name)
        if not isinstance(entry, dict):
            raise _Invalid(where, f"must be an object, got {_type_name(entry)}")
        _count(entry, where, "offset")
        length = _count(entry, where, "length")
        dtype = _get(entry, where, "dtype", str)
        if dtype not in _DTYPES:
            raise _Invalid(_key(where, "dtype"), f"must be one of {sorted(_DTYPES)}, got {dtype!r}")
        shape = _get(entry, where, "shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _Invalid(_key(where, "shape"), f"must be a list of sizes, got {shape!r:.60}")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPES[dtype] != length:
            raise _Invalid(where, f"length {length} is not shape {shape} of {dtype}")
        sha = _get(entry, where, "sha256", str)
        if not _SHA256.fullmatch(sha):
            raise _Invalid(_key(where, "sha256"), "must be 64 lowercase hex digits")

    export = _get(data, "", "export", dict)
    try:
        ExportSettings.from_identity(export)
    except (TypeError, ValueError) as err:
        raise _Invalid("export", str(err)) from None
    if "winograd" in data:  # {unit: {"forward" | "backward": "f2" | "f4"}}
        for unit in _get(data, "", "winograd", dict):
            for step, mode in _get(data["winograd"], "winograd", unit, dict).items():
                if step not in ("forward", "backward") or mode not in ("f2", "f4"):
                    where = _key(_key("winograd", unit), step)
                    raise _Invalid(where, f"expected forward/backward: f2 or f4, got {mode!r:.20}")
    if "winograd_layout" in data:  # export/winograd.py LAYOUT of the stored kernels
        _get(data, "", "winograd_layout", int)
    if "cpu_graphs" in data:
        _get(data, "", "cpu_graphs", bool)
    if "heatmaps" in data:
        _get(data, "", "heatmaps", bool)
    tensorrt = data.get("tensorrt")
    if tensorrt is not None:
        plans = _get(_get(data, "", "tensorrt", dict), "tensorrt", "plans", dict)
        for bucket, by_precision in plans.items():
            where = _key("tensorrt.plans", bucket)
            if not isinstance(by_precision, dict):
                raise _Invalid(where, f"must be an object, got {_type_name(by_precision)}")
            for precision, facts in by_precision.items():
                at = _key(where, precision)
                if not isinstance(facts, dict):
                    raise _Invalid(at, f"must be an object, got {_type_name(facts)}")
                for key in ("file", "graph"):
                    if key in facts:
                        _file(facts, at, key)


def validate_manifest(data: dict[str, Any], file: str | os.PathLike[str]) -> None:
    """Check the keys the runtime reads (types, ranges, names confined to the directory); an
    EngineError "<file>: <key path>: <what is wrong>" for the first problem found."""
    try:
        _check_manifest(data)
    except _Invalid as err:
        raise EngineError(f"{file}: {err}") from None
