"""The diff as a kernel on the stream engine: counts at every tolerance, histogram, streamed mask.

``diff.stream`` reads both checkpoints chunk by chunk (one read-ahead thread, a fixed buffer pool,
compute threads, in-order merge); ``DiffKernel`` compares each chunk (``kernel.compare_chunk``)
and the engine folds the counts per tensor, while the packed mask bytes go, in order, to the
mask writer. Memory is bounded by the chunk size whatever the model size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rlsparse.diff import stream
from rlsparse.diff.kernel import Accumulator, ChunkSpec, compare_chunk, float32_threshold
from rlsparse.diff.plan import Pair, Plan
from rlsparse.diff.result import TensorStats
from rlsparse.masks.mask import MaskMeta, MaskWriter

DEFAULT_CHUNK_ELEMENTS = stream.DEFAULT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class DiffKernel:
    """Compare base (source 0) and finetuned (source 1): per-tensor counts, and packed mask
    bytes as the ordered piece when ``mask_threshold`` is set."""

    thresholds: np.ndarray  # float32 thresholds (``float32_threshold``), one per tolerance
    mask_threshold: np.float32 | None = None
    compare_code: str | None = None

    def compute(self, chunk: stream.Chunk):
        it = chunk.item
        spec = ChunkSpec(it.infos[0].dtype, it.infos[1].dtype, self.compare_code, it.cols)
        res = compare_chunk(chunk.raw[0], chunk.raw[1], spec, self.thresholds, self.mask_threshold,
                            chunk.scales[0], chunk.scales[1])
        piece, res.packed = res.packed, None
        return res, piece

    def merge(self, acc, partial):
        if not isinstance(acc, Accumulator):
            acc = Accumulator(ntol=self.thresholds.size).add_from(acc)
        return acc.add_from(partial)


def items_of(plan: Plan) -> list[stream.Item]:
    """The plan's pairs as stream items: source 0 the base, source 1 the finetuned tensor."""
    return [stream.Item(p.name, (p.base, p.finetuned), (p.base_scale, p.finetuned_scale), p.rows) for p in plan.pairs]


def kernel_for(tolerances: list[float], mask_tolerance: float | None, compare_dtype: str | None) -> DiffKernel:
    thresholds = np.array([float32_threshold(t) for t in tolerances], dtype=np.float32)
    mthr = float32_threshold(mask_tolerance) if mask_tolerance is not None else None
    return DiffKernel(thresholds, mthr, compare_dtype)


def run(plan: Plan, tolerances: list[float], labels: list[str], *, mask_path=None, mask_tolerance: float | None = None,
        mask_meta: dict | None = None, compare_dtype: str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, workers: int = 2,
        advance: Callable[[int], None] = lambda n: None,
        execute: Callable | None = None) -> tuple[dict[str, TensorStats], int, float]:
    """Compare every pair of ``plan``; optionally stream the mask to ``mask_path``.

    ``execute(items, kernel, sink=..., advance=..., chunk_elements=...)`` runs the stream
    (default: ``stream.run`` on this machine; ``diff.distributed`` passes a Ray runner).

    Returns (stats by name, bytes read, seconds).
    """
    items = items_of(plan)
    kernel = kernel_for(tolerances, mask_tolerance if mask_path is not None else None, compare_dtype)
    execute = execute or (lambda *a, **kw: stream.run(*a, workers=workers, **kw))
    writer = None
    if mask_path is not None:
        writer = MaskWriter(mask_path, {p.name: _mask_shape(p) for p in plan.pairs})
        writer.__enter__()

    def sink(span: stream.Span, packed: np.ndarray) -> None:
        p = plan.pairs[span.item]
        if span.last and p.rows is not None:
            packed = _with_new_rows(packed, p)
        writer.write(p.name, packed)

    try:
        out = execute(items, kernel, sink=sink if writer is not None else None, advance=advance,
                      chunk_elements=chunk_elements)
        accs = [_as_accumulator(kernel, out.partials.get(i)) for i in range(len(items))]
        stats = {}
        for p, acc in zip(plan.pairs, accs):
            stats[p.name] = TensorStats(
                name=p.name, shape=p.finetuned.shape, dtypes=(p.base.dtype, p.finetuned.dtype), numel=acc.numel,
                changed={lab: int(c) for lab, c in zip(labels, acc.changed)}, bit_changed=acc.bit_changed,
                hist=acc.hist, nan_base=acc.nan_base, nan_finetuned=acc.nan_finetuned, inf_base=acc.inf_base,
                inf_finetuned=acc.inf_finetuned, note=p.note)
        if writer is not None:
            mi = tolerances.index(mask_tolerance)  # the caller adds it to the sweep
            counts = {p.name: int(acc.changed[mi]) + p.finetuned.numel - p.numel for p, acc in zip(plan.pairs, accs)}
            writer.set_meta(MaskMeta(shapes={p.name: list(_mask_shape(p)) for p in plan.pairs}, counts=counts,
                                     tolerance=mask_tolerance, **(mask_meta or {})))
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    return stats, out.bytes_read, out.seconds


def _as_accumulator(kernel: DiffKernel, partial) -> Accumulator:
    if isinstance(partial, Accumulator):
        return partial
    acc = Accumulator(ntol=kernel.thresholds.size)
    return acc if partial is None else acc.add_from(partial)


def _mask_shape(p: Pair) -> tuple[int, ...]:
    return p.finetuned.shape


def _with_new_rows(packed: np.ndarray, p: Pair) -> np.ndarray:
    """Append the rows that only the finetuned tensor has (a grown vocabulary): they are new,
    so they belong to the subnetwork. ``packed`` holds the last compared chunk."""
    extra = p.finetuned.numel - p.numel
    if extra <= 0:
        return packed
    r = p.numel % 8
    out = packed.copy()
    if r:
        out[-1] |= np.uint8((0xFF << r) & 0xFF)
        extra -= 8 - r
    if extra > 0:
        out = np.concatenate([out, np.packbits(np.ones(extra, dtype=bool), bitorder="little")])
    return out
