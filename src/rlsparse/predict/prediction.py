"""A prediction: a score per element (higher = more likely to be in the final subnetwork) and,
where the predictor has one, a natural threshold (``score > threshold`` is the predicted mask).

Any density can be asked for: the ``round(density * numel)`` highest-scoring elements. Ties at
the cut are broken uniformly at random with a fixed seed, so a predictor whose scores take few
values (precision only, votes) is not favoured by element order.

Scores file (``schema_version`` 1): safetensors, one float32 tensor per parameter (its shape),
metadata ``format = "rlsparse.scores"``, ``schema_version`` and ``rlsparse`` (JSON: predictor,
threshold, parameters, notes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlsparse.errors import MaskError, UsageError
from rlsparse.io.atomic import atomic_path
from rlsparse.masks import Mask

SCORES_FORMAT = "rlsparse.scores"
SCORES_SCHEMA_VERSION = 1


@dataclass
class Prediction:
    """Scores of one predictor over every element of a model.

    Attributes:
        predictor: Its name (``"checkpoint"``, ``"union"``, ``"vote"``, ``"adam_ratio"``,
            ``"adam_drift"``, ``"precision"``, ``"run"``, ``"random"``).
        scores: Per tensor name, float32 scores of the tensor's shape.
        threshold: ``score > threshold`` is the predictor's own mask; None when it has none.
        params: What it was computed from (paths, step, tolerance, learning rate...).

    Example:
        >>> p = from_checkpoints("base", ["run/checkpoint-15"])
        >>> p.mask().density, p.mask(density=0.2).density
    """

    predictor: str
    scores: dict[str, np.ndarray]
    threshold: float | None = None
    params: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(int(s.size) for s in self.scores.values())

    def mask(self, density: float | None = None, seed: int = 0) -> Mask:
        """The predicted subnetwork: at ``density`` (top scores), else at the natural threshold."""
        if density is None:
            if self.threshold is None:
                raise UsageError(f"predictor {self.predictor!r} has no natural threshold; give a density "
                                 "(--density, a fraction in [0, 1])")
            bits = {n: _above(s, self.threshold) for n, s in self.scores.items()}
            how = f"score > {self.threshold:g}"
        else:
            bits = top_fraction(self.scores, density, seed)
            how = f"top {density:.6g} of elements by score (ties broken at random, seed {seed})"
        import torch

        extra = {"predictor": self.predictor, "selection": how, **self.params}
        return Mask.from_tensors({n: torch.from_numpy(b) for n, b in bits.items()},
                                 tolerance=self.params.get("tolerance"), note=f"rlsparse predict {self.predictor}",
                                 extra=extra)

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores atomically (see the module docstring for the format)."""
        from safetensors.numpy import save_file

        meta = {"format": SCORES_FORMAT, "schema_version": str(SCORES_SCHEMA_VERSION),
                "rlsparse": json.dumps({"predictor": self.predictor, "threshold": self.threshold,
                                        "params": self.params}, default=str)}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({n: np.ascontiguousarray(s, dtype=np.float32) for n, s in self.scores.items()}, str(tmp),
                      metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Prediction":
        """Read a scores file written by ``save``; MaskError if it is not one."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise MaskError(f"{p}: no such scores file; pass the .scores.safetensors written by `rlsparse predict`")
        try:
            with safe_open(str(p), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != SCORES_FORMAT:
                    raise MaskError(f"{p}: not an rlsparse scores file (format={meta.get('format')!r}); "
                                    "pass the .scores.safetensors written by `rlsparse predict`")
                doc = json.loads(meta["rlsparse"])
                scores = {n: f.get_tensor(n) for n in f.keys()}
        except MaskError:
            raise
        except Exception as exc:
            raise MaskError(f"{p}: unreadable scores file ({exc}); re-create it with `rlsparse predict`") from None
        return cls(doc["predictor"], scores, doc.get("threshold"), doc.get("params") or {})


def _above(scores: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.asarray(scores > threshold)  # NaN scores are never selected


def top_fraction(scores: dict[str, np.ndarray], density: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Bool arrays selecting the ``round(density * numel)`` highest scores over all tensors.

    Ties at the cut are broken uniformly at random (``seed``); NaN scores rank last.
    """
    if not 0.0 <= density <= 1.0:
        raise UsageError(f"density {density} is not a fraction in [0, 1]; give e.g. 0.05 for 5% of elements")
    names = list(scores)
    flat = np.concatenate([np.nan_to_num(scores[n].reshape(-1).astype(np.float64), nan=-np.inf) for n in names]) \
        if names else np.zeros(0)
    n = flat.size
    k = int(round(density * n))
    chosen = np.zeros(n, dtype=bool)
    if k > 0:
        cut = np.partition(flat, n - k)[n - k]  # the k-th largest score
        above = flat > cut
        chosen |= above
        tied = np.flatnonzero(flat == cut)
        need = k - int(above.sum())
        rng = np.random.default_rng(seed)
        chosen[rng.choice(tied, size=need, replace=False)] = True
    out, start = {}, 0
    for name in names:
        size = scores[name].size
        out[name] = chosen[start:start + size].reshape(scores[name].shape)
        start += size
    return out
