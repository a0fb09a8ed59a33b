"""Match the tensors of two checkpoints by name, and check they can be compared.

All problems are collected first and raised once, so a user sees every mismatch in one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlsparse.errors import MismatchError
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint, TensorInfo
from rlsparse.io.naming import strip_prefixes

_TIED_SOURCES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed.weight",
                 "gpt_neox.embed_in.weight", "embed_tokens.weight", "wte.weight")
_SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Pair:
    """One tensor to compare: its clean name and both sides' storage."""

    name: str
    base: TensorInfo
    finetuned: TensorInfo
    base_scale: TensorInfo | None = None
    finetuned_scale: TensorInfo | None = None
    rows: int | None = None  # compare only the first ``rows`` rows (``--allow-resize``)
    note: str = ""

    @property
    def numel(self) -> int:
        """Elements compared."""
        if self.rows is None:
            return self.base.numel
        rest = self.base.numel // self.base.shape[0] if self.base.shape[0] else 0
        return self.rows * rest

    @property
    def cols(self) -> int:
        return self.base.shape[-1] if len(self.base.shape) >= 2 else 1


@dataclass
class Plan:
    pairs: list[Pair]
    notes: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)
    prefixes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for p in self.pairs:
            total += p.numel * (dtypes.itemsize(p.base.dtype) + dtypes.itemsize(p.finetuned.dtype))
        return total


def _clean(ck: Checkpoint) -> tuple[dict[str, TensorInfo], list[str]]:
    out: dict[str, TensorInfo] = {}
    removed: set[str] = set()
    for raw, info in ck.tensors.items():
        name, prefix = strip_prefixes(raw)
        if prefix:
            removed.add(prefix)
        out[name] = info
    return out, sorted(removed)


def _is_scale(name: str, tensors: dict[str, TensorInfo]) -> bool:
    return name.endswith(_SCALE_SUFFIX) and name[: -len(_SCALE_SUFFIX)] in tensors


def _sample(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def plan(base: Checkpoint, finetuned: Checkpoint, *, allow_missing: bool = False, allow_resize: bool = False,
         compare_dtype: str | None = None) -> Plan:
    """Pair tensors by name (after stripping wrapper prefixes) and validate the pairs."""
    a, pa = _clean(base)
    b, pb = _clean(finetuned)
    notes: list[str] = []
    if pa:
        notes.append(f"base: stripped wrapper prefix(es) {', '.join(pa)}")
    if pb:
        notes.append(f"finetuned: stripped wrapper prefix(es) {', '.join(pb)}")

    # tied embeddings: a side without lm_head uses its input embedding as the head
    for side, this, other in (("base", a, b), ("finetuned", b, a)):
        if "lm_head.weight" in other and "lm_head.weight" not in this:
            src = next((s for s in _TIED_SOURCES if s in this), None)
            if src is not None:
                this["lm_head.weight"] = this[src]
                notes.append(f"{side} has no lm_head.weight (tied embeddings): compared its {src} instead")

    scales_a = {n for n in a if _is_scale(n, a)}
    scales_b = {n for n in b if _is_scale(n, b)}
    only_a = sorted(set(a) - set(b) - scales_a)
    only_b = sorted(set(b) - set(a) - scales_b)
    problems: list[str] = []
    if (only_a or only_b) and not allow_missing:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in base ({_sample(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} only in finetuned ({_sample(only_b)})")
        problems.append("tensor sets differ: " + "; ".join(parts) + "; pass allow_missing=True to compare the common ones")
    elif only_a or only_b:
        notes.append(f"allow_missing: skipped {len(only_a)} tensor(s) only in base and {len(only_b)} only in finetuned")

    pairs: list[Pair] = []
    shape_bad: list[str] = []
    dtype_diff: list[str] = []
    for name in sorted(set(a) & set(b)):
        if name in scales_a or name in scales_b:
            continue
        ia, ib = a[name], b[name]
        if ia.dtype not in dtypes.FLOAT_CODES or ib.dtype not in dtypes.FLOAT_CODES:
            if ia.dtype != ib.dtype:
                problems.append(f"{name}: integer/bool dtypes differ ({ia.dtype} vs {ib.dtype})")
                continue
        rows = None
        note = ""
        if ia.shape != ib.shape:
            resizable = (len(ia.shape) == len(ib.shape) and len(ia.shape) >= 1 and ia.shape[1:] == ib.shape[1:])
            if allow_resize and resizable:
                rows = min(ia.shape[0], ib.shape[0])
                note = f"resized: compared the first {rows} rows of {ia.shape[0]} (base) and {ib.shape[0]} (finetuned)"
                notes.append(f"{name}: {note}")
            else:
                shape_bad.append(f"{name} {list(ia.shape)} vs {list(ib.shape)}")
                continue
        if ia.dtype != ib.dtype:
            dtype_diff.append(f"{name} ({ia.dtype} vs {ib.dtype})")
        sa = a.get(name + _SCALE_SUFFIX) if name + _SCALE_SUFFIX in scales_a else None
        sb = b.get(name + _SCALE_SUFFIX) if name + _SCALE_SUFFIX in scales_b else None
        pairs.append(Pair(name, ia, ib, sa, sb, rows, note))
    if shape_bad:
        hint = "; pass allow_resize=True to compare the common rows" if not allow_resize else ""
        problems.append(f"{len(shape_bad)} shape mismatch(es): {_sample(shape_bad, 3)}{hint}")
    if problems:
        raise MismatchError(f"{base.source} vs {finetuned.source}: " + " | ".join(problems))
    if dtype_diff:
        how = (f"cast both to {compare_dtype} first (compare_dtype)" if compare_dtype
               else "compared stored values widened to float32; pass compare_dtype= to cast both first")
        notes.append(f"dtypes differ for {len(dtype_diff)} tensor(s) ({_sample(dtype_diff, 3)}): {how}")
    nscaled = sum(1 for p in pairs if p.base_scale is not None or p.finetuned_scale is not None)
    if nscaled:
        notes.append(f"{nscaled} FP8 tensor(s) with block scales: compared dequantised values (bit counts on raw FP8)")
    pairs.sort(key=lambda p: (str(p.base.file), p.base.offset or 0, p.name))
    return Plan(pairs, notes, only_a if allow_missing else [], only_b if allow_missing else [],
                {"base": pa, "finetuned": pb})
