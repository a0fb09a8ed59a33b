"""Predictors that use no training signal: the number format alone, and chance.

* ``precision``: elements whose bf16 grid spacing at the base value is smallest move first
  (score ``1 / (spacing / 2)``). Given the learning rate and the steps of the run, the natural
  threshold keeps the elements an Adam run could move across half a grid step at all: Adam's
  step is at most about ``lr`` per element, so ``lr * steps > spacing / 2`` (score scaled by
  ``lr * steps``, threshold 1).
* ``random``: every element scores the same, so any density is a uniformly random subnetwork.
"""

from __future__ import annotations

import os

import numpy as np

from rlsparse.errors import UsageError
from rlsparse.predict.prediction import Prediction
from rlsparse.predict.weights import base_spacing


def from_precision(base: str | os.PathLike, *, lr: float | None = None, steps: int | None = None) -> Prediction:
    """Rank elements by how fine the number grid is at their base value; no training signal.

    Args:
        base: The checkpoint training starts from.
        lr, steps: The run's peak learning rate and step count; both give the natural threshold.

    Example:
        >>> from_precision("base", lr=3e-6, steps=300).mask().density
    """
    if (lr is None) != (steps is None):
        raise UsageError("give both the learning rate and the steps (or neither) for the precision predictor")
    if lr is not None and (lr <= 0 or steps <= 0):
        raise UsageError(f"learning rate {lr} and steps {steps} must be positive")
    scale = lr * steps if lr is not None else 1.0
    scores = {}
    for name, sp in base_spacing(base).items():
        with np.errstate(divide="ignore"):
            scores[name] = (scale / (sp.astype(np.float64) / 2)).astype(np.float32)
    return Prediction("precision", scores, 1.0 if lr is not None else None,
                      {"base": str(base), "lr": lr, "steps": steps})


def uniform(shapes: dict[str, tuple[int, ...]]) -> Prediction:
    """The chance predictor: equal scores, so ``mask(density)`` is a uniformly random subnetwork."""
    return Prediction("random", {n: np.zeros(tuple(s), dtype=np.float32) for n, s in shapes.items()}, None, {})
