"""The runtime: numpy + onnxruntime + Pillow only (no torch unless a torch backend is asked for).

`from interactive_features.runtime import Extractor` is the entry point, `index_job` runs
`interactive index` from Python, `build_knn` and `KnnIndex` build and search a kNN index over its
output (faiss, the `knn` extra), `evaluate` runs `interactive eval` (scikit-learn, the `eval`
extra); submodules load lazily so that light commands (`interactive buckets`) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Extractor, Features, index_job
    from .evaluation import EvalReport, evaluate
    from .knn import KnnIndex, SearchResults, build_knn

# Each exported name -> the submodule defining it (imported on first use).
_MODULES = {"Extractor": "api", "Features": "api", "index_job": "api",
            "KnnIndex": "knn", "SearchResults": "knn", "build_knn": "knn",
            "evaluate": "evaluation", "EvalReport": "evaluation"}  # fmt: skip
__all__ = [
    "Extractor", "Features", "index_job", "KnnIndex", "SearchResults", "build_knn", "evaluate",
    "EvalReport",
]  # fmt: skip
assert set(__all__) == set(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        from importlib import import_module

        return getattr(import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
