"""One streaming engine for every analysis: N checkpoints read in step, chunk by chunk, into a kernel.

The engine owns everything that is the same for every analysis; a kernel owns only the maths.

Engine (this module):
    * the work: a list of ``Item`` (one tensor aligned across N checkpoints: its ``TensorInfo``
      in each, plus FP8 block scales), made by a plan (``diff.plan``);
    * chunking (``split``): whole rows, a multiple of 8 elements (a chunk packs into whole mask
      bytes), 128-row blocks for FP8 block-scaled tensors, about ``chunk_elements`` per source;
    * read-ahead that loads the next chunks of all N sources into a fixed, page-aligned buffer
      pool: one thread for page-cache reads (each file read in order through one descriptor,
      which the kernel's readahead needs), two when cold ranges are read with O_DIRECT (no
      readahead to keep; two requests in flight); a source that is the same stored tensor as an
      earlier one (a shared base) is read once;
    * ``workers`` threads that call ``kernel.compute`` (numpy releases the GIL);
    * the ordered merge: partial results are folded per item in chunk order with
      ``kernel.merge``; ordered outputs ("pieces", e.g. packed mask bytes) go to ``sink`` in
      chunk order; progress is advanced by the bytes of each merged chunk;
    * shards (``run`` with ``spans=``): any contiguous range of the spans can run on its own
      (another thread, process or Ray task) and its per-item partials merged afterwards in
      shard order give bit-identical results (see ``diff.distributed``).

Kernel contract (anything with these two methods; it must pickle for Ray):
    ``compute(chunk: Chunk) -> (partial, piece)``
        Called on worker threads, in any order, possibly concurrently: a pure function of the
        chunk. ``chunk.raw[i]`` are the raw bits (unsigned ints of the stored width) of source i
        and are only valid during the call (the buffer goes back to the pool): copy what you
        keep. ``chunk.scales[i]`` are the float32 block scales covering the chunk's rows (or
        None). ``partial`` is a mergeable summary (counts; ``None`` allowed), ``piece`` an ordered
        output for the sink (``None`` when there is none).
    ``merge(acc, partial) -> acc``
        Folds a later partial of the same item into an earlier one (may mutate and return
        ``acc``). Must be associative, so shard results merge exactly like chunk results.
    ``flush()`` (optional)
        Called once the last span is merged (and when the run fails): a kernel that hands work to
        a thread of its own (``delta.apply``'s write-behind) waits for it there.

Example:
    >>> items = [Item("w", (info_base, info_ft))]
    >>> out = run(items, MyKernel(), chunk_elements=1 << 20)
    >>> out.partials[0]  # the merged partial of item 0
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from rlsparse.io import dtypes
from rlsparse.io.checkpoint import TensorInfo
from rlsparse.io.memory import aligned_empty, reuse_freed_buffers
from rlsparse.io.reader import MappedFiles, TensorReader, direct_size

FP8_BLOCK = dtypes.FP8_BLOCK
# 1M elements (2 MB per bf16 source): chunk temporaries stay small and cache-friendly; CPU time per GB
# measured flat from 256K to 1M on 2 cores, wall time best at 1M (bench/bench_diff.py)
DEFAULT_CHUNK_ELEMENTS = 1024 * 1024
# With many sources (a long series) the chunk shrinks so that one chunk of all of them stays
# about this size: the buffer pool (io_depth + 1 chunks) then stays bounded whatever N.
_CHUNK_BYTES_ALL_SOURCES = 8 << 20
# Read cold ranges with O_DIRECT into the pool's page-aligned buffers. Off by default: on the
# shared 2-core machine it was measured (bench/bench_diff.py --before, 2026-11-28) no faster than
# the page cache (cold medians 0.10 vs 0.13 GB/s on the 850M pair, 0.13 vs 0.13 on a 182M pair,
# every run CPU-bound at load 15-28); measure on a quiet machine before switching it on.
DIRECT_READS = False


@dataclass(frozen=True)
class Item:
    """One tensor aligned across N checkpoints (sources): what the engine streams.

    Attributes:
        name: Clean tensor name (the key of results and mask entries).
        infos: Where the tensor is stored in each source (same element count at least ``numel``).
        scales: FP8 block-scale tensor of each source, or None (empty tuple: no scales anywhere).
        rows: Stream only the first ``rows`` rows (a resized vocabulary); None for all.
    """

    name: str
    infos: tuple[TensorInfo, ...]
    scales: tuple[TensorInfo | None, ...] = ()
    rows: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.infos[0].shape

    @property
    def row_size(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return max(n, 1)

    @property
    def cols(self) -> int:
        """Last-dimension size (block scales cover 128 x 128 blocks of rows x cols)."""
        return self.shape[-1] if len(self.shape) >= 2 else 1

    @property
    def numel(self) -> int:
        """Elements streamed (all, or the first ``rows`` rows)."""
        if self.rows is None:
            return self.infos[0].numel
        return self.rows * self.row_size if self.shape and self.shape[0] else 0

    @property
    def scaled(self) -> bool:
        return any(s is not None for s in self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes read for this item over all distinct sources."""
        return self.numel * sum(dtypes.itemsize(self.infos[i].dtype) for i in _distinct(self.infos))

    def scale(self, i: int) -> TensorInfo | None:
        return self.scales[i] if i < len(self.scales) else None


@dataclass(frozen=True)
class Span:
    """A range of one item's elements: the unit of reading, computing and merging."""

    item: int  # index into the item list
    start: int
    count: int
    row0: int  # first row (block scales are selected by row)
    first: bool
    last: bool


@dataclass
class Chunk:
    """What a kernel's ``compute`` receives: one span of every source, read and aligned."""

    item: Item
    span: Span
    raw: tuple[np.ndarray, ...]  # raw bits per source (valid only during compute)
    scales: tuple[np.ndarray | None, ...]  # float32 block-scale rows per source, or None


class Kernel(Protocol):
    def compute(self, chunk: Chunk) -> tuple[Any, Any]: ...

    def merge(self, acc: Any, partial: Any) -> Any: ...


@dataclass
class StreamOutput:
    """What ``run`` returns: merged partials per item (None where no span ran), bytes, seconds."""

    partials: dict[int, Any] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0


def chunk_elements_for(items: Sequence[Item], chunk_elements: int | None) -> int:
    """The chunk size to use: ``chunk_elements`` if given, else 1M elements, less with many sources."""
    if chunk_elements is not None:
        return chunk_elements
    width = max((sum(dtypes.itemsize(it.infos[i].dtype) for i in _distinct(it.infos)) for it in items), default=1)
    return max(64 * 1024, min(DEFAULT_CHUNK_ELEMENTS, _CHUNK_BYTES_ALL_SOURCES // width))


def split(items: Sequence[Item], chunk_elements: int) -> list[Span]:
    """Spans of about ``chunk_elements`` elements: whole rows, multiples of 8, FP8 128-row blocks."""
    spans: list[Span] = []
    for i, it in enumerate(items):
        n, row = it.numel, it.row_size
        align = FP8_BLOCK if it.scaled else 8
        rows = max(align, (chunk_elements // row) // align * align)
        step = rows * row
        if n == 0:
            spans.append(Span(i, 0, 0, 0, True, True))
        for start in range(0, n, step):
            count = min(step, n - start)
            spans.append(Span(i, start, count, start // row, start == 0, start + count >= n))
    return spans


def span_bytes(items: Sequence[Item], s: Span) -> int:
    it = items[s.item]
    return s.count * sum(dtypes.itemsize(it.infos[i].dtype) for i in _distinct(it.infos))


def _slot_bytes(items: Sequence[Item], s: Span) -> int:
    """Buffer bytes for one span of every distinct source: each region page-aligned, with room
    for a direct read's aligned head and tail."""
    it = items[s.item]
    return sum(direct_size(s.count * dtypes.itemsize(it.infos[i].dtype)) for i in _distinct(it.infos))


def run(items: Sequence[Item], kernel: Kernel, *, spans: Sequence[Span] | None = None,
        chunk_elements: int | None = None, workers: int = 2, sink: Callable[[Span, Any], None] | None = None,
        advance: Callable[[int], None] = lambda n: None, direct: bool | None = None,
        mapped: bool = False, inline: bool = False) -> StreamOutput:
    """Stream ``spans`` (default: all of ``items``) through ``kernel``; see the module docstring.

    Args:
        items: The aligned tensors.
        kernel: An object with ``compute`` and ``merge`` (the kernel contract).
        spans: A contiguous, ordered subset of ``split(items, ...)`` (a shard); default all.
        chunk_elements: Elements per span when ``spans`` is None (default: ``chunk_elements_for``).
        workers: Compute threads.
        sink: Called with (span, piece) in span order for every non-None piece.
        advance: Called with the bytes of each merged span (progress).
        direct: Read ranges that are not in the page cache with O_DIRECT (see ``io.reader``);
            None: ``DIRECT_READS``.
        mapped: Give the kernel read-only views of the page cache (``io.reader.MappedFiles``)
            instead of copies, for safetensors sources: for kernels that never write into
            ``chunk.raw`` (less CPU per byte on a warm cache).
        inline: Read and compute every span on the calling thread, one after the other (no
            read-ahead, ``workers`` ignored): for a caller that is itself one of several
            processes (``diff.forked``), where handing each chunk between a reader thread, a
            compute thread and the merging thread costs more than it overlaps (their GIL
            hand-offs: ~10% of the wall time of ``delta apply`` on a real 269 MB pair).

    Returns:
        StreamOutput: merged partial per item index, bytes read, seconds.
    """
    reuse_freed_buffers()
    t0 = time.perf_counter()
    if spans is None:
        spans = split(items, chunk_elements_for(items, chunk_elements))
    spans = list(spans)
    out = StreamOutput()
    if not spans:
        return out
    nsrc = max(len(it.infos) for it in items)
    slot_bytes = max(_slot_bytes(items, s) for s in spans)
    # Reader threads keep up to ``io_depth`` chunks loaded ahead (on a cold cache the disk never
    # waits for the kernel) and ``workers`` threads compute. Buffers come from a fixed pool, so
    # memory stays bounded.
    workers = max(1, workers)
    io_depth = 4 * workers
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(1 if inline else min(io_depth, len(spans)) + 1):
        slots.put(aligned_empty(slot_bytes))
    direct = DIRECT_READS if direct is None else direct
    # Direct reads get no kernel readahead: two reader threads keep two requests in flight.
    # Buffered reads keep one thread (in-order access per descriptor keeps the readahead).
    io_threads = 2 if direct else 1
    local = threading.local()
    all_readers: list[TensorReader] = []
    lock = threading.Lock()

    def thread_readers() -> list[TensorReader]:
        if not hasattr(local, "readers"):
            local.readers = [TensorReader(direct=direct) for _ in range(nsrc)]
            with lock:
                all_readers.extend(local.readers)
        return local.readers

    maps = MappedFiles() if mapped else None

    def load(k: int):
        s = spans[k]
        it = items[s.item]
        readers = thread_readers()
        if maps is not None and all(info.offset is not None for info in it.infos):
            raws = [maps.view(info, s.start, s.count) for info in it.infos]
            if all(r is not None for r in raws):  # else a file that cannot be mapped: copy below
                scales = [_scale_rows(readers[i], it, i, s) for i in range(len(it.infos))]
                return None, Chunk(it, s, tuple(raws), tuple(scales))
        buf = slots.get()
        raws: list[np.ndarray] = []
        scales: list[np.ndarray | None] = []
        pos = 0
        for i, info in enumerate(it.infos):
            same = _same_as_earlier(it.infos, i)
            if same is not None:
                raws.append(raws[same])
            else:
                size = direct_size(s.count * dtypes.itemsize(info.dtype))
                raws.append(readers[i].read(info, s.start, s.count, buf[pos:pos + size]))
                pos += size
            scales.append(_scale_rows(readers[i], it, i, s))
        return buf, Chunk(it, s, tuple(raws), tuple(scales))

    def compute(loaded):
        buf, chunk = loaded
        try:
            return kernel.compute(chunk)
        finally:
            if buf is not None:
                slots.put(buf)
            else:
                for info in chunk.item.infos:
                    maps.release(info, chunk.span.start, chunk.span.count)

    widths = {i: sum(dtypes.itemsize(items[i].infos[j].dtype) for j in _distinct(items[i].infos))
              for i in {s.item for s in spans}}  # bytes per element over distinct sources, per item

    def merge(s: Span, partial, piece) -> None:
        prev = out.partials.get(s.item)
        out.partials[s.item] = partial if prev is None else kernel.merge(prev, partial)
        if piece is not None and sink is not None:
            sink(s, piece)
        step = s.count * widths[s.item]
        out.bytes_read += step
        advance(step)

    flush = getattr(kernel, "flush", None)
    try:
        if inline:
            for k, s in enumerate(spans):
                merge(s, *compute(load(k)))
        else:
            _run_threaded(spans, load, compute, merge, workers, io_threads, io_depth)
        if flush is not None:
            flush()
    except BaseException:
        if flush is not None:  # the kernel's writes still in flight end before the error leaves
            with contextlib.suppress(Exception):
                flush()
        raise
    finally:
        for r in all_readers:
            r.close()
        if maps is not None:
            maps.close()
    out.seconds = time.perf_counter() - t0
    return out


def _run_threaded(spans, load, compute, merge, workers: int, io_threads: int, io_depth: int) -> None:
    """Read-ahead on ``io_threads``, ``compute`` on ``workers`` threads, ``merge`` in span order here."""
    depth = 2 * workers

    def compute_loaded(loaded):
        return compute(loaded.result())

    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="rlsparse-read") as io_pool, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlsparse-compute") as pool:
        loads = {k: io_pool.submit(load, k) for k in range(min(io_depth, len(spans)))}
        futures = deque(pool.submit(compute_loaded, loads.pop(k)) for k in range(min(depth, len(spans))))
        for k, s in enumerate(spans):
            partial, piece = futures.popleft().result()
            if k + io_depth < len(spans):
                loads[k + io_depth] = io_pool.submit(load, k + io_depth)
            if k + depth < len(spans):
                futures.append(pool.submit(compute_loaded, loads.pop(k + depth)))
            merge(s, partial, piece)


def merge_outputs(kernel: Kernel, outputs: Sequence[StreamOutput]) -> StreamOutput:
    """Merge shard outputs (given in shard order) into one, exactly as one run would have."""
    total = StreamOutput()
    for o in outputs:
        for i, p in o.partials.items():
            prev = total.partials.get(i)
            total.partials[i] = p if prev is None else kernel.merge(prev, p)
        total.bytes_read += o.bytes_read
        total.seconds = max(total.seconds, o.seconds)
    return total


def _distinct(infos: Sequence[TensorInfo]) -> list[int]:
    return [i for i in range(len(infos)) if _same_as_earlier(infos, i) is None]


def _same_as_earlier(infos: Sequence[TensorInfo], i: int) -> int | None:
    """Index of an earlier source holding the very same stored bytes (a shared base), or None."""
    a = infos[i]
    if a.offset is None:
        return None
    for j in range(i):
        b = infos[j]
        if b.file == a.file and b.offset == a.offset and b.dtype == a.dtype:
            return j
    return None


def _scale_rows(reader: TensorReader, it: Item, i: int, s: Span) -> np.ndarray | None:
    """The block-scale rows covering the span's rows, as float32 (None without scales)."""
    info = it.scale(i)
    if info is None or s.count == 0:
        return None
    r0 = s.row0 // FP8_BLOCK
    r1 = -(-(s.row0 + s.count // it.row_size) // FP8_BLOCK)
    cols = info.shape[1] if len(info.shape) == 2 else 1
    raw = reader.read(info, r0 * cols, (min(r1, info.shape[0]) - r0) * cols)
    return dtypes.widen(raw, info.dtype).astype(np.float32).reshape(-1, cols)
