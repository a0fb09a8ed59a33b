"""How finetuning moves the dominant singular structure of each weight matrix.

For a base matrix ``W0 = U0 S0 V0^T`` and finetuned ``W1 = U1 S1 V1^T`` (float32, thin SVDs,
singular values in decreasing order), ``D = W1 - W0`` and the top ``k`` directions:
- *rotation*: the principal angles between span(U0[:, :k]) and span(U1[:, :k]) (left) and
  between span(V0[:, :k]) and span(V1[:, :k]) (right): ``arccos`` of the singular values of
  ``U0k^T U1k`` (resp. ``V0k^T V1k``), in degrees; we report the largest and the mean.
- *singular value change*: ``(s1_i - s0_i) / s0_i`` for i = 1..k; we report the mean and the
  largest absolute value.
- *energy outside*: the share of the update's squared Frobenius norm outside the base's top-k
  block ``span{u_i v_j^T : i, j <= k}``:
  ``1 - ||U0k^T D V0k||_F^2 / ||D||_F^2``. 0 means the update only reweights the top-k
  directions among themselves; 1 means it lies entirely outside them. None for a zero update.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from rlsparse._version import __version__
from rlsparse.analysis._common import SCHEMA_VERSION, MatrixGroups, resolve_device, walk_matrices
from rlsparse.errors import UsageError
from rlsparse.io.naming import type_of

DEFAULT_TOP_K = 16


@dataclass(frozen=True)
class MatrixSpectrum:
    """Spectral change of one matrix (angles in degrees)."""

    name: str
    shape: tuple[int, int]
    k: int
    left_angle_max: float
    left_angle_mean: float
    right_angle_max: float
    right_angle_mean: float
    sv_rel_change_mean: float | None
    sv_rel_change_max_abs: float | None
    energy_outside: float | None

    @property
    def type(self) -> str:
        return type_of(self.name)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "k": self.k, "left_angle_max_deg": self.left_angle_max,
                "left_angle_mean_deg": self.left_angle_mean, "right_angle_max_deg": self.right_angle_max,
                "right_angle_mean_deg": self.right_angle_mean, "sv_rel_change_mean": self.sv_rel_change_mean,
                "sv_rel_change_max_abs": self.sv_rel_change_max_abs, "energy_outside": self.energy_outside}


_FIELDS = ("left_angle_max", "left_angle_mean", "right_angle_max", "right_angle_mean", "sv_rel_change_mean",
           "sv_rel_change_max_abs", "energy_outside")


@dataclass
class SpectralResult(MatrixGroups):
    """Spectral changes of the selected matrices; group values are unweighted means over matrices.

    Example:
        >>> r = spectral("sft", "dpo", top_k=8, layers=[0])
        >>> r.by_type()["q"]["energy_outside"]
    """

    base: str
    finetuned: str
    top_k: int
    matrices: list[MatrixSpectrum]
    device: str
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @staticmethod
    def _summary(ms: list[MatrixSpectrum]) -> dict:
        out: dict = {"matrices": len(ms)}
        for f in _FIELDS:
            xs = [getattr(m, f) for m in ms if getattr(m, f) is not None]
            out[f] = sum(xs) / len(xs) if xs else None
        return out

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "spectral",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "angles": "principal angles (degrees) between base and finetuned top-k singular subspaces",
                "sv_rel_change": "(s_finetuned_i - s_base_i) / s_base_i over the top k",
                "energy_outside": "1 - ||U0k^T D V0k||_F^2 / ||D||_F^2, D = finetuned - base (float32)",
            },
            "base": self.base,
            "finetuned": self.finetuned,
            "top_k": self.top_k,
            "device": self.device,
            "notes": list(self.notes),
            "total": self._summary(self.matrices),
            "by_type": self.by_type(),
            "by_layer": self.by_layer(),
            "matrices": {m.name: m.to_json() for m in self.matrices},
            "elapsed_s": self.elapsed_s,
        }


def matrix_spectrum(w0, w1, k: int, name: str = "") -> MatrixSpectrum:
    """Spectral change from ``w0`` to ``w1`` (float32 tensors on one device), top ``k`` directions.

    Example:
        >>> matrix_spectrum(torch.eye(4), 2 * torch.eye(4), k=2).sv_rel_change_mean
        1.0
    """
    import torch

    k = max(1, min(k, *w0.shape))
    u0, s0, v0h = torch.linalg.svd(w0, full_matrices=False)
    u1, s1, v1h = torch.linalg.svd(w1, full_matrices=False)
    u0k, u1k = u0[:, :k], u1[:, :k]
    v0k, v1k = v0h[:k].T, v1h[:k].T
    left = _angles(u0k, u1k)
    right = _angles(v0k, v1k)
    s0k, s1k = s0[:k].double(), s1[:k].double()
    keep = s0k > 0
    rel = ((s1k[keep] - s0k[keep]) / s0k[keep]) if bool(keep.any()) else None
    d = (w1 - w0).double()
    energy = float((d * d).sum())
    inside = u0k.double().T @ d @ v0k.double()
    outside = None if energy == 0 else min(1.0, max(0.0, 1.0 - float((inside * inside).sum()) / energy))
    return MatrixSpectrum(
        name, tuple(w0.shape), k, float(left.max()), float(left.mean()), float(right.max()), float(right.mean()),
        None if rel is None else float(rel.mean()), None if rel is None else float(rel.abs().max()), outside)


def _angles(a, b):
    import torch

    cos = torch.linalg.svdvals(a.double().T @ b.double()).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def spectral(base: str | os.PathLike, finetuned: str | os.PathLike, *, top_k: int = DEFAULT_TOP_K,
             device: str | None = None, include_embeddings: bool = False, layers: Sequence[int] | None = None,
             max_matrices: int | None = None, progress: bool = False) -> SpectralResult:
    """Rotation of the top-k singular subspaces, change of the top-k singular values and the
    update's energy outside the base's top-k block, for every 2-D matrix.

    Args:
        base: Checkpoint before finetuning.
        finetuned: Checkpoint after finetuning.
        top_k: Number of leading singular directions (clipped to ``min(m, n)``).
        device: "cuda", "cpu"...; default cuda when available.
        include_embeddings: Also the embedding and lm_head matrices (large).
        layers: Only these transformer blocks.
        max_matrices: At most this many matrices, evenly spaced over (layer, type) order.
        progress: Show a progress bar on stderr.

    Returns:
        SpectralResult.

    Example:
        >>> r = spectral("sft", "dpo", top_k=16, max_matrices=10)
        >>> r.to_json()["total"]["energy_outside"]
    """
    import torch

    if top_k < 1:
        raise UsageError(f"top_k={top_k}: must be at least 1")
    dev = resolve_device(device)
    out: list[MatrixSpectrum] = []
    t0 = time.perf_counter()
    with walk_matrices(base, finetuned, include_embeddings=include_embeddings, layers=layers,
                       max_matrices=max_matrices, progress=progress, what="spectral") as walk:
        for name, info_base, info_ft, reader in walk.items:
            w0 = reader.read_tensor(info_base).to(device=dev, dtype=torch.float32)
            w1 = reader.read_tensor(info_ft).to(device=dev, dtype=torch.float32)
            if not (bool(torch.isfinite(w0).all()) and bool(torch.isfinite(w1).all())):
                walk.notes.append(f"{name}: holds NaN/Inf; skipped")
            else:
                out.append(matrix_spectrum(w0, w1, top_k, name))
            del w0, w1
    if not out:
        raise UsageError("every selected matrix holds NaN/Inf: nothing to analyse")
    return SpectralResult(walk.base.source, walk.finetuned.source, top_k, out, dev, walk.notes,
                          time.perf_counter() - t0)
