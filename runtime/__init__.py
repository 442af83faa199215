"""The runtime: numpy + onnxruntime + Pillow only (no torch unless a torch backend is asked for).

`from interactive_features.runtime import Extractor` is the entry point, `index_job` runs
`interactive index` from Python; submodules load lazily so that light commands
(`interactive buckets`) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Extractor, Features, index_job

__all__ = ["Extractor", "Features", "index_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
