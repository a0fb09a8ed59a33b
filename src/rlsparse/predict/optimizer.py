"""Predictors from the AdamW state a ``transformers.Trainer`` saved at step k (``optimizer.pt``).

The saved state is keyed by position, not by name. The Trainer builds two parameter groups from
``model.named_parameters()`` in order: those that get weight decay (``get_decay_parameter_names``)
and the rest (norms, biases); positions count through group 0, then group 1. We rebuild that
order from the checkpoint's ``config.json`` on the meta device (no weights are allocated) and
check every moment's shape against its parameter, so state from another model is refused.

Scores, with bias-corrected moments ``m̂ = m / (1 - β1^t)``, ``v̂ = v / (1 - β2^t)``:

* ``adam_ratio``: ``|m̂| / (sqrt(v̂) + eps)``, the size of Adam's next step in units of lr
  (no natural threshold: give a density).
* ``adam_drift``: the move the element would make if that step kept its sign for ``horizon``
  steps at the learning rate of step k, over half the bf16 spacing of the base value:
  ``lr * horizon * |m̂| / (sqrt(v̂) + eps) / (spacing / 2)``. Below 1 the accumulated move cannot
  cross half a grid step, so a bf16 checkpoint would keep the base value (natural threshold 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rlsparse.errors import CheckpointError, MismatchError, UsageError
from rlsparse.predict.prediction import Prediction
from rlsparse.predict.weights import base_spacing

SCORES = ("adam_ratio", "adam_drift")


def trainer_param_names(checkpoint: str | os.PathLike) -> list[tuple[list[str], list[tuple[int, ...]]]]:
    """The Trainer's parameter groups for the model in ``checkpoint``: (names, shapes) per group."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.trainer_pt_utils import get_parameter_names

    from rlsparse.train.masking import mask_name

    folder = Path(checkpoint)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: no usable config.json ({exc}); pass a Trainer checkpoint folder") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # The Trainer's own rule (transformers.Trainer.get_decay_parameter_names).
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], forbidden))
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[x for x in named if x[0] in decay], [x for x in named if x[0] not in decay]]
    return [([mask_name(n) for n, _ in g], [s for _, s in g]) for g in groups]


def load_moments(checkpoint: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """AdamW moments by parameter name from a Trainer checkpoint folder.

    Returns:
        ({name: {"exp_avg", "exp_avg_sq" (float32 numpy), "step"}}, {"lr", "betas", "eps", "step"}).

    Raises:
        CheckpointError: no ``optimizer.pt``, or it holds no AdamW moments (says what it holds).
        MismatchError: the state does not fit the checkpoint's model (group sizes or shapes).
    """
    import torch

    folder = Path(checkpoint)
    path = folder / "optimizer.pt"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no optimizer.pt; pass a checkpoint folder saved by a Trainer "
                              "(save_only_model=False)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable optimizer state ({type(exc).__name__}); "
                              "pass the optimizer.pt a Trainer saved") from None
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        found = sorted(saved)[:5] if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path}: holds {found}, not an optimizer state_dict (state, param_groups)")
    state, groups = saved["state"], saved["param_groups"]
    keys = sorted({k for s in state.values() for k in s})
    if not state or not {"exp_avg", "exp_avg_sq"} <= set(keys):
        raise CheckpointError(f"{path}: found optimizer state with keys {keys or 'none'} but no AdamW moments "
                              "(exp_avg, exp_avg_sq); use a checkpoint of an Adam/AdamW run after its first step")
    expected = trainer_param_names(folder)
    order = _name_order(groups, expected, path)
    moments: dict[str, dict] = {}
    bad = []
    for index, (name, shape) in order.items():
        s = state.get(index)
        if s is None:  # never stepped (no gradient yet): zero moments, a zero score
            zero = np.zeros(shape, dtype=np.float32)
            moments[name] = {"exp_avg": zero, "exp_avg_sq": zero, "step": 1.0}
            continue
        m, v = s["exp_avg"], s["exp_avg_sq"]
        if tuple(m.shape) != shape or tuple(v.shape) != shape:
            bad.append(f"{name}: moments {list(m.shape)} vs parameter {list(shape)}")
            continue
        moments[name] = {"exp_avg": m.float().numpy(), "exp_avg_sq": v.float().numpy(), "step": float(s["step"])}
    if bad:
        raise MismatchError(f"{path}: the optimizer state is from another model: {len(bad)} shapes differ "
                            f"(e.g. {bad[0]}); use the optimizer.pt saved with this checkpoint")
    g0 = groups[0]
    info = {"lr": float(g0["lr"]), "betas": tuple(float(b) for b in g0["betas"]), "eps": float(g0["eps"]),
            "step": max((m["step"] for m in moments.values()), default=0.0)}
    return moments, info


def _name_order(groups: list[dict], expected, path: Path) -> dict[int, tuple[str, tuple[int, ...]]]:
    sizes = [len(g["params"]) for g in groups]
    want = [len(names) for names, _ in expected]
    if sizes != want:
        raise MismatchError(f"{path}: the optimizer state is from another model: parameter groups of {sizes} "
                            f"parameters, this checkpoint's model has {want}; use the optimizer.pt saved with "
                            "this checkpoint")
    pairs = [(n, s) for names, shapes in expected for n, s in zip(names, shapes)]
    flat = [i for g in groups for i in g["params"]]
    return {i: pairs[pos] for pos, i in enumerate(flat)}


def from_optimizer(base: str | os.PathLike, checkpoint: str | os.PathLike, *, score: str = "adam_drift",
                   horizon: int | None = None) -> Prediction:
    """Predict the final subnetwork from the AdamW state at a Trainer checkpoint.

    Args:
        base: The run's starting checkpoint (its bf16 spacing sets the drift threshold).
        checkpoint: A ``checkpoint-<k>`` folder with ``optimizer.pt`` and ``config.json``.
        score: ``"adam_ratio"`` or ``"adam_drift"`` (see the module docstring).
        horizon: Steps the drift is projected over (default: the run's ``max_steps`` from
            ``trainer_state.json``).

    Example:
        >>> p = from_optimizer("base", "run/checkpoint-15", score="adam_drift")
        >>> p.mask().density
    """
    if score not in SCORES:
        raise UsageError(f"score {score!r}; expected one of {', '.join(SCORES)}")
    if horizon is not None and horizon < 1:
        raise UsageError(f"horizon {horizon}: expected a positive number of steps (the run's length)")
    moments, info = load_moments(checkpoint)
    b1, b2 = info["betas"]
    if horizon is None and score == "adam_drift":
        horizon = _max_steps(Path(checkpoint))
    spacing = base_spacing(base) if score == "adam_drift" else {}
    scores: dict[str, np.ndarray] = {}
    for name, m in moments.items():
        t = m["step"]
        mhat = np.abs(m["exp_avg"]) / (1 - b1 ** t)
        vhat = m["exp_avg_sq"] / (1 - b2 ** t)
        ratio = (mhat / (np.sqrt(vhat) + info["eps"])).astype(np.float32)
        if score == "adam_drift":
            if name not in spacing:
                raise MismatchError(f"{checkpoint}: optimizer moments for {name!r}, which the base {base} lacks; "
                                    "pass the base this run started from")
            ratio = (info["lr"] * horizon * ratio / (spacing[name] / 2)).astype(np.float32)
        scores[name] = ratio
    return Prediction(score, scores, 1.0 if score == "adam_drift" else None,
                      {"base": str(base), "checkpoint": str(checkpoint), "step": info["step"], "lr": info["lr"],
                       "horizon": horizon})


def _max_steps(folder: Path) -> int:
    path = folder / "trainer_state.json"
    try:
        return int(json.loads(path.read_text())["max_steps"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read max_steps ({exc}); pass --horizon STEPS") from None
