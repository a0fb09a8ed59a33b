"""Stream two checkpoints chunk by chunk through the comparison kernel.

One reader thread prefetches the next chunks of both sides (``os.preadv`` releases the GIL)
while the main thread compares the current ones, so reading and computing overlap. Memory is
bounded by the chunk size whatever the model size: buffers are allocated once and reused.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rlsparse.diff.kernel import FP8_BLOCK, Accumulator, ChunkSpec, compare_chunk, float32_threshold
from rlsparse.diff.plan import Pair, Plan
from rlsparse.diff.result import TensorStats
from rlsparse.io import dtypes
from rlsparse.io.memory import reuse_freed_buffers
from rlsparse.io.reader import TensorReader
from rlsparse.masks.mask import MaskMeta, MaskWriter

# 1M elements (2 MB per bf16 side): chunk temporaries stay small and cache-friendly; CPU time per GB
# measured flat from 256K to 1M on 2 cores, wall time best at 1M (bench/bench_diff.py)
DEFAULT_CHUNK_ELEMENTS = 1024 * 1024


@dataclass(frozen=True)
class _Work:
    pair: int
    start: int
    count: int
    row0: int  # first row of the chunk (for block scales)


def _chunks(pairs: list[Pair], target: int) -> list[_Work]:
    """Split every pair into chunks of about ``target`` elements: whole rows, a multiple of 8
    elements (so each chunk packs into whole mask bytes), 128-row blocks for FP8 scales."""
    work: list[_Work] = []
    for i, p in enumerate(pairs):
        n = p.numel
        row = _row_size(p)
        align = FP8_BLOCK if (p.base_scale or p.finetuned_scale) else 8
        rows = max(align, (target // row) // align * align)
        step = rows * row
        if n == 0:
            work.append(_Work(i, 0, 0, 0))
        for start in range(0, n, step):
            work.append(_Work(i, start, min(step, n - start), start // row))
    return work


def _row_size(p: Pair) -> int:
    n = 1
    for s in p.base.shape[1:]:
        n *= s
    return max(n, 1)


def run(plan: Plan, tolerances: list[float], labels: list[str], *, mask_path=None, mask_tolerance: float | None = None,
        mask_meta: dict | None = None, compare_dtype: str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, workers: int = 2,
        advance: Callable[[int], None] = lambda n: None) -> tuple[dict[str, TensorStats], int, float]:
    """Compare every pair of ``plan``; optionally stream the mask to ``mask_path``.

    ``workers`` threads each read a chunk of both sides into their own buffers and compare it
    (numpy and ``preadv`` release the GIL); the main thread merges results in chunk order and
    writes the mask sequentially. At most ``2 * workers`` chunks are in flight.

    Returns (stats by name, bytes read, seconds).
    """
    reuse_freed_buffers()
    t0 = time.perf_counter()
    pairs = plan.pairs
    thresholds = np.array([float32_threshold(t) for t in tolerances], dtype=np.float32)
    mthr = float32_threshold(mask_tolerance) if mask_path is not None else None
    work = _chunks(pairs, chunk_elements)
    accs = [Accumulator(ntol=len(tolerances)) for _ in pairs]
    specs = [ChunkSpec(p.base.dtype, p.finetuned.dtype, compare_dtype, p.cols) for p in pairs]
    max_bytes = max((w.count * max(dtypes.itemsize(pairs[w.pair].base.dtype),
                                   dtypes.itemsize(pairs[w.pair].finetuned.dtype)) for w in work), default=0)
    # Reading and comparing run on separate threads: one reader thread keeps up to ``io_depth``
    # chunks loaded ahead (on a cold cache the disk never waits for the comparison), and
    # ``workers`` threads compare. One reader, not several: each file is then read strictly in
    # order through one descriptor, which the kernel's readahead needs (two readers taking turns
    # look like strided access to it and lose readahead on a cold cache). Buffers come from a
    # fixed pool, so memory stays bounded.
    io_depth = 4 * max(1, workers)
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(io_depth + 1):
        slots.put((np.empty(max_bytes, np.uint8), np.empty(max_bytes, np.uint8)))
    local = threading.local()
    readers: list[TensorReader] = []
    lock = threading.Lock()

    def thread_readers() -> tuple[TensorReader, TensorReader]:
        if not hasattr(local, "readers"):
            local.readers = (TensorReader(), TensorReader())
            with lock:
                readers.extend(local.readers)
        return local.readers

    def load(k: int):
        w = work[k]
        p = pairs[w.pair]
        ra, rb = thread_readers()
        buffers = slots.get()
        a = ra.read(p.base, w.start, w.count, buffers[0])
        b = rb.read(p.finetuned, w.start, w.count, buffers[1])
        sa = sb = None
        if p.base_scale is not None or p.finetuned_scale is not None:
            r0 = w.row0 // FP8_BLOCK
            r1 = -(-(w.row0 + w.count // _row_size(p)) // FP8_BLOCK)
            sa = _scale_rows(ra, p.base_scale, r0, r1)
            sb = _scale_rows(rb, p.finetuned_scale, r0, r1)
        return buffers, a, b, sa, sb

    def process(k: int, loaded):
        buffers, a, b, sa, sb = loaded.result()
        try:
            res = compare_chunk(a, b, specs[work[k].pair], thresholds, mthr, sa, sb)
        finally:
            slots.put(buffers)
        return res, a.nbytes + b.nbytes

    writer = None
    if mask_path is not None:
        writer = MaskWriter(mask_path, {p.name: _mask_shape(p) for p in pairs})
        writer.__enter__()
    nbytes = 0
    depth = 2 * max(1, workers)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsparse-read") as io_pool, \
                ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rlsparse-diff") as pool:
            loads = {k: io_pool.submit(load, k) for k in range(min(io_depth, len(work)))}
            futures = deque(pool.submit(process, k, loads.pop(k)) for k in range(min(depth, len(work))))
            for k, w in enumerate(work):
                res, step = futures.popleft().result()
                if k + io_depth < len(work):
                    loads[k + io_depth] = io_pool.submit(load, k + io_depth)
                if k + depth < len(work):
                    futures.append(pool.submit(process, k + depth, loads.pop(k + depth)))
                p = pairs[w.pair]
                accs[w.pair].add(res)
                if writer is not None:
                    packed = res.packed
                    if _is_last_chunk(work, k) and p.rows is not None:
                        packed = _with_new_rows(packed, p)
                    writer.write(p.name, packed)
                nbytes += step
                advance(step)
        stats = {}
        for p, acc in zip(pairs, accs):
            stats[p.name] = TensorStats(
                name=p.name, shape=p.finetuned.shape, dtypes=(p.base.dtype, p.finetuned.dtype), numel=acc.numel,
                changed={lab: int(c) for lab, c in zip(labels, acc.changed)}, bit_changed=acc.bit_changed,
                hist=acc.hist, nan_base=acc.nan_base, nan_finetuned=acc.nan_finetuned, inf_base=acc.inf_base,
                inf_finetuned=acc.inf_finetuned, note=p.note)
        if writer is not None:
            mi = tolerances.index(mask_tolerance)  # the caller adds it to the sweep
            counts = {p.name: int(acc.changed[mi]) + p.finetuned.numel - p.numel for p, acc in zip(pairs, accs)}
            writer.set_meta(MaskMeta(shapes={p.name: list(_mask_shape(p)) for p in pairs}, counts=counts,
                                     tolerance=mask_tolerance, **(mask_meta or {})))
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
            writer = None
        raise
    finally:
        for r in readers:
            r.close()
    if writer is not None:
        writer.__exit__(None, None, None)
    return stats, nbytes, time.perf_counter() - t0


def _scale_rows(reader: TensorReader, info, r0: int, r1: int) -> np.ndarray | None:
    """Rows ``[r0, r1)`` of a block-scale tensor as float32."""
    if info is None:
        return None
    cols = info.shape[1] if len(info.shape) == 2 else 1
    raw = reader.read(info, r0 * cols, (min(r1, info.shape[0]) - r0) * cols)
    return dtypes.widen(raw, info.dtype).astype(np.float32).reshape(-1, cols)


def _is_last_chunk(work: list[_Work], k: int) -> bool:
    return k + 1 == len(work) or work[k + 1].pair != work[k].pair


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
