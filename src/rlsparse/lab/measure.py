"""Everything the lab borrows from other rlsparse stages, in one place.

Sparsity (``rlsparse.diff``), masks (``rlsparse.masks``), update rank (``rlsparse.analysis``)
and subnetwork-only training (``rlsparse.train``) are used through the small functions here,
so integrating the real implementations touches this file only.

``backend()`` says which implementation is in use, and the runner records it in ``run.json``:
"rlsparse" when ``rlsparse.diff.diff``, ``rlsparse.masks.Mask`` and ``rlsparse.train.MaskCallback``
are importable, else "lab-local", the stand-ins below, written against the same interfaces and
checked to give the same counts as ``rlsparse.diff`` on the lab's checkpoints.

TODO(integrate): once diff/masks/train are on this branch, delete the "lab-local" stand-ins
(``_local_sparsity``, ``MaskedTraining``) and ``backend()``; ``update_rank`` -> ``rlsparse.analysis``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlsparse.errors import CheckpointError, MismatchError

TOLERANCES = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")
PAPER_TOLERANCE = "1e-05"


def _weights(folder: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    files = [f for f in files if f.is_file()]
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors file; expected an HF model folder")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _meaning(name: str) -> tuple[int | None, str]:
    """(layer index, matrix type) of a Llama tensor name, e.g. (3, "q_proj")."""
    m = re.search(r"layers\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    parts = name.split(".")
    kind = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return layer, kind


def backend() -> str:
    """"rlsparse" when the real diff/masks/train stages are importable, else "lab-local"."""
    try:
        from rlsparse.diff import diff  # noqa: F401
        from rlsparse.masks import Mask  # noqa: F401
        from rlsparse.train import attach_mask  # noqa: F401
    except ImportError:
        return "lab-local"
    return "rlsparse"


def sparsity(base: str | os.PathLike, finetuned: str | os.PathLike, tolerances=TOLERANCES) -> dict:
    """Update sparsity between two checkpoints, in total, per layer, per matrix type and per (layer, type).

    Values are compared as stored (bf16 checkpoints are widened to float32): an element
    counts as changed when ``|new - old| > tol`` (``new != old`` at tolerance 0).

    Returns:
        {"numel", "changed": {label: n}, "sparsity": {label: s}, "by_layer", "by_type", "grid"},
        where the groupings map a key ("3", "q_proj", "3|q_proj") to {"numel", "changed": {label: n}}.
    """
    if backend() == "lab-local":
        return _local_sparsity(base, finetuned, tolerances)
    from rlsparse.diff import diff

    r = diff(base, finetuned, tolerances=list(tolerances))
    agg = lambda a: {"numel": a.numel, "changed": {t: int(a.changed[t]) for t in tolerances}}  # noqa: E731
    total = agg(r.total)
    total["sparsity"] = {t: 1 - total["changed"][t] / total["numel"] for t in tolerances}
    return {**total, "by_layer": {str(k): agg(a) for k, a in r.by_layer().items()},
            "by_type": {str(k): agg(a) for k, a in r.by_type().items()},
            "grid": {f"{k[0]}|{k[1]}": agg(a) for k, a in r.grid().items()}}


def _local_sparsity(base, finetuned, tolerances=TOLERANCES) -> dict:
    import torch

    a, b = _weights(base), _weights(finetuned)
    problems = []
    if set(a) != set(b):
        problems.append(f"tensor names differ ({sorted(set(a) ^ set(b))[:3]} ...)")
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape:
            problems.append(f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
    if problems:
        raise MismatchError(f"{base} and {finetuned} are not the same model: " + "; ".join(problems[:5]) +
                            "; compare two checkpoints of one architecture")
    total = {"numel": 0, "changed": {t: 0 for t in tolerances}}
    by_layer: dict = {}
    by_type: dict = {}
    grid: dict = {}
    for k in sorted(a):
        old, new = a[k].to(torch.float32), b[k].to(torch.float32)
        delta = (new - old).abs()
        counts = {t: int((new != old).sum()) if float(t) == 0 else int((delta > float(t)).sum()) for t in tolerances}
        layer, kind = _meaning(k)
        for bucket in (total, by_layer.setdefault(str(layer), {"numel": 0, "changed": {t: 0 for t in tolerances}}),
                       by_type.setdefault(kind, {"numel": 0, "changed": {t: 0 for t in tolerances}}),
                       grid.setdefault(f"{layer}|{kind}", {"numel": 0, "changed": {t: 0 for t in tolerances}})):
            bucket["numel"] += old.numel()
            for t in tolerances:
                bucket["changed"][t] += counts[t]
    total["sparsity"] = {t: 1 - total["changed"][t] / total["numel"] for t in tolerances}
    return {**total, "by_layer": by_layer, "by_type": by_type, "grid": grid}


def update_rank(base: str | os.PathLike, finetuned: str | os.PathLike) -> dict:
    """Mean rank of the 2-D update matrices as a fraction of the maximum possible rank (Table 2).

    TODO(integrate): replace with ``rlsparse.analysis`` update rank.

    Returns:
        {"mean_rank_fraction": float, "per_matrix": {name: fraction}}.
    """
    import torch

    a, b = _weights(base), _weights(finetuned)
    per = {}
    for k in sorted(a):
        if a[k].ndim != 2 or "embed_tokens" in k or "lm_head" in k:
            continue
        delta = b[k].to(torch.float32) - a[k].to(torch.float32)
        per[k] = int(torch.linalg.matrix_rank(delta)) / min(delta.shape)
    mean = sum(per.values()) / len(per) if per else float("nan")
    return {"mean_rank_fraction": mean, "per_matrix": per}


def subnetwork_mask(base: str | os.PathLike, finetuned: str | os.PathLike, tolerance: str = PAPER_TOLERANCE) -> dict:
    """The subnetwork of a finetune: per tensor, True where ``|new - old| > tolerance``.

    Same rule as ``rlsparse.diff``'s mask (``|new - old| > tolerance``); kept as in-memory tensors
    because the rerun starts at once. TODO(integrate): or ``diff(..., mask_path=...)`` + ``Mask.load``.
    """
    import torch

    a, b = _weights(base), _weights(finetuned)
    tol = float(tolerance)
    return {k: ((b[k].to(torch.float32) - a[k].to(torch.float32)).abs() > tol) if tol > 0 else (b[k] != a[k])
            for k in a}


def masked_training(model, mask: dict):
    """Start subnetwork-only training of ``model``; returns (trainer callback, finish()).

    ``finish()`` detaches the masking after training. With the real backend this is
    ``rlsparse.train.MaskCallback`` (verify=True: it raises if a masked-out element moved).
    """
    if backend() == "lab-local":
        masked = MaskedTraining(model, mask)

        def finish():
            masked.restore()
            masked.detach()

        return masked.callback(), finish
    from rlsparse.masks import Mask
    from rlsparse.train import MaskCallback

    return MaskCallback(Mask.from_tensors(mask), verify=True), (lambda: None)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class MaskedTraining:
    """Train only a subnetwork: zero the gradients outside the mask, and pin those values.

    Gradient hooks keep Adam's moments at zero outside the mask (so its update there is zero);
    after every optimiser step the frozen elements are also reset to their starting values,
    so weight decay or numerical noise cannot move them. Use ``callback()`` inside a TRL
    trainer.

    TODO(integrate): the lab-local stand-in for ``rlsparse.train.MaskCallback(mask)``.

    Example:
        >>> masked = MaskedTraining(model, mask)
        >>> trainer = GRPOTrainer(..., callbacks=[masked.callback()])
    """

    def __init__(self, model, mask: dict):
        import torch

        names = dict(model.named_parameters())
        missing = sorted(set(names) - set(mask))
        if missing:
            raise MismatchError(f"the mask has no entry for {len(missing)} parameters (e.g. {missing[0]}); "
                                "build the mask from a checkpoint of this model")
        self._frozen = {}
        self._hooks = []
        for name, param in names.items():
            keep = mask[name].to(param.device, torch.bool)
            if tuple(keep.shape) != tuple(param.shape):
                raise MismatchError(f"mask for {name} has shape {tuple(keep.shape)}, the parameter "
                                    f"{tuple(param.shape)}; build the mask from this model")
            self._frozen[name] = (param, keep, param.detach().clone())
            self._hooks.append(param.register_hook(lambda g, keep=keep: g * keep))

    def restore(self) -> None:
        """Reset every element outside the mask to its starting value."""
        import torch

        with torch.no_grad():
            for param, keep, start in self._frozen.values():
                param.copy_(torch.where(keep, param, start))

    def callback(self):
        """A transformers ``TrainerCallback`` that calls ``restore()`` after each step."""
        outer = self

        class _Callback(_callback_base()):
            def on_step_end(self, args, state, control, **kwargs):
                outer.restore()

        return _Callback()

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
