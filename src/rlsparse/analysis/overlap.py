"""How much two subnetworks share (the paper's section 5, Table 4, Appendix E).

For subnetworks I1 and I2 (index sets of updated elements) of models with sparsities s1, s2:
``o1 = |I1 ∩ I2| / |I1|`` (how much of I1 that I2 covers), ``o2 = |I1 ∩ I2| / |I2|``, and
Jaccard ``|I1 ∩ I2| / |I1 ∪ I2|``. The random-guessing baseline (Appendix E) draws a subnetwork
of the same size uniformly at random: its expected one-sided overlap with the other mask is the
other mask's density, so ``o1_random = |I2| / n = 1 - s2`` and ``o2_random = 1 - s1``.

Counting streams packed mask bytes tensor by tensor and chunk by chunk: ``popcount(a & b)`` on
bytes, never unpacking a whole model. From checkpoints, ``OverlapKernel`` runs on the stream
engine and counts the same way on the packed changed bits of each chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from rlsparse._version import __version__
from rlsparse.analysis._common import (CHUNK_ELEMENTS, PAPER_TOLERANCE, SCHEMA_VERSION, check_tolerance, layer_key,
                                       open_checkpoint, popcount, ratio, sorted_layers, sorted_types, stream_items,
                                       stream_runner)
from rlsparse.diff.kernel import changed_packed
from rlsparse.errors import UsageError
from rlsparse.io.checkpoint import Checkpoint, TensorInfo
from rlsparse.io.naming import type_of
from rlsparse.io.reader import TensorReader
from rlsparse.io.safetensors_format import read_header
from rlsparse.masks import Mask


@dataclass(frozen=True)
class OverlapStats:
    """Counts for one pair over a set of elements (the model, a layer or a matrix type)."""

    numel: int
    changed_a: int
    changed_b: int
    both: int

    @property
    def sparsity_a(self) -> float:
        return 1 - self.changed_a / self.numel if self.numel else 0.0

    @property
    def sparsity_b(self) -> float:
        return 1 - self.changed_b / self.numel if self.numel else 0.0

    @property
    def o1(self) -> float | None:
        """Share of A's subnetwork that B's covers; None when A changed nothing."""
        return ratio(self.both, self.changed_a)

    @property
    def o2(self) -> float | None:
        """Share of B's subnetwork that A's covers; None when B changed nothing."""
        return ratio(self.both, self.changed_b)

    @property
    def jaccard(self) -> float | None:
        return ratio(self.both, self.changed_a + self.changed_b - self.both)

    @property
    def o1_random(self) -> float | None:
        """Expected o1 if B's subnetwork were drawn uniformly at random: B's density."""
        return ratio(self.changed_b, self.numel)

    @property
    def o2_random(self) -> float | None:
        return ratio(self.changed_a, self.numel)

    @property
    def o1_ratio(self) -> float | None:
        """Observed o1 over its random baseline."""
        return None if self.o1 is None or not self.o1_random else self.o1 / self.o1_random

    @property
    def o2_ratio(self) -> float | None:
        return None if self.o2 is None or not self.o2_random else self.o2 / self.o2_random

    def to_json(self) -> dict:
        return {"numel": self.numel, "changed_a": self.changed_a, "changed_b": self.changed_b,
                "intersection": self.both, "sparsity_a": self.sparsity_a, "sparsity_b": self.sparsity_b,
                "o1": self.o1, "o2": self.o2, "jaccard": self.jaccard, "o1_random": self.o1_random,
                "o2_random": self.o2_random, "o1_ratio": self.o1_ratio, "o2_ratio": self.o2_ratio}


@dataclass
class PairOverlap:
    """One pair of subnetworks: model totals and per-layer / per-type breakdowns."""

    a: str
    b: str
    total: OverlapStats
    by_layer: dict[str, OverlapStats]
    by_type: dict[str, OverlapStats]

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, **self.total.to_json(),
                "by_layer": {k: v.to_json() for k, v in self.by_layer.items()},
                "by_type": {k: v.to_json() for k, v in self.by_type.items()}}


@dataclass
class OverlapResult:
    """Pairwise overlaps of k subnetworks.

    ``counts[name][i, j]`` is ``|I_i ∩ I_j|`` within tensor ``name`` (the diagonal: ``|I_i|``).

    Example:
        >>> r = overlap(["seed42.mask.safetensors", "seed123.mask.safetensors"])
        >>> r.pairs[0].total.o1, r.pairs[0].total.o1_random
    """

    labels: list[str]
    numel: dict[str, int]
    counts: dict[str, np.ndarray]
    source: str = "masks"
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    def _stats(self, i: int, j: int, names) -> OverlapStats:
        n = a = b = both = 0
        for name in names:
            c = self.counts[name]
            n += self.numel[name]
            a += int(c[i, i])
            b += int(c[j, j])
            both += int(c[i, j])
        return OverlapStats(n, a, b, both)

    def pair(self, i: int, j: int) -> PairOverlap:
        """Overlap of subnetwork ``i`` (A) with subnetwork ``j`` (B)."""
        layers: dict[str, list[str]] = {}
        types: dict[str, list[str]] = {}
        for name in self.numel:
            layers.setdefault(layer_key(name), []).append(name)
            types.setdefault(type_of(name), []).append(name)
        return PairOverlap(
            self.labels[i], self.labels[j], self._stats(i, j, self.numel),
            {k: self._stats(i, j, layers[k]) for k in sorted_layers(layers)},
            {k: self._stats(i, j, types[k]) for k in sorted_types(types)})

    @property
    def pairs(self) -> list[PairOverlap]:
        k = len(self.labels)
        return [self.pair(i, j) for i in range(k) for j in range(i + 1, k)]

    def matrix(self) -> np.ndarray:
        """``M[i, j] = |I_i ∩ I_j| / |I_i|``: how much of subnetwork i that j covers (NaN if i is empty)."""
        total = sum(self.counts.values()) if self.counts else np.zeros((len(self.labels),) * 2, np.int64)
        diag = np.diag(total).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(diag[:, None] > 0, total / np.where(diag > 0, diag, 1)[:, None], np.nan)

    def to_json(self) -> dict:
        numel = sum(self.numel.values())
        total = sum(self.counts.values()) if self.counts else np.zeros((len(self.labels),) * 2, np.int64)
        m = self.matrix()
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "overlap",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "o1": "|I_a ∩ I_b| / |I_a|: share of a's subnetwork that b's covers",
                "o2": "|I_a ∩ I_b| / |I_b|", "jaccard": "|I_a ∩ I_b| / |I_a ∪ I_b|",
                "o1_random": "expected o1 for a uniformly random subnetwork of b's size: b's density",
                "o2_random": "a's density", "ratio": "observed / random",
                "null": "the fraction is undefined (an empty subnetwork)",
            },
            "source": self.source,
            "tolerance": self.tolerance,
            "notes": list(self.notes),
            "masks": [{"label": lab, "numel": numel, "changed": int(total[i, i]),
                       "sparsity": 1 - int(total[i, i]) / numel if numel else 0.0} for i, lab in enumerate(self.labels)],
            "pairs": [p.to_json() for p in self.pairs],
            "matrix": {"labels": list(self.labels), "definition": "row i, column j: |I_i ∩ I_j| / |I_i|",
                       "overlap": [[None if np.isnan(x) else float(x) for x in row] for row in m]},
        }


def overlap(masks: Sequence[str | os.PathLike | Mask], labels: Sequence[str] | None = None, *,
            progress: bool = False, chunk_elements: int = 32 * CHUNK_ELEMENTS) -> OverlapResult:
    """Pairwise overlaps of two or more subnetwork masks, streamed from their packed bytes.

    Args:
        masks: Mask files (rlsparse mask format) or in-memory ``Mask`` objects.
        labels: Names for the masks in the result (default: the paths).
        progress: Show a progress bar on stderr.
        chunk_elements: Elements per chunk (memory: chunk_elements / 8 bytes per mask).

    Returns:
        OverlapResult.

    Raises:
        MismatchError: the masks do not cover the same tensors with the same shapes.

    Example:
        >>> r = overlap(["dpo.mask.safetensors", "prime.mask.safetensors"])
        >>> print(f"o1 = {r.pairs[0].total.o1:.1%} (random {r.pairs[0].total.o1_random:.1%})")
    """
    from rlsparse.report.progress import progress_bar

    if len(masks) < 2:
        raise UsageError(f"overlap needs at least two masks, got {len(masks)}")
    loaded = [m if isinstance(m, Mask) else Mask.load(m) for m in masks]
    labels = list(labels) if labels is not None else [str(m.path) if m.path else f"mask{i}"
                                                      for i, m in enumerate(loaded)]
    if len(labels) != len(loaded):
        raise UsageError(f"{len(labels)} labels for {len(loaded)} masks; give one label per mask")
    for i, m in enumerate(loaded[1:], start=1):
        loaded[0].check_compatible(m, what=f"masks {labels[0]} and {labels[i]}")
    names = loaded[0].names
    k = len(loaded)
    numel = {n: int(np.prod(loaded[0].shape(n), dtype=np.int64)) for n in names}
    counts: dict[str, np.ndarray] = {}
    sources = [_PackedSource(m) for m in loaded]
    step = max(1, chunk_elements // 8)
    try:
        with progress_bar(sum(numel.values()), "overlap", unit="elements", enabled=progress) as advance:
            for name in names:
                c = np.zeros((k, k), dtype=np.int64)
                nbytes = (numel[name] + 7) // 8
                for start in range(0, nbytes, step):
                    count = min(step, nbytes - start)
                    parts = [s.read(name, start, count) for s in sources]
                    tail = numel[name] % 8
                    if start + count == nbytes and tail:
                        for p in parts:  # padding bits past the last element never count
                            p[-1] &= np.uint8((1 << tail) - 1)
                    for i in range(k):
                        c[i, i] += popcount(parts[i])
                        for j in range(i + 1, k):
                            c[i, j] += popcount(np.bitwise_and(parts[i], parts[j]))
                    advance(min(count * 8, numel[name] - start * 8))
                counts[name] = c + np.triu(c, 1).T
    finally:
        for s in sources:
            s.close()
    tol = {m.meta.tolerance for m in loaded}
    notes = [] if len(tol) <= 1 else [f"the masks were made at different tolerances ({sorted(map(str, tol))})"]
    return OverlapResult(labels, numel, counts, source="masks", tolerance=tol.pop() if len(tol) == 1 else None,
                         notes=notes)


class _PackedSource:
    """Reads byte ranges of a mask's packed tensors: from its file in chunks, or from memory."""

    def __init__(self, mask: Mask):
        self.mask = mask
        self._index = _packed_index(mask.path) if mask.path is not None else None
        self._reader = TensorReader() if mask.path is not None else None
        self._buf: np.ndarray | None = None
        self._packed: tuple[str, np.ndarray] | None = None

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        if self._reader is None:
            if self._packed is None or self._packed[0] != name:
                self._packed = (name, self.mask.packed(name))
            return self._packed[1][start:start + count].copy()
        if self._buf is None or self._buf.size < count:
            self._buf = np.empty(count, dtype=np.uint8)
        return self._reader.read(self._index[name], start, count, self._buf)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _packed_index(path) -> dict[str, TensorInfo]:
    # a mask file is safetensors whatever its extension; Mask.load has validated it
    entries, _ = read_header(path)
    return {n: TensorInfo(n, e.dtype, e.shape, path, e.offset, e.nbytes) for n, e in entries.items()}


def overlap_from_checkpoints(*checkpoints: str | os.PathLike | Checkpoint, tolerance: float | str = PAPER_TOLERANCE,
                             labels: Sequence[str] | None = None, progress: bool = False,
                             chunk_elements: int | None = None, ray: str | None = None) -> OverlapResult:
    """Overlap of the subnetworks of two or more finetuning runs, straight from their checkpoints.

    One pass on the stream engine over all checkpoints: each run's changed elements at
    ``tolerance`` (the diff's definition, FP8 block scales included) are found as packed bits and
    every pairwise intersection is counted with popcounts; no mask is written. A base shared by
    several runs is read once.

    Args:
        *checkpoints: ``BASE_1, FT_1, BASE_2, FT_2, ...``: each run's checkpoints before and after
            finetuning (all bases the same model: same tensors and shapes).
        tolerance: ``|new - old| > tolerance`` counts as changed (paper: 1e-5).
        labels: Names of the runs (default: the finetuned paths).
        progress: Show a progress bar on stderr.
        chunk_elements: Elements per chunk and checkpoint (default: bounded memory whatever the count).
        ray: Run on a Ray cluster at this address ("local" starts one here); None runs locally.

    Example:
        >>> r = overlap_from_checkpoints("sft", "dpo_seed42", "sft", "dpo_seed123")
        >>> r.pairs[0].total.jaccard
    """
    from rlsparse.diff.kernel import float32_threshold
    from rlsparse.report.progress import progress_bar

    if len(checkpoints) < 4 or len(checkpoints) % 2:
        raise UsageError(f"checkpoints: got {len(checkpoints)} paths; give pairs BASE FINETUNED for two or more "
                         "runs (4, 6, 8... paths)")
    tolerance = check_tolerance(tolerance, "tolerance")
    cks = [open_checkpoint(c) for c in checkpoints]
    runs = [(cks[i], cks[i + 1]) for i in range(0, len(cks), 2)]
    k = len(runs)
    labels = list(labels) if labels is not None else [ft.source for _, ft in runs]
    if len(labels) != k:
        raise UsageError(f"labels: {len(labels)} names for {k} runs; give one label per run")
    items = stream_items(runs, shared_base=False)
    kernel = OverlapKernel(float32_threshold(tolerance), k)
    execute = stream_runner(ray)
    with progress_bar(sum(it.nbytes for it in items), "overlap", enabled=progress) as advance:
        out = execute(items, kernel, chunk_elements=chunk_elements, advance=advance)
    numel = {it.name: it.numel for it in items}
    counts = {}
    for i, it in enumerate(items):
        c = out.partials.get(i)
        c = np.zeros((k, k), np.int64) if c is None else c
        counts[it.name] = c + np.triu(c, 1).T
    return OverlapResult(labels, numel, counts, source="checkpoints", tolerance=tolerance)


@dataclass(frozen=True)
class OverlapKernel:
    """Stream kernel over sources (base_1, ft_1, ..., base_k, ft_k): per chunk the k x k upper
    triangle of ``|I_i ∩ I_j|`` (diagonal ``|I_i|``) from packed changed bits; merge adds."""

    threshold: np.float32
    k: int

    def compute(self, chunk):
        it, raw, sc = chunk.item, chunk.raw, chunk.scales
        bits = [changed_packed(raw[2 * r], raw[2 * r + 1], it.infos[2 * r].dtype, it.infos[2 * r + 1].dtype,
                               self.threshold, sc[2 * r], sc[2 * r + 1], it.cols) for r in range(self.k)]
        c = np.zeros((self.k, self.k), dtype=np.int64)
        for i in range(self.k):
            c[i, i] = popcount(bits[i])
            for j in range(i + 1, self.k):
                c[i, j] = popcount(np.bitwise_and(bits[i], bits[j]))
        return c, None

    def merge(self, acc, partial):
        acc += partial
        return acc
