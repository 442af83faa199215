"""The backend contract (runtime/backends/base.py): every registered class keeps it, one
options vocabulary refused by name, one device parser, and the import directions between the
packages (the registry lists names without importing any backend)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from interactive_features.runtime.backends import (
    OPTIONS,
    Backend,
    OrtBackend,
    UnknownOption,
    backend_class,
    check_device,
    cuda_index,
    open_backend,
)
from interactive_features.runtime.backends.base import GPU_DEVICES
from interactive_features.runtime.backends.ort import OrtCudaBackend, OrtTensorrtBackend
from interactive_features.runtime.manifest import EngineError, EngineManifest
from interactive_features.runtime.registry import REGISTRY
from interactive_features.runtime.settings import PRECISIONS


def _keyword_options(cls: type) -> set[str]:
    """The keyword options a class's constructor takes, following **options up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names
    raise AssertionError(f"{cls.__name__}'s **options reach no constructor that names them")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_backend_keeps_the_contract(name: str) -> None:
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    assert isinstance(inspect.getattr_static(cls, "unavailable_reason"), classmethod)
    reason = cls.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)
    assert cls.options <= set(OPTIONS), cls.options - set(OPTIONS)
    assert "precision" in cls.options and set(cls.precisions) <= set(PRECISIONS)
    assert _keyword_options(cls) == cls.options


@pytest.mark.parametrize("name", list(REGISTRY))
def test_unknown_options_are_refused_by_name_before_construction(
    narrow_engine: Path, name: str
) -> None:
    manifest = EngineManifest.load(narrow_engine)
    cls = backend_class(name)
    with pytest.raises(
        EngineError, match=rf"backend '{name}' takes no option 'foo' \(it takes: "
    ) as err:
        open_backend(manifest, name, foo=1)  # before any check of the machine: every backend
    assert isinstance(err.value, UnknownOption) and isinstance(err.value, TypeError)
    assert all(option in str(err.value) for option in cls.options)
    with pytest.raises(UnknownOption, match="no option 'device_id', 'foo'"):
        open_backend(manifest, name, device_id=0, foo=1)


def test_precision_is_every_backends_option(narrow_engine: Path) -> None:
    manifest = EngineManifest.load(narrow_engine)
    assert open_backend(manifest, "ort", precision="fp32").precision == "fp32"
    with pytest.raises(EngineError, match="ort runs the exported float32 graphs only, not 'fp16'"):
        open_backend(manifest, "ort", precision="fp16")
    with pytest.raises(EngineError, match=r"precision must be one of \['fp32', 'fp16', 'bf16'\]"):
        OrtBackend(manifest, precision="fp8")


def test_devices_are_strings_everywhere(narrow_engine: Path, tmp_path: Path) -> None:
    assert [cuda_index(d) for d in ("cuda", "cuda:0", "cuda:1", "cuda:12")] == [0, 0, 1, 12]
    assert [check_device(d) for d in ("auto", "cpu", "cuda", "cuda:3")] == [
        "auto", "cpu", "cuda", "cuda:3"
    ]  # fmt: skip
    for bad in ("tpu", "cuda:x", "cuda:", "gpu:0", 0, None):
        with pytest.raises(EngineError, match="device must be one of 'auto', 'cpu', 'cuda'"):
            check_device(bad)
    for bad_gpu in ("cpu", "auto", 1):
        with pytest.raises(EngineError, match="device must be one of 'cuda' or 'cuda:N'"):
            check_device(bad_gpu, GPU_DEVICES)
    with pytest.raises(EngineError, match="got 'cpu'"):
        cuda_index("cpu")
    manifest = EngineManifest.load(narrow_engine)
    cuda = OrtCudaBackend(manifest, device="cuda:1")  # sessions open on first use only
    assert cuda.providers[0][1]["device_id"] == 1
    trt = OrtTensorrtBackend(manifest, device="cuda:2", cache_dir=tmp_path)
    assert trt.provider_options((256, 256))["device_id"] == 2
    with pytest.raises(EngineError, match="device must be one of 'cuda' or 'cuda:N', got 'cpu'"):
        OrtCudaBackend(manifest, device="cpu")


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_registry_lists_names_without_importing_a_backend() -> None:
    _run("""
import sys
from interactive_features.runtime.registry import BACKENDS, REGISTRY
import interactive_features.runtime.cli
assert set(REGISTRY) == {"ort", "ort-cuda", "ort-tensorrt", "torch", "tensorrt"} < set(BACKENDS)
heavy = ("numpy", "onnxruntime", "torch")
ours = tuple(f"interactive_features.{p}" for p in ("runtime.backends", "export", "engines"))
loaded = [m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(ours)]
assert not loaded, loaded
""")


def test_packages_import_in_one_direction() -> None:
    """runtime imports no other interactive package; export and engines import runtime (never
    bench), engines never export; the TensorRT builder never imports the TensorRT backend."""
    _run("""
import importlib, pkgutil, sys
import interactive_features.runtime as runtime
for module in pkgutil.walk_packages(runtime.__path__, "interactive_features.runtime."):
    importlib.import_module(module.name)
others = tuple(f"interactive_features.{p}" for p in ("export", "engines", "bench"))
bad = [m for m in sys.modules if m.startswith(others)]
assert not bad, bad
import interactive_features.engines.tensorrt_build
assert "interactive_features.engines.tensorrt_backend" not in sys.modules
import interactive_features.engines.tensorrt_backend
bad = [m for m in sys.modules if m.startswith("interactive_features.export")]
assert not bad, bad  # engines never imports export
import interactive_features.export.torch_backend
bench = "interactive_features.bench"
bad = [m for m in sys.modules if m.startswith(bench) or m in ("torch", "tensorrt")]
assert not bad, bad
""")
