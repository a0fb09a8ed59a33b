"""What the stored dtype's grid hides: update sizes in units in the last place (ULP).

A bf16 value near 0.02 can only move in steps of about 1e-4, so small updates are rounded away
and a tolerance below the local spacing cannot change what counts as "changed". Per tensor
and in total, on stored bits (both sides must share a float dtype):

- *ULP distance* between base and finetuned values: the difference of their positions in the
  ordered integer representation of the dtype (sign-magnitude bits mapped onto a line, so
  -0.0 and +0.0 share position 0 and adjacent floats differ by 1). Changed elements (distance
  > 0, both finite) are counted by distance 1, 2 and 3+; elements whose bits differ with a
  NaN/Inf on either side (and not NaN on both) are counted apart as ``nonfinite_changed``.
- *spacing* at the base value: the smallest nonzero move the dtype allows from it,
  ``min(next_up - x, x - next_down)`` (half the upward ULP at powers of two). For each
  tolerance t, the fraction of all elements with spacing > t: there any change exceeds t, so
  changed-at-t equals changed-at-0 and the tolerance cannot matter.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from rlsparse._version import __version__
from rlsparse.analysis._common import (SCHEMA_VERSION, check_tolerance, layer_key, open_checkpoint, sorted_layers,
                                       sorted_types, stream_items)
from rlsparse.diff.kernel import block_scales
from rlsparse.errors import MismatchError
from rlsparse.io import dtypes
from rlsparse.io.naming import type_of

DEFAULT_TOLERANCES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
_SATURATE = np.uint64(1 << 62)


@dataclass
class PrecisionStats:
    """ULP histogram and spacing counts for one tensor or a group of tensors."""

    numel: int = 0
    changed: int = 0  # finite on both sides, ULP distance > 0
    ulp1: int = 0
    ulp2: int = 0
    ulp3_plus: int = 0
    nonfinite_changed: int = 0
    rescaled_changed: int = 0  # FP8: value changed in a block whose scale changed (no common grid)
    spacing_above: dict[str, int] = field(default_factory=dict)  # tolerance label -> elements

    def add(self, other: "PrecisionStats") -> None:
        self.numel += other.numel
        self.changed += other.changed
        self.ulp1 += other.ulp1
        self.ulp2 += other.ulp2
        self.ulp3_plus += other.ulp3_plus
        self.nonfinite_changed += other.nonfinite_changed
        self.rescaled_changed += other.rescaled_changed
        for k, v in other.spacing_above.items():
            self.spacing_above[k] = self.spacing_above.get(k, 0) + v

    def to_json(self) -> dict:
        n = self.numel or 1
        c = self.changed or 1
        return {"numel": self.numel, "changed": self.changed, "ulp_1": self.ulp1, "ulp_2": self.ulp2,
                "ulp_3_plus": self.ulp3_plus, "nonfinite_changed": self.nonfinite_changed, "rescaled_changed": self.rescaled_changed,
                "ulp_1_share_of_changed": self.ulp1 / c if self.changed else None,
                "ulp_2_share_of_changed": self.ulp2 / c if self.changed else None,
                "ulp_3_plus_share_of_changed": self.ulp3_plus / c if self.changed else None,
                "spacing_above": {k: {"count": v, "fraction": v / n} for k, v in self.spacing_above.items()}}


@dataclass
class PrecisionResult:
    """Per-tensor and aggregate precision view.

    Example:
        >>> r = precision("sft", "dpo")
        >>> r.total.ulp1 / r.total.changed, r.total.spacing_above["1e-05"] / r.total.numel
    """

    base: str
    finetuned: str
    labels: list[str]
    tolerances: list[float]
    tensors: dict[str, PrecisionStats]
    dtypes: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def _group(self, key, order) -> dict[str, PrecisionStats]:
        out: dict[str, PrecisionStats] = {}
        for name, s in self.tensors.items():
            out.setdefault(key(name), PrecisionStats()).add(s)
        return {k: out[k] for k in order(out)}

    @property
    def total(self) -> PrecisionStats:
        t = PrecisionStats()
        for s in self.tensors.values():
            t.add(s)
        return t

    def by_type(self) -> dict[str, PrecisionStats]:
        return self._group(type_of, sorted_types)

    def by_layer(self) -> dict[str, PrecisionStats]:
        return self._group(layer_key, sorted_layers)

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "precision",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "ulp_distance": "difference of positions in the ordered integer representation of the stored "
                                "dtype (-0.0 and +0.0 share one position)",
                "changed": "both values finite and ULP distance > 0",
                "nonfinite_changed": "bits differ and a side is NaN/Inf (NaN on both sides is unchanged)",
                "rescaled_changed": "FP8 block-scaled: dequantised value changed in a block whose scale changed "
                                    "(codes under different scales share no grid; not in the ULP counts)",
                "spacing": "min(next_up(x) - x, x - next_down(x)) at the base value x in its stored dtype",
                "spacing_above": "elements whose spacing exceeds the tolerance: any change there exceeds it",
            },
            "base": self.base,
            "finetuned": self.finetuned,
            "tolerances": list(self.labels),
            "notes": list(self.notes),
            "dtypes": dict(sorted(self.dtypes.items())),
            "total": self.total.to_json(),
            "by_type": {k: v.to_json() for k, v in self.by_type().items()},
            "by_layer": {k: v.to_json() for k, v in self.by_layer().items()},
            "tensors": {k: {"dtype": self.dtypes[k], **v.to_json()} for k, v in self.tensors.items()},
        }


def ordered_position(raw: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude bits as uint64, sign as bool): a float's position on the ordered line is
    ``-magnitude`` when the sign is set, else ``magnitude`` (so -0.0 and +0.0 coincide)."""
    width = 8 * dtypes.itemsize(code)
    bits = raw.astype(np.uint64)
    sign_bit = np.uint64(1 << (width - 1))
    return bits & (sign_bit - np.uint64(1)), (bits & sign_bit) != 0


def ulp_distance(a_raw: np.ndarray, b_raw: np.ndarray, code: str) -> np.ndarray:
    """|position(b) - position(a)| as uint64 (saturated far above 3 when signs differ).

    Example:
        >>> ulp_distance(np.array([0x3F80], np.uint16), np.array([0x3F81], np.uint16), "BF16")
        array([1], dtype=uint64)
    """
    ma, sa = ordered_position(a_raw, code)
    mb, sb = ordered_position(b_raw, code)
    same = np.where(ma >= mb, ma - mb, mb - ma)
    across = np.minimum(ma, _SATURATE) + np.minimum(mb, _SATURATE)  # exact below 2**62, never wraps
    return np.where(sa == sb, same, across)


def spacing(raw: np.ndarray, code: str) -> np.ndarray:
    """Smallest nonzero move from each stored value, as float64 (inf/nan for non-finite values)."""
    width = 8 * dtypes.itemsize(code)
    sign_bit = np.uint64(1 << (width - 1))
    mag, neg = ordered_position(raw, code)
    pos = np.where(neg, -mag.astype(np.int64), mag.astype(np.int64))

    def at(p: np.ndarray) -> np.ndarray:
        bits = np.where(p < 0, (-p).astype(np.uint64) | sign_bit, p.astype(np.uint64))
        return dtypes.widen(bits.astype(dtypes.uint_view(code)), code).astype(np.float64)

    with np.errstate(invalid="ignore"):  # neighbours of NaN/Inf patterns are NaN
        x = dtypes.widen(raw, code).astype(np.float64)
        up = np.abs(at(pos + 1) - x)
        down = np.abs(x - at(pos - 1))
    return np.fmin(up, down)


@functools.lru_cache(maxsize=None)
def _spacing_table(code: str) -> np.ndarray:
    """``spacing`` of every bit pattern of a 1- or 2-byte dtype (a pure function of the pattern)."""
    return spacing(np.arange(1 << (8 * dtypes.itemsize(code))).astype(dtypes.uint_view(code)), code)


@functools.lru_cache(maxsize=None)
def _spacing_above(code: str, t: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return _spacing_table(code) > t  # NaN spacing (non-finite patterns) never counts


def precision(base: str | os.PathLike, finetuned: str | os.PathLike, *,
              tolerances: Sequence[float | str] = DEFAULT_TOLERANCES, progress: bool = False,
              chunk_elements: int | None = None) -> PrecisionResult:
    """ULP distances of the changed elements and where each tolerance cannot matter, streamed.

    Runs as ``PrecisionKernel`` on the stream engine. FP8 block-scaled tensors: ULPs are
    counted on the stored codes where both sides share the block's scale, the spacing is the
    code's spacing times the base's block scale, and changes in blocks whose scale changed are
    counted apart (``rescaled_changed``).

    Args:
        base: Checkpoint before finetuning.
        finetuned: Checkpoint after finetuning (same float dtype per tensor as the base).
        tolerances: Tolerances to compare with the grid spacing at the base values.
        progress: Show a progress bar on stderr.
        chunk_elements: Elements per chunk (memory bound).

    Returns:
        PrecisionResult.

    Example:
        >>> r = precision("sft", "dpo", tolerances=[1e-5])
        >>> print(f"{r.total.ulp1 / r.total.changed:.0%} of changes are one ULP")
    """
    from rlsparse.diff import stream
    from rlsparse.diff.result import tolerance_label
    from rlsparse.report.progress import progress_bar

    values = [check_tolerance(t, "tolerances") for t in tolerances]
    labels = [tolerance_label(t) for t in tolerances]
    a, b = open_checkpoint(base), open_checkpoint(finetuned)
    items = stream_items([(a, b)], shared_base=False)
    bad = [f"{it.name} ({it.infos[0].dtype} vs {it.infos[1].dtype})" for it in items
           if it.infos[0].dtype != it.infos[1].dtype]
    if bad:
        raise MismatchError(f"{a.source} vs {b.source}: stored dtypes differ for {len(bad)} tensor(s) "
                            f"(e.g. {', '.join(bad[:3])}); ULP distances need one dtype: compare checkpoints "
                            "saved in the same dtype")
    notes = []
    skipped = [it.name for it in items if it.infos[0].dtype not in dtypes.FLOAT_CODES]
    if skipped:
        notes.append(f"skipped {len(skipped)} non-float tensor(s) (e.g. {skipped[0]})")
    todo = [it for it in items if it.infos[0].dtype in dtypes.FLOAT_CODES]
    nscaled = sum(1 for it in todo if it.scaled)
    if nscaled:
        notes.append(f"{nscaled} FP8 tensor(s) with block scales: ULPs on the stored codes where the block's scale "
                     "is unchanged; spacing scaled by the base's block scale")
    kernel = PrecisionKernel(tuple(values))
    with progress_bar(sum(it.nbytes for it in todo), "precision", enabled=progress) as advance:
        out = stream.run(todo, kernel, chunk_elements=chunk_elements, advance=advance)
    tensors: dict[str, PrecisionStats] = {}
    for i, it in enumerate(todo):
        v = out.partials.get(i)
        v = np.zeros(7 + len(values), np.int64) if v is None else v
        tensors[it.name] = PrecisionStats(*(int(x) for x in v[:7]),
                                          spacing_above={lab: int(x) for lab, x in zip(labels, v[7:])})
    return PrecisionResult(a.source, b.source, labels, values, tensors, {it.name: it.infos[0].dtype for it in todo},
                           notes)


@dataclass(frozen=True)
class PrecisionKernel:
    """Stream kernel over (base, finetuned): per chunk the int64 vector ``[numel, changed, ulp1,
    ulp2, ulp3_plus, nonfinite_changed, rescaled_changed, spacing_above per tolerance...]``."""

    tolerances: tuple[float, ...]

    def compute(self, chunk):
        ra, rb = chunk.raw
        sa, sb = chunk.scales
        code, cols = chunk.item.infos[0].dtype, chunk.item.cols
        out = np.zeros(7 + len(self.tolerances), dtype=np.int64)
        out[0] = ra.size
        if sa is None and dtypes.itemsize(code) <= 2:
            # spacing depends on the bit pattern only: count patterns once, then sum per tolerance
            patterns = np.bincount(ra, minlength=1 << (8 * dtypes.itemsize(code)))
            for j, t in enumerate(self.tolerances):
                out[7 + j] = patterns[_spacing_above(code, t)].sum()
        else:
            sp = _spacing_table(code)[ra] if dtypes.itemsize(code) <= 2 else spacing(ra, code)
            if sa is not None:
                sp = sp * block_scales(sa, ra.size, cols)
            for j, t in enumerate(self.tolerances):
                out[7 + j] = np.count_nonzero(sp > t)  # NaN spacing (non-finite base) never counts
        if (sa is None) != (sb is None):
            same_scale = np.zeros(ra.size, dtype=bool)
        elif sa is None:
            same_scale = None
        else:
            same_scale = block_scales(sa, ra.size, cols).view(np.uint32) == block_scales(sb, rb.size, cols).view(np.uint32)
        if same_scale is not None and not same_scale.all():
            # codes under different scales are not on one grid: count value changes apart
            idx = np.flatnonzero(~same_scale)
            fa = dtypes.widen(ra[idx], code) * (block_scales(sa, ra.size, cols, idx) if sa is not None else 1)
            fb = dtypes.widen(rb[idx], code) * (block_scales(sb, rb.size, cols, idx) if sb is not None else 1)
            out[6] = np.count_nonzero((fa != fb) & ~(np.isnan(fa) & np.isnan(fb)))
            idx = np.flatnonzero((ra != rb) & same_scale)
        else:
            idx = np.flatnonzero(ra != rb)
        if idx.size:
            a, b = ra[idx], rb[idx]
            fa, fb = dtypes.widen(a, code), dtypes.widen(b, code)
            finite = np.isfinite(fa) & np.isfinite(fb)
            both_nan = np.isnan(fa) & np.isnan(fb)
            out[5] = np.count_nonzero(~finite & ~both_nan)
            d = ulp_distance(a[finite], b[finite], code)
            out[1] = np.count_nonzero(d)
            out[2] = np.count_nonzero(d == 1)
            out[3] = np.count_nonzero(d == 2)
            out[4] = np.count_nonzero(d >= 3)
        return out, None

    def merge(self, acc, partial):
        acc += partial
        return acc
