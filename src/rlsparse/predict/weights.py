"""Whole tensors of a checkpoint as float32, through the project's one reader.

Predictors look at every element of a model at once (to rank them), so they hold one float32
copy per tensor; fine up to a few hundred million parameters on a laptop.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from rlsparse.analysis._common import open_checkpoint, pair_tensors
from rlsparse.analysis.precision import spacing
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.reader import TensorReader


def paired_values(base: str | os.PathLike | Checkpoint, other: str | os.PathLike | Checkpoint,
                  view: str = "base") -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
    """Yield ``(name, base float32, other float32, base dtype code)`` tensor by tensor.

    Args:
        base, other: Checkpoints of the same model (MismatchError otherwise, every problem at once).
        view: ``"base"`` rounds ``other`` to the base's stored dtype first: an fp32 Trainer
            checkpoint of a bf16 base is seen as the bf16 checkpoint it would be saved as.
            ``"stored"`` compares stored values as they are.
    """
    b, o = open_checkpoint(base), open_checkpoint(other)
    pairs = pair_tensors(b, o)
    with TensorReader() as rb, TensorReader() as ro:
        for name, (ib, io_) in pairs.items():
            vb = dtypes.widen(rb.read(ib, 0, ib.numel), ib.dtype).astype(np.float32, copy=True)
            vo = dtypes.widen(ro.read(io_, 0, io_.numel), io_.dtype).astype(np.float32, copy=True)
            if view == "base" and io_.dtype != ib.dtype:
                vo = dtypes.round_to(vo, ib.dtype)
            yield name, vb.reshape(ib.shape), vo.reshape(io_.shape), ib.dtype


def base_spacing(base: str | os.PathLike | Checkpoint) -> dict[str, np.ndarray]:
    """Per tensor, the grid spacing of the stored dtype at each base value (float64 -> float32).

    For an fp32 base the spacing is taken in bf16 (the dtype checkpoints are saved in here).
    """
    ck = open_checkpoint(base)
    out: dict[str, np.ndarray] = {}
    with TensorReader() as r:
        for name, info in ck.tensors.items():
            raw = r.read(info, 0, info.numel).copy()
            code = info.dtype
            if code != "BF16":
                as_bf16 = dtypes.round_to(dtypes.widen(raw, code).astype(np.float32), "BF16")
                raw, code = (as_bf16.view(np.uint32) >> 16).astype(np.uint16), "BF16"
            out[_clean(name)] = spacing(raw, code).astype(np.float32).reshape(info.shape)
    return out


def base_exponents(base: str | os.PathLike | Checkpoint) -> dict[str, np.ndarray]:
    """Per tensor, the bf16 exponent field (0..255) of each base value, as uint8."""
    ck = open_checkpoint(base)
    out: dict[str, np.ndarray] = {}
    with TensorReader() as r:
        for name, info in ck.tensors.items():
            values = dtypes.widen(r.read(info, 0, info.numel), info.dtype).astype(np.float32)
            bits = dtypes.round_to(values, "BF16").view(np.uint32)
            out[_clean(name)] = ((bits >> 23) & 0xFF).astype(np.uint8).reshape(info.shape)
    return out


def _clean(name: str) -> str:
    from rlsparse.io.naming import strip_prefixes

    return strip_prefixes(name)[0]
