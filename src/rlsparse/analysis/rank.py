"""Rank of update matrices (the paper's Table 2: RL updates are sparse but nearly full rank).

For each 2-D matrix, ``D = W_finetuned - W_base`` in float32 (stored values widened) and its
singular values ``s_1 >= s_2 >= ...``:
- numerical rank: ``#{i : s_i > tol}`` with ``tol = rtol * s_1`` and, by default,
  ``rtol = max(m, n) * eps(float32)`` (``torch.linalg.matrix_rank``'s default), reported as a
  percentage of the maximum possible rank ``min(m, n)``;
- stable rank: ``||D||_F^2 / ||D||_2^2 = sum(s_i^2) / s_1^2``;
- effective rank (Roy & Vetterli, 2007): ``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum(s)``.
A zero update has rank 0 and undefined (None) stable and effective ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from rlsparse._version import __version__
from rlsparse.analysis._common import SCHEMA_VERSION, MatrixGroups, resolve_device, walk_matrices
from rlsparse.errors import UsageError
from rlsparse.io.naming import type_of
from rlsparse.io.reader import TensorReader


@dataclass(frozen=True)
class MatrixRank:
    """Ranks of one update matrix."""

    name: str
    shape: tuple[int, int]
    rank: int
    rtol: float
    tol: float  # absolute threshold on singular values: rtol * s_max
    s_max: float
    stable_rank: float | None
    effective_rank: float | None

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def rank_pct(self) -> float:
        return 100.0 * self.rank / self.max_rank if self.max_rank else 0.0

    @property
    def type(self) -> str:
        return type_of(self.name)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "rank": self.rank, "max_rank": self.max_rank, "rank_pct": self.rank_pct,
                "rtol": self.rtol, "tol": self.tol, "s_max": self.s_max, "stable_rank": self.stable_rank,
                "effective_rank": self.effective_rank}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class RankResult(MatrixGroups):
    """Ranks of the selected update matrices; means are unweighted over matrices (as the paper).

    Example:
        >>> r = rank("Llama-3.1-Tulu-3-8B-SFT", "Llama-3.1-Tulu-3-8B-DPO", layers=[0, 15, 31])
        >>> r.mean_rank_pct, r.by_type()["q"]["rank_pct"]
    """

    base: str
    finetuned: str
    matrices: list[MatrixRank]
    device: str
    rtol: float | None  # None: the default max(m, n) * eps per matrix
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def mean_rank_pct(self) -> float | None:
        return _mean(m.rank_pct for m in self.matrices)

    @staticmethod
    def _summary(ms: list[MatrixRank]) -> dict:
        return {"matrices": len(ms), "rank_pct": _mean(m.rank_pct for m in ms),
                "stable_rank": _mean(m.stable_rank for m in ms),
                "effective_rank": _mean(m.effective_rank for m in ms),
                "effective_rank_pct": _mean(None if m.effective_rank is None else 100 * m.effective_rank / m.max_rank
                                            for m in ms)}

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "rank",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "delta": "finetuned - base, stored values widened to float32",
                "rank": "number of singular values > tol, tol = rtol * s_max",
                "rtol": "default max(m, n) * eps(float32) (torch.linalg.matrix_rank's default)",
                "rank_pct": "100 * rank / min(m, n)",
                "stable_rank": "||D||_F^2 / ||D||_2^2",
                "effective_rank": "exp(entropy of s / sum(s)) (Roy & Vetterli)",
                "means": "unweighted over matrices",
            },
            "base": self.base,
            "finetuned": self.finetuned,
            "device": self.device,
            "rtol": self.rtol if self.rtol is not None else "max(m,n)*eps",
            "eps": _EPS,
            "notes": list(self.notes),
            "total": self._summary(self.matrices),
            "by_type": self.by_type(),
            "by_layer": self.by_layer(),
            "matrices": {m.name: m.to_json() for m in self.matrices},
            "elapsed_s": self.elapsed_s,
        }


_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps


@contextlib.contextmanager
def one_thread():
    """Run torch's CPU kernels on one thread inside the block, then restore the thread count.

    LAPACK's SVD on these shapes does not gain from a second thread and loses badly when the
    threads wait on each other: a 576x1536 ``svdvals`` took 60 s on two threads of a loaded
    2-core machine against 2.2 s on one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matrix_ranks(delta, rtol: float | None = None) -> tuple[int, float, float, float, float | None, float | None]:
    """(rank, rtol, tol, s_max, stable rank, effective rank) of one float32 matrix on any device.

    Example:
        >>> matrix_ranks(torch.eye(4))[0]
        4
    """
    import torch

    with one_thread():
        s = torch.linalg.svdvals(delta).double()
    m, n = delta.shape
    r = rtol if rtol is not None else max(m, n) * _EPS
    s_max = float(s[0]) if s.numel() else 0.0
    tol = r * s_max
    rank = int((s > tol).sum()) if s_max > 0 else 0
    if s_max == 0 or not math.isfinite(s_max):
        return rank, r, tol, s_max, None, None
    stable = float((s * s).sum()) / s_max ** 2
    p = s / s.sum()
    p = p[p > 0]
    effective = float(torch.exp(-(p * p.log()).sum()))
    return rank, r, tol, s_max, stable, effective


def rank(base: str | os.PathLike, finetuned: str | os.PathLike, *, device: str | None = None,
         rtol: float | None = None, include_embeddings: bool = False, layers: Sequence[int] | None = None,
         max_matrices: int | None = None, progress: bool = False) -> RankResult:
    """Numerical, stable and effective rank of every 2-D update matrix (one matrix in memory at a time).

    Args:
        base: Checkpoint before finetuning.
        finetuned: Checkpoint after finetuning.
        device: "cuda", "cpu"...; default cuda when available.
        rtol: Singular values above ``rtol * s_max`` count; default ``max(m, n) * eps(float32)``.
        include_embeddings: Also the embedding and lm_head matrices (large).
        layers: Only these transformer blocks.
        max_matrices: At most this many matrices, evenly spaced over (layer, type) order.
        progress: Show a progress bar on stderr.

    Returns:
        RankResult.

    Example:
        >>> r = rank("sft", "dpo", max_matrices=20)
        >>> print(f"{r.mean_rank_pct:.1f}% of full rank")
    """
    import torch

    if rtol is not None and not (0 <= rtol < 1):
        raise UsageError(f"rtol={rtol}: must be in [0, 1)")
    dev = resolve_device(device)
    out: list[MatrixRank] = []
    t0 = time.perf_counter()
    with walk_matrices(base, finetuned, include_embeddings=include_embeddings, layers=layers,
                       max_matrices=max_matrices, progress=progress, what="rank") as walk:
        for name, info_base, info_ft, reader in walk.items:
            delta = _delta(reader, info_base, info_ft, dev)
            if not bool(torch.isfinite(delta).all()):
                walk.notes.append(f"{name}: the update holds NaN/Inf; skipped")
            else:
                r, used, tol, s_max, stable, eff = matrix_ranks(delta, rtol)
                out.append(MatrixRank(name, tuple(delta.shape), r, used, tol, s_max, stable, eff))
            del delta
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    if not out:
        raise UsageError("every selected update matrix holds NaN/Inf: nothing to analyse")
    return RankResult(walk.base.source, walk.finetuned.source, out, dev, rtol, walk.notes, time.perf_counter() - t0)


def _delta(reader: TensorReader, base_info, ft_info, device: str):
    """finetuned - base as float32 on ``device``."""
    import torch

    w0 = reader.read_tensor(base_info).to(device=device, dtype=torch.float32)
    w1 = reader.read_tensor(ft_info).to(device=device, dtype=torch.float32)
    w1 -= w0
    return w1
