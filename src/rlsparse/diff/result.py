"""What a diff found: per-tensor counts and the aggregates the paper reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlsparse._version import __version__
from rlsparse.diff.tolerance import ToleranceCounts, tolerance_key
from rlsparse.io.naming import layer_of, type_of, type_sort_key

SCHEMA_VERSION = 1


def tolerance_label(t: float | str) -> str:
    """The key a tolerance is reported under: canonical, whatever its spelling ("1e-5" -> "1e-05")."""
    return tolerance_key(t)


@dataclass
class Aggregate:
    """Element-weighted counts over a set of tensors."""

    numel: int = 0
    changed: dict[str, int] = field(default_factory=ToleranceCounts)
    bit_changed: int | None = 0

    def __post_init__(self) -> None:
        self.changed = ToleranceCounts(self.changed)

    def add(self, other: "Aggregate | TensorStats") -> None:
        self.numel += other.numel
        for k, v in other.changed.items():
            self.changed[k] = self.changed.get(k, 0) + v
        if self.bit_changed is None or other.bit_changed is None:
            self.bit_changed = None
        else:
            self.bit_changed += other.bit_changed

    def density(self, tolerance: float | str) -> float:
        """Fraction of elements changed at ``tolerance`` (any spelling: 1e-5, "1e-5", "1e-05")."""
        return self.changed[tolerance] / self.numel if self.numel else 0.0

    def sparsity(self, tolerance: float | str) -> float:
        """Fraction of elements unchanged at ``tolerance`` (the paper's update sparsity)."""
        return 1.0 - self.density(tolerance)

    def to_json(self) -> dict:
        return {
            "numel": self.numel,
            "changed": dict(self.changed),
            "sparsity": {k: self.sparsity(k) for k in self.changed},
            "density": {k: self.density(k) for k in self.changed},
            "bit_changed": self.bit_changed,
        }


@dataclass
class TensorStats:
    """Counts for one tensor pair."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, str]
    numel: int
    changed: dict[str, int]
    bit_changed: int | None
    hist: np.ndarray
    nan_base: int = 0
    nan_finetuned: int = 0
    inf_base: int = 0
    inf_finetuned: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        self.changed = ToleranceCounts(self.changed)

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    @property
    def type(self) -> str:
        return type_of(self.name)

    def density(self, tolerance: float | str) -> float:
        return self.changed[tolerance] / self.numel if self.numel else 0.0

    def sparsity(self, tolerance: float | str) -> float:
        return 1.0 - self.density(tolerance)

    def to_json(self) -> dict:
        doc = {
            "numel": self.numel,
            "changed": dict(self.changed),
            "bit_changed": self.bit_changed,
            "shape": list(self.shape),
            "dtype": {"base": self.dtypes[0], "finetuned": self.dtypes[1]},
            "layer": self.layer,
            "type": self.type,
            "nan": {"base": self.nan_base, "finetuned": self.nan_finetuned},
            "inf": {"base": self.inf_base, "finetuned": self.inf_finetuned},
            "abs_delta_hist": {str(int(k)): int(self.hist[k]) for k in np.flatnonzero(self.hist)},
        }
        if self.note:
            doc["note"] = self.note
        return doc


@dataclass
class DiffResult:
    """Everything ``rlsparse.diff`` measured. Aggregates are weighted by element count.

    Example:
        >>> r = rlsparse.diff("base", "rl")
        >>> r.total.sparsity(1e-5), r.by_type()["q"].sparsity("1e-5")
    """

    base: str
    finetuned: str
    labels: list[str]
    tolerances: list[float]
    tensors: dict[str, TensorStats]
    notes: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    bytes_read: int = 0

    @property
    def total(self) -> Aggregate:
        agg = Aggregate(changed={k: 0 for k in self.labels})
        for t in self.tensors.values():
            agg.add(t)
        return agg

    def _group(self, key) -> dict:
        out: dict = {}
        for t in self.tensors.values():
            k = key(t)
            if k not in out:
                out[k] = Aggregate(changed={lab: 0 for lab in self.labels})
            out[k].add(t)
        return out

    def by_layer(self) -> dict[int | None, Aggregate]:
        """Per transformer block (None: tensors outside the blocks), in layer order."""
        g = self._group(lambda t: t.layer)
        return dict(sorted(g.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))

    def by_type(self) -> dict[str, Aggregate]:
        """Per matrix type (q, k, v, o, gate, up, down, norm, embed, lm_head, experts.*...)."""
        g = self._group(lambda t: t.type)
        return dict(sorted(g.items(), key=lambda kv: type_sort_key(kv[0])))

    def grid(self) -> dict[tuple[int, str], Aggregate]:
        """Layer x matrix type (the paper's Figure 3), for tensors inside the blocks."""
        g = self._group(lambda t: (t.layer, t.type))
        return {k: v for k, v in g.items() if k[0] is not None}

    @property
    def histogram(self) -> np.ndarray:
        h = None
        for t in self.tensors.values():
            h = t.hist.copy() if h is None else h + t.hist
        return h if h is not None else np.zeros(1)

    def changed_bounds(self, t: float) -> tuple[int, int]:
        """Bounds on the total changed at any tolerance ``t``, from the |delta| histogram.

        Exact (low == high) when ``t`` was requested; otherwise low counts only the bins wholly
        above ``t`` and high adds the bin that holds ``t``.
        """
        for lab, tol in zip(self.labels, self.tolerances):
            if tol == t:
                n = self.total.changed[lab]
                return n, n
        from rlsparse.diff.kernel import hist_edges

        edges = hist_edges()
        h = self.histogram
        k = int(np.searchsorted(edges, t, side="right")) - 1  # bin holding t
        above = int(h[k + 1:].sum())
        return above, above + int(h[k])

    def to_json(self) -> dict:
        total = self.total.to_json()
        total["nan"] = {"base": sum(t.nan_base for t in self.tensors.values()),
                        "finetuned": sum(t.nan_finetuned for t in self.tensors.values())}
        total["inf"] = {"base": sum(t.inf_base for t in self.tensors.values()),
                        "finetuned": sum(t.inf_finetuned for t in self.tensors.values())}
        grid: dict[str, dict[str, dict]] = {}
        for (layer, typ), agg in sorted(self.grid().items(), key=lambda kv: (kv[0][0], type_sort_key(kv[0][1]))):
            grid.setdefault(str(layer), {})[typ] = agg.to_json()
        h = self.histogram
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "changed": "|new - old| > tolerance, on stored values widened to float32 (FP8 dequantised); "
                           "at 0: value inequality (-0.0 == +0.0; NaN on both sides is unchanged)",
                "sparsity": "fraction of elements unchanged", "density": "fraction of elements changed",
                "bit_changed": "elements whose stored bits differ (null when dtypes differ)",
                "abs_delta_hist": "bin k counts changed elements whose float32 |delta| has bits in "
                                  "[k << 20, (k+1) << 20): 8 bins per power of two; k >= 2040 is Inf/NaN",
            },
            "inputs": self.inputs,
            "options": {**self.options, "tolerances": list(self.labels)},
            "notes": list(self.notes),
            "missing": {"only_in_base": self.only_in_base, "only_in_finetuned": self.only_in_finetuned},
            "total": total,
            "by_layer": {("none" if k is None else str(k)): v.to_json() for k, v in self.by_layer().items()},
            "by_type": {k: v.to_json() for k, v in self.by_type().items()},
            "grid": grid,
            "abs_delta_hist": {str(int(k)): int(h[k]) for k in np.flatnonzero(h)},
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "elapsed_s": self.elapsed_s,
            "bytes_read": self.bytes_read,
        }
