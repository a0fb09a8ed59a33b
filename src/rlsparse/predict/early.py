"""Predictors from checkpoints: what changed by step k, and what a cheaper run changed.

* ``checkpoint``: the mask at step k (score ``|θ_k - θ_0|``; natural threshold: the tolerance).
* ``union``: changed in any of the run's checkpoints up to step k (score: the largest ``|Δ|``).
* ``vote``: changed in most of them (score: in how many it changed; threshold: half of them).
* ``run``: the mask of a different, cheaper run from the same base (another algorithm, a shorter
  run, another seed): the ``checkpoint`` score on that run's final weights.

Fp32 Trainer checkpoints of a bf16 base are seen as the bf16 checkpoints they would be saved as
(see ``weights.paired_values``): the final subnetwork is measured on bf16 checkpoints too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from rlsparse.analysis._common import PAPER_TOLERANCE, check_tolerance
from rlsparse.errors import CheckpointError, UsageError
from rlsparse.predict.prediction import Prediction
from rlsparse.predict.weights import paired_values

_STEP = re.compile(r"^checkpoint-(\d+)$")
METHODS = ("checkpoint", "union", "vote")


def run_checkpoints(run: str | os.PathLike) -> dict[int, Path]:
    """The ``checkpoint-<step>`` folders of a Trainer output folder, by step.

    Example:
        >>> sorted(run_checkpoints("runs/grpo"))[:3]
        [3, 6, 9]
    """
    root = Path(run)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder; expected a Trainer output folder with checkpoint-<step> folders")
    found = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))}
    if not found:
        raise CheckpointError(f"{root}: holds no checkpoint-<step> folders; train with save_steps so it does")
    return dict(sorted(found.items()))


def checkpoint_at(run: str | os.PathLike, step: int) -> Path:
    """The run's checkpoint at ``step``; UsageError if the run has none there (with what it has)."""
    found = run_checkpoints(run)
    if step in found:
        return found[step]
    last = max(found)
    if step > last:
        raise UsageError(f"step {step} is beyond the run {run}: its checkpoints go up to step {last}; "
                         f"choose a step from {_some(found)}")
    raise UsageError(f"{run} has no checkpoint at step {step}; it has steps {_some(found)}")


def _some(found: dict) -> str:
    steps = list(found)
    return ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ... {steps[-1]}"


def from_checkpoints(base: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], *, method: str = "checkpoint",
                     tolerance: float = PAPER_TOLERANCE, predictor: str | None = None) -> Prediction:
    """Predict the final subnetwork from early checkpoints of a run (or the end of another run).

    Args:
        base: The checkpoint training started from (the final mask's base).
        checkpoints: The run's checkpoints up to step k, in step order (the last one is step k).
        method: ``"checkpoint"`` (the last one only), ``"union"`` or ``"vote"`` (see the module docstring).
        tolerance: ``|Δ| > tolerance`` counts as changed (the final mask's tolerance).
        predictor: Name recorded in the prediction (default: ``method``; ``"run"`` for another run).

    Example:
        >>> p = from_checkpoints("base", ["run/checkpoint-3", "run/checkpoint-6"], method="union")
        >>> p.mask().save("union@6.mask.safetensors")
    """
    if method not in METHODS:
        raise UsageError(f"method {method!r}; expected one of {', '.join(METHODS)}")
    if not checkpoints:
        raise UsageError("no checkpoints given; pass at least one checkpoint folder")
    tolerance = check_tolerance(tolerance)
    used = list(checkpoints) if method != "checkpoint" else [checkpoints[-1]]
    scores: dict[str, np.ndarray] = {}
    for ck in used:
        for name, vb, vo, _ in paired_values(base, ck):
            with np.errstate(invalid="ignore"):
                delta = np.abs(vo - vb)
            delta = np.where(np.isnan(vb) & np.isnan(vo), 0.0, np.nan_to_num(delta, nan=np.inf)).astype(np.float32)
            if method == "vote":
                delta = (delta > tolerance).astype(np.float32)
            prev = scores.get(name)
            if prev is None:
                scores[name] = delta
            elif method == "vote":
                prev += delta
            else:
                np.maximum(prev, delta, out=prev)
    threshold = len(used) / 2 if method == "vote" else tolerance
    return Prediction(predictor or method, scores, threshold,
                      {"base": str(base), "checkpoints": [str(c) for c in used], "tolerance": tolerance,
                       "method": method})
