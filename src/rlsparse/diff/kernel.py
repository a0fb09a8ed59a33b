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

from rlsparse.io import dtypes

HIST_BINS = 2048  # |delta| as float32 bits >> 20: 8 exponent bits, 3 mantissa bits
FP8_BLOCK = dtypes.FP8_BLOCK


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
class ChunkResult:
    """Counts for one chunk (merged into an ``Accumulator`` in chunk order)."""

    numel: int
    bit_changed: int | None
    changed: np.ndarray
    hist: np.ndarray | None
    nan_base: int
    nan_finetuned: int
    inf_base: int
    inf_finetuned: int
    packed: np.ndarray | None = None


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

    def add(self, r: "ChunkResult | Accumulator") -> None:
        self.numel += r.numel
        self.bit_changed = None if self.bit_changed is None or r.bit_changed is None else self.bit_changed + r.bit_changed
        self.changed += r.changed
        if r.hist is not None:
            self.hist += r.hist
        self.nan_base += r.nan_base
        self.nan_finetuned += r.nan_finetuned
        self.inf_base += r.inf_base
        self.inf_finetuned += r.inf_finetuned

    def add_from(self, r: "ChunkResult | Accumulator") -> "Accumulator":
        """``add`` that returns self (the stream engine's merge)."""
        self.add(r)
        return self


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
        vals = vals * block_scales(scale, vals.size, cols, idx)
    if compare_code is not None:
        vals = dtypes.round_to(vals.astype(np.float32, copy=False), compare_code)
    return vals


def block_scales(scale: np.ndarray, n: int, cols: int, idx: np.ndarray | None = None) -> np.ndarray:
    """The block scale of each element of a chunk (or of the elements at ``idx``), as float32.

    ``scale`` holds the scale rows covering the chunk, whose first row starts a 128-row block.
    """
    if idx is None:
        rows = n // cols
        return np.repeat(np.repeat(scale, FP8_BLOCK, axis=0)[:rows], FP8_BLOCK, axis=1)[:, :cols].reshape(-1)
    return scale[(idx // cols) // FP8_BLOCK, (idx % cols) // FP8_BLOCK]


def compare_chunk(a: np.ndarray, b: np.ndarray, spec: ChunkSpec, thresholds: np.ndarray,
                  mask_threshold: np.float32 | None = None, scale_a: np.ndarray | None = None,
                  scale_b: np.ndarray | None = None, stats: bool = True) -> ChunkResult:
    """Compare one chunk: counts at every threshold, |delta| histogram, packed mask when asked.

    ``a`` and ``b`` are raw bits (unsigned ints of each dtype's width) of the same elements.
    ``thresholds`` are float32 thresholds from ``float32_threshold``. ``stats=False`` skips the
    histogram and the NaN/Inf counts (kernels that only need the mask). Pure function of its
    inputs (no shared state), so chunks can be compared on several threads.
    """
    n = a.size
    nan_a, inf_a = dtypes.nonfinite_counts(a, spec.code_a) if stats else (0, 0)
    nan_b, inf_b = dtypes.nonfinite_counts(b, spec.code_b) if stats else (0, 0)
    changed = np.zeros(thresholds.size, dtype=np.int64)

    def result(nbits, hist, packed):
        return ChunkResult(n, nbits, changed, hist, nan_a, nan_b, inf_a, inf_b, packed)

    same_dtype = spec.code_a == spec.code_b
    if scale_a is None or scale_b is None:
        scales_equal = scale_a is None and scale_b is None
    else:
        scales_equal = scale_a.shape == scale_b.shape and np.array_equal(scale_a.view(np.uint32), scale_b.view(np.uint32))
    nbits = None
    neq_bits = None
    if same_dtype:
        neq_bits = a != b

    if same_dtype and scales_equal and spec.compare_code is None:
        # fast path: equal bits mean equal values, so only look at positions whose bits differ
        idx = neq_bits.nonzero()[0]
        nbits = int(idx.size)
        if nbits == 0:
            return result(0, None, _pack_empty(n) if mask_threshold is not None else None)
        fa = _values(a, spec.code_a, scale_a, spec.cols, None, idx)
        fb = _values(b, spec.code_b, scale_b, spec.cols, None, idx)
    else:
        if neq_bits is not None:
            nbits = int(np.count_nonzero(neq_bits))
        neq_bits = None
        idx = None
        fa = _values(a, spec.code_a, scale_a, spec.cols, spec.compare_code)
        fb = _values(b, spec.code_b, scale_b, spec.cols, spec.compare_code)

    keep = (fa != fb) & ~(np.isnan(fa) & np.isnan(fb))
    dropped = None  # positions whose bits differ but whose values are equal (-0.0/+0.0, NaN/NaN)
    if idx is None:
        idx = np.flatnonzero(keep)
        d = np.abs(fb[idx] - fa[idx])
    else:
        if not keep.all():
            dropped = idx[~keep]
            idx, fa, fb = idx[keep], fa[keep], fb[keep]
        d = np.abs(fb - fa)
    d = d.astype(np.float32, copy=False)

    total = d.size
    unchanged_at_mask = None
    for j, thr in enumerate(thresholds):
        if thr == 0:
            changed[j] = total
            continue
        le = d <= thr
        changed[j] = total - int(np.count_nonzero(le))
        if mask_threshold is not None and thr == mask_threshold:
            unchanged_at_mask = le
    hist = np.bincount((d.view(np.uint32) & 0x7FFFFFFF) >> 20, minlength=HIST_BINS) if total and stats else None
    packed = None
    if mask_threshold is not None:
        if neq_bits is not None:
            # start from "bits differ" and clear what is not changed at the mask tolerance
            bits = neq_bits
            if dropped is not None:
                bits[dropped] = False
        else:
            bits = np.zeros(n, dtype=bool)
            bits[idx] = True
        if mask_threshold != 0:
            if unchanged_at_mask is None:
                unchanged_at_mask = d <= mask_threshold
            bits[idx[unchanged_at_mask]] = False
        packed = np.packbits(bits, bitorder="little")
    return result(nbits, hist, packed)


def _pack_empty(n: int) -> np.ndarray:
    return np.zeros((n + 7) // 8, dtype=np.uint8)


def changed_packed(a: np.ndarray, b: np.ndarray, code_a: str, code_b: str, threshold: np.float32,
                   scale_a: np.ndarray | None = None, scale_b: np.ndarray | None = None, cols: int = 1) -> np.ndarray:
    """'Changed at the tolerance behind ``threshold``' for two raw chunks, packed little-endian
    (one bit per element, padding bits 0): the stream kernels' building block.

    ``threshold`` comes from ``float32_threshold``; ``scale_a``/``scale_b`` are FP8 block scales
    covering the chunk's rows (``cols``: the matrix's last-dimension size).
    """
    spec = ChunkSpec(code_a, code_b, None, cols)
    return compare_chunk(a, b, spec, _NO_THRESHOLDS, threshold, scale_a, scale_b, stats=False).packed


_NO_THRESHOLDS = np.zeros(0, dtype=np.float32)


def changed_bits(a: np.ndarray, b: np.ndarray, code: str, tolerance: float = 0.0,
                 code_b: str | None = None) -> np.ndarray:
    """Element-wise 'changed at tolerance' for two raw chunks (bool array), for other analyses.

    Example:
        >>> changed_bits(base_bits, ft_bits, "BF16", 1e-5).mean()
    """
    packed = changed_packed(a, b, code, code_b or code, float32_threshold(tolerance))
    return np.unpackbits(packed, count=a.size, bitorder="little").view(bool)
