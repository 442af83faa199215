"""The runtime: numpy + onnxruntime + Pillow only (no torch unless a torch backend is asked for).

`from interactive_features.runtime import Extractor` is the entry point, `index_job` runs
`interactive index` from Python, `evaluate` runs `interactive eval` (needs scikit-learn);
submodules load lazily so that light commands (`interactive buckets`) start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Extractor, Features, index_job
    from .evaluation import EvalReport, evaluate

__all__ = ["Extractor", "Features", "index_job", "evaluate", "EvalReport"]
# The submodule each public name lives in.
_MODULES = {"evaluate": "evaluation", "EvalReport": "evaluation"}


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = import_module(f".{_MODULES.get(name, 'api')}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
