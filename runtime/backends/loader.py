"""Backends by name: the registry's "module:Class" imported on demand, checked, opened."""

from __future__ import annotations

import importlib
from typing import Any

from ..manifest import EngineError, EngineManifest
from ..registry import AUTO_ORDER, BACKENDS, REGISTRY
from ..weights import verify_weights
from .base import Backend


def backend_class(name: str) -> type[Backend]:
    """The class of registered backend `name`, its module imported now (ImportError when that
    module cannot load; EngineError for a name not registered)."""
    if name not in REGISTRY:
        raise EngineError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    module, _, attribute = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"registry entry {name!r} -> {REGISTRY[name]} is not a Backend class")
    return cls


def backend_status(name: str, manifest: EngineManifest | None = None) -> str | None:
    """None when backend `name` can run here (on `manifest`, if given), otherwise why not."""
    try:
        cls = backend_class(name)
    except ImportError as err:
        return f"{name}: {err}"
    return cls.unavailable_reason(manifest)


def available_backends(manifest: EngineManifest | None = None) -> dict[str, str | None]:
    """Every registered backend -> None (runs here) or the reason it does not."""
    return {name: backend_status(name, manifest) for name in REGISTRY}


def open_backend(manifest: EngineManifest, name: str = "auto", **options: Any) -> Backend:
    """Open backend `name` on `manifest` with `options` (base.OPTIONS); `auto` takes the first of
    AUTO_ORDER that runs here.

    An option the backend does not take is refused by name (UnknownOption, an EngineError), and
    a named backend that cannot run here raises EngineError saying what is missing.
    The engine's weights file is checked against the manifest's sha256 first, whatever the
    backend (once per process and file: interactive_features.runtime.weights.verify_weights).
    """
    verify_weights(manifest.weights_path, manifest.data["weights"]["tensors"])
    if name == "auto":
        name = next(n for n in AUTO_ORDER if n == "ort" or backend_status(n, manifest) is None)
    cls = backend_class(name)
    cls.check_options(options)
    reason = cls.unavailable_reason(manifest)
    if reason is not None:
        raise EngineError(f"backend {name!r} cannot run here: {reason}")
    return cls(manifest, **options)
