"""What the lab measures, through the same stages every user runs.

Sparsity is ``rlsparse.diff``, the subnetwork is a ``rlsparse.masks.Mask`` file written by
``diff``, update rank is ``rlsparse.analysis.rank`` and subnetwork-only training is
``rlsparse.train.MaskCallback``: the lab reports exactly what the commands would print on the
same checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

TOLERANCES = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")
from rlsparse.diff.tolerance import PAPER_TOLERANCE_KEY as PAPER_TOLERANCE  # noqa: E402  (the canonical "1e-05")


def sparsity(base: str | os.PathLike, finetuned: str | os.PathLike, tolerances=TOLERANCES) -> dict:
    """Update sparsity between two checkpoints, in total, per layer, per matrix type and per (layer, type).

    Returns:
        {"numel", "changed": {label: n}, "sparsity": {label: s}, "by_layer", "by_type", "grid"},
        where the groupings map a key ("3", "q", "3|q") to {"numel", "changed": {label: n}}.
    """
    from rlsparse.diff import diff

    r = diff(base, finetuned, tolerances=list(tolerances))
    agg = lambda a: {"numel": a.numel, "changed": {t: int(a.changed[t]) for t in tolerances}}  # noqa: E731
    total = agg(r.total)
    total["sparsity"] = {t: 1 - total["changed"][t] / total["numel"] for t in tolerances}
    return {**total, "by_layer": {str(k): agg(a) for k, a in r.by_layer().items()},
            "by_type": {str(k): agg(a) for k, a in r.by_type().items()},
            "grid": {f"{k[0]}|{k[1]}": agg(a) for k, a in r.grid().items()}}


def update_rank(base: str | os.PathLike, finetuned: str | os.PathLike) -> dict:
    """Mean rank of the 2-D update matrices (embeddings excluded) as a fraction of the maximum (Table 2).

    Returns:
        {"mean_rank_fraction", "mean_effective_rank_fraction", "per_matrix": {name: fraction}}.
    """
    from rlsparse.analysis.rank import rank

    r = rank(base, finetuned, device="cpu")
    per = {m.name: m.rank_pct / 100 for m in r.matrices}
    eff = [m.effective_rank / m.max_rank for m in r.matrices if m.effective_rank is not None and m.max_rank]
    return {"mean_rank_fraction": sum(per.values()) / len(per) if per else float("nan"),
            "mean_effective_rank_fraction": sum(eff) / len(eff) if eff else float("nan"),
            "per_matrix": per}


def subnetwork_mask(base: str | os.PathLike, finetuned: str | os.PathLike, path: str | os.PathLike,
                    tolerance: str = PAPER_TOLERANCE):
    """The subnetwork of a finetune (changed at ``tolerance``), saved as a mask file at ``path``."""
    from rlsparse.diff import diff
    from rlsparse.masks import Mask

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    diff(base, finetuned, tolerances=[tolerance], mask_path=path, mask_tolerance=tolerance)
    return Mask.load(path)


def changed_outside(base: str | os.PathLike, trained: str | os.PathLike, mask) -> int:
    """Elements that differ from ``base`` (bit for bit) outside ``mask``: 0 when masking held."""
    import tempfile

    from rlsparse.diff import diff
    from rlsparse.masks import Mask

    with tempfile.TemporaryDirectory(prefix="rlsparse-lab-") as tmp:
        moved_path = Path(tmp) / "moved.safetensors"
        diff(base, trained, tolerances=[0.0], mask_path=moved_path, mask_tolerance=0.0)
        moved = Mask.load(moved_path)
        moved.check_compatible(mask, "the trained model and the subnetwork mask")
        return sum(int((moved.get(n) & ~mask.get(n)).sum()) for n in moved.names)


def masked_training(mask):
    """A trainer callback that trains only ``mask`` and, at the end, verifies that nothing else moved."""
    from rlsparse.train import MaskCallback

    return MaskCallback(mask, verify=True)
