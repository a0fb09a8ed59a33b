"""The per-chunk comparison: exact counts at every tolerance, a |delta| histogram, the mask.

Definitions (the paper's section 2.2, made exact):
- An element is *changed at tolerance t* when ``|new - old| > t``, with ``new`` and ``old`` the
  stored values widened to float32 (FP8 dequantised with its block scale) and the difference
  taken in float32. At t = 0 this is value inequality: -0.0 equals +0.0. NaN at the same place
  on both sides is unchanged; NaN on one side only is changed at every tolerance.
- The *bit-exact* count is the number of elements whose stored bits differ (same dtype only).

Only elements whose bits differ are widened (bits equal implies values equal), so the cost of
the tolerance sweep scales with the density of the update, not with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rlsparse.io import dtypes

HIST_BINS = 2048  # |delta| as float32 bits >> 20: 8 exponent bits, 3 mantissa bits
FP8_BLOCK = 128


def hist_edges() -> np.ndarray:
    """Lower edge of every histogram bin (float32 values, bin k = bits [k << 20, (k+1) << 20))."""
    bits = (np.arange(HIST_BINS + 1, dtype=np.uint64) << 20).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # the top bins are Inf/NaN patterns
        return bits.view(np.float32).astype(np.float64)


def float32_threshold(t: float) -> np.float32:
    """The float32 ``thr`` such that for every float32 d: ``d > t`` (exactly) iff ``d > thr``."""
    thr = np.float32(t)
    if float(thr) > t:
        thr = np.nextafter(thr, np.float32(-np.inf))
    return thr


@dataclass
class Accumulator:
    """Running counts for one tensor."""

    ntol: int
    numel: int = 0
    bit_changed: int | None = 0
    changed: np.ndarray = field(default=None)  # type: ignore[assignment]
    hist: np.ndarray = field(default=None)  # type: ignore[assignment]
    nan_base: int = 0
    nan_finetuned: int = 0
    inf_base: int = 0
    inf_finetuned: int = 0

    def __post_init__(self) -> None:
        self.changed = np.zeros(self.ntol, dtype=np.int64)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)


@dataclass(frozen=True)
class ChunkSpec:
    """How to turn two raw chunks into values."""

    code_a: str
    code_b: str
    compare_code: str | None = None  # cast both to this dtype before comparing
    cols: int = 1  # last-dim size, for block scales


def _values(raw: np.ndarray, code: str, scale: np.ndarray | None, cols: int, compare_code: str | None,
            idx: np.ndarray | None = None) -> np.ndarray:
    vals = dtypes.widen(raw if idx is None else raw[idx], code)
    if scale is not None:
        if idx is None:
            rows = vals.size // cols
            s = np.repeat(np.repeat(scale, FP8_BLOCK, axis=0)[:rows], FP8_BLOCK, axis=1)[:, :cols]
            vals = (vals.reshape(rows, cols) * s).reshape(-1)
        else:
            vals = vals * scale[(idx // cols) // FP8_BLOCK, (idx % cols) // FP8_BLOCK]
    if compare_code is not None and compare_code != "F32":
        t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32))
        vals = t.to(dtypes.torch_dtype(compare_code)).to(torch.float32).numpy()
    return vals


def compare_chunk(a: np.ndarray, b: np.ndarray, spec: ChunkSpec, thresholds: np.ndarray, acc: Accumulator,
                  mask_threshold: np.float32 | None = None, scale_a: np.ndarray | None = None,
                  scale_b: np.ndarray | None = None) -> np.ndarray | None:
    """Compare one chunk; update ``acc``; return the packed mask bits when asked.

    ``a`` and ``b`` are raw bits (unsigned ints of each dtype's width) of the same elements.
    ``thresholds`` are float32 thresholds from ``float32_threshold``.
    """
    n = a.size
    acc.numel += n
    nan, inf = dtypes.nonfinite_counts(a, spec.code_a)
    acc.nan_base += nan
    acc.inf_base += inf
    nan, inf = dtypes.nonfinite_counts(b, spec.code_b)
    acc.nan_finetuned += nan
    acc.inf_finetuned += inf

    same_dtype = spec.code_a == spec.code_b
    if scale_a is None or scale_b is None:
        scales_equal = scale_a is None and scale_b is None
    else:
        scales_equal = scale_a.shape == scale_b.shape and np.array_equal(scale_a.view(np.uint32), scale_b.view(np.uint32))
    if same_dtype:
        neq_bits = a != b
        nbits = int(np.count_nonzero(neq_bits))
        acc.bit_changed = None if acc.bit_changed is None else acc.bit_changed + nbits
    else:
        acc.bit_changed = None

    if same_dtype and scales_equal and spec.compare_code is None:
        # fast path: equal bits mean equal values, so only look at positions whose bits differ
        if nbits == 0:
            return _pack_empty(n) if mask_threshold is not None else None
        idx = np.flatnonzero(neq_bits)
        fa = _values(a, spec.code_a, scale_a, spec.cols, None, idx)
        fb = _values(b, spec.code_b, scale_b, spec.cols, None, idx)
    else:
        idx = None
        fa = _values(a, spec.code_a, scale_a, spec.cols, spec.compare_code)
        fb = _values(b, spec.code_b, scale_b, spec.cols, spec.compare_code)

    equal = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
    keep = ~equal
    if idx is None:
        idx = np.flatnonzero(keep)
        d = np.abs(fb[idx] - fa[idx])
    else:
        if not keep.all():
            idx, fa, fb = idx[keep], fa[keep], fb[keep]
        d = np.abs(fb - fa)
    d = d.astype(np.float32, copy=False)

    total = d.size
    for j, thr in enumerate(thresholds):
        acc.changed[j] += total if thr == 0 else total - int(np.count_nonzero(d <= thr))
    if total:
        acc.hist += np.bincount((d.view(np.uint32) & 0x7FFFFFFF) >> 20, minlength=HIST_BINS)
    if mask_threshold is None:
        return None
    bits = np.zeros(n, dtype=bool)
    bits[idx if mask_threshold == 0 else idx[~(d <= mask_threshold)]] = True
    return np.packbits(bits, bitorder="little")


def _pack_empty(n: int) -> np.ndarray:
    return np.zeros((n + 7) // 8, dtype=np.uint8)


def changed_bits(a: np.ndarray, b: np.ndarray, code: str, tolerance: float = 0.0,
                 code_b: str | None = None) -> np.ndarray:
    """Element-wise 'changed at tolerance' for two raw chunks (bool array), for other analyses.

    Example:
        >>> changed_bits(base_bits, ft_bits, "BF16", 1e-5).mean()
    """
    spec = ChunkSpec(code, code_b or code)
    acc = Accumulator(ntol=0)
    thr = float32_threshold(tolerance)
    packed = compare_chunk(a, b, spec, np.zeros(0, dtype=np.float32), acc, mask_threshold=thr)
    return np.unpackbits(packed, count=a.size, bitorder="little").view(bool)
