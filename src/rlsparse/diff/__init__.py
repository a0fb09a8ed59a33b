"""Diffing checkpoints: ``rlsparse.diff(base, finetuned)`` and what it returns.

The package itself is callable (``rlsparse.diff(...)`` is ``rlsparse.diff.diff(...)``), so the
function and its submodules (``rlsparse.diff.kernel``...) share one name.
"""

import sys
import types

from rlsparse.diff.api import diff
from rlsparse.diff.tolerance import DEFAULT_TOLERANCES, PAPER_TOLERANCE
from rlsparse.diff.result import Aggregate, DiffResult, TensorStats, tolerance_label

__all__ = ["DEFAULT_TOLERANCES", "PAPER_TOLERANCE", "Aggregate", "DiffResult", "TensorStats", "diff",
           "tolerance_label"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return diff(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
