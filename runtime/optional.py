"""The one helper that imports a part needing optional packages."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(RuntimeError):
    """An optional package is not installed; the message says what to install."""


def optional_import(name: str, needs: str, install: str) -> ModuleType:
    """Import module `name`, or raise MissingDependency: "<needs> (<the import error>); install
    them with <install>". The CLI prints it as its one-line error."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependency(f"{needs} ({err}); install them with {install}") from err
