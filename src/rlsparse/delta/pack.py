"""``rlsparse.delta.pack``: code a finetuned model as a patch against its base.

Checkpoints on disk stream through the shared engine (``diff.stream``) with ``PackKernel``:
each span of a tensor is coded (``codec.encode_chunk``) and its coded bytes are appended to the
patch in span order. The coding runs in forked worker processes (``diff.forked``: the per-chunk
numpy calls, and in format v1 the ANS coder, hold the GIL, so threads share one core) when the checkpoint is
large enough to pay for the fork, else on worker threads (``parallel`` chooses). In-memory state
dicts (weight sync) run the same kernel over the same spans on a thread pool.

Identity: each chunk's stored bytes are hashed (xxh3-128) on the worker; a tensor's hash is the
xxh3-128 of its chunks' digests in order, chunk boundaries as recorded in the patch. The base
side's hash lets ``apply`` refuse a wrong base; the result's lets it verify what it wrote.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlsparse.delta import codec, compiled
from rlsparse.delta.format import FileEntry, Manifest, PatchWriter, TensorEntry, new_hasher
from rlsparse.delta.sources import CheckpointSource, StateDictSource, open_source
from rlsparse.diff import forked, stream
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import TensorInfo

# 4M elements per span (8 MB of bf16 per side): the per-chunk model (a symbol histogram) costs a
# few hundred bytes, under 1% of a chunk's code even at 0.4% density.
DEFAULT_CHUNK_ELEMENTS = 4 * 1024 * 1024
# A patch whose coded data is larger than this becomes a folder of shards (``delta.shards``).
DEFAULT_SHARD_BYTES = 5 * 10**9
# ``parallel="auto"`` forks worker processes from this many checkpoint bytes up: below it the
# fork and the per-process start (20-40 ms of CPU measured for two workers) cost more than a second core gives.
AUTO_PROCESS_BYTES = 64 << 20
PARALLEL_MODES = ("auto", "threads", "processes")
# Compare and hash a chunk this many elements at a time (256 KB of bf16 per side stays in cache).
_BLOCK_ELEMENTS = 128 * 1024


def use_processes(parallel: str, workers: int, nbytes: int) -> bool:
    """Whether pack/apply code in forked processes: ``parallel`` is "auto" (processes for
    checkpoints of at least ``AUTO_PROCESS_BYTES`` with 2+ workers where fork exists),
    "threads" or "processes" (forced; threads where fork does not exist)."""
    from rlsparse.errors import UsageError

    if parallel not in PARALLEL_MODES:
        raise UsageError(f"parallel={parallel!r}: expected one of {', '.join(PARALLEL_MODES)}")
    if parallel == "threads" or not forked.available():
        return False
    return parallel == "processes" or (workers >= 2 and nbytes >= AUTO_PROCESS_BYTES)


def chunk_digest(bits: np.ndarray) -> bytes:
    h = new_hasher()
    h.update(memoryview(np.ascontiguousarray(bits)).cast("B"))
    return h.digest()


def changes_and_digests(old: np.ndarray, new: np.ndarray, positions: np.ndarray | None = None,
                        scan: codec.SparseScan | None = None) -> tuple[np.ndarray | None, tuple[bytes, bytes]]:
    """``(np.flatnonzero(old != new), (chunk_digest(old), chunk_digest(new)))`` in one pass over
    the memory: compared and hashed a block at a time, while the block is in the CPU cache
    (three passes over a page-cache view cost ~10% more CPU on a real pair). The positions are
    found by the C kernel where it was built (``changed_positions``: 2x less CPU than
    numpy's compare and ``flatnonzero``), else by numpy. ``positions``: an int64 array of at
    least ``new.size`` elements for the kernel to write them into (the result is then a view of
    it), reused by the caller chunk after chunk; None: a new one. ``scan``: each block goes to
    this :class:`codec.SparseScan` instead (2-byte elements: it finds the changes and codes them
    while the block is in the cache); the positions are then None."""
    old, new = np.ascontiguousarray(old), np.ascontiguousarray(new)
    h_old, h_new = new_hasher(), new_hasher()
    find = None if compiled.KERNELS is None or scan is not None else compiled.KERNELS.changed_positions
    # the kernel writes every block's positions straight into one array (pages never written cost nothing)
    idx = None if find is None else np.empty(new.size, dtype=np.int64) if positions is None else positions
    count, parts = 0, []
    for a in range(0, new.size, _BLOCK_ELEMENTS):
        o, w = old[a:a + _BLOCK_ELEMENTS], new[a:a + _BLOCK_ELEMENTS]
        h_old.update(memoryview(o).cast("B"))
        h_new.update(memoryview(w).cast("B"))
        if scan is not None:
            scan.add(o, w, a)
            continue
        if find is not None:
            count += find(o, w, idx[count:], a)
            continue
        found = np.flatnonzero(o != w)
        if found.size:
            parts.append(found + a if a else found)
    digests = (h_old.digest(), h_new.digest())
    if scan is not None:
        return None, digests
    if find is not None:
        return idx[:count], digests
    if len(parts) == 1:
        return parts[0], digests
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.intp)), digests


@dataclass
class PackResult:
    """What ``pack`` wrote: the manifest, where (or the bytes), sizes and time."""

    manifest: Manifest
    path: Path | None
    data: bytes | None
    patch_bytes: int
    seconds: float
    bytes_read: int
    ulp_hist: dict[int, int] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.manifest.tensors if t.action == "delta")

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.manifest.tensors if t.action != "remove")


class PackKernel:
    """Stream kernel: code one span (sources: base and finetuned, or finetuned alone)."""

    def __init__(self, ulp_hist: bool = False):
        self.ulp_hist = ulp_hist
        # the C kernels where they were built (no start-up cost), else None: numpy
        self.compiled = compiled.KERNELS

    def compute(self, chunk: stream.Chunk):
        is_float = chunk.item.infos[-1].dtype in dtypes.FLOAT_CODES
        new = chunk.raw[-1]
        old = chunk.raw[0] if len(chunk.raw) == 2 else None
        scan = None
        if old is None:
            idx, digests = None, (None, chunk_digest(new))
        elif self.compiled is not None and new.itemsize == 2 and new.size < 1 << 32:
            # bf16 / fp16 (the common case): changes found and coded in one pass per block
            scan = codec.SparseScan(self.compiled, new.size, is_float)
            idx, digests = changes_and_digests(old, new, scan=scan)
        else:
            # the positions live until this chunk is coded: one array per thread, reused
            idx, digests = changes_and_digests(old, new, codec.scratch("positions", new.size, np.int64))
        enc, changed, data = codec.encode_chunk(old, new, is_float, changed=idx, compiled=self.compiled, scan=scan)
        hist = None
        if self.ulp_hist and old is not None and changed:
            if idx is None:
                idx = np.flatnonzero(old != new)
            vals, counts = np.unique(codec.ulp_delta(old[idx], new[idx], is_float), return_counts=True)
            hist = dict(zip(vals.tolist(), counts.tolist()))
        return None, (enc, changed, data, digests, hist)

    def merge(self, acc, partial):
        return None


def pack(base, finetuned, out: str | os.PathLike | None = None, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
         workers: int = 2, files: bool = True, progress: bool = False, ulp_hist: bool = False,
         shard_bytes: int | None = DEFAULT_SHARD_BYTES, parallel: str = "auto") -> PackResult:
    """Write the lossless patch that turns ``base`` into ``finetuned``.

    Args:
        base: Checkpoint (HF folder, file) or ``{name: tensor}`` state dict.
        finetuned: Same kinds; every stored tensor is reproduced bit for bit by ``apply``.
        out: Patch file path; None returns the patch as bytes (``PackResult.data``).
        chunk_elements: Elements per coded span (memory and parallelism unit).
        workers: Coding processes or threads.
        files: Copy the finetuned folder's non-weight files (config, tokenizer) into the patch.
        progress: Progress bar with bytes/s and ETA on stderr.
        ulp_hist: Also collect the histogram of changes in units in the last place (for the
            order-0 bound in ``bench/``).
        shard_bytes: A patch with more coded data than this is written as a folder of shards
            at ``out`` (an index and ``patch-0000k-of-0000N.rlpatch``); None: always one file.
        parallel: "processes" (forked workers, one core each), "threads" (one GIL: faster only
            for small models) or "auto" (processes from ``AUTO_PROCESS_BYTES`` of checkpoint up,
            for checkpoints on disk). The patch is the same byte for byte either way.

    Returns:
        PackResult

    Example:
        >>> rlsparse.delta.pack("base/", "rl-step-30/", "step30.rlpatch")
    """
    from rlsparse.io.atomic import check_writable
    from rlsparse.report.progress import progress_bar

    t0 = time.perf_counter()
    if out is not None:
        check_writable(out, folder_output=True)
    bsrc, fsrc = open_source(base), open_source(finetuned)
    try:
        entries, items = _plan(bsrc, fsrc)
        kernel = PackKernel(ulp_hist)
        writer = PatchWriter(out, shard_bytes)
        hist: dict[int, int] = {}
        try:
            total = sum(stream.span_bytes(items, s) for s in stream.split(items, chunk_elements))
            with progress_bar(total, "pack", enabled=progress) as advance:
                sink = _Sink(entries, writer, hist)
                if isinstance(bsrc, CheckpointSource) and isinstance(fsrc, CheckpointSource):
                    if use_processes(parallel, workers, total):
                        res = forked.run_forked(items, kernel, chunk_elements=chunk_elements, workers=workers,
                                                sink=sink, advance=advance, mapped=True, label="pack",
                                                spool_dir=Path(out).parent if out is not None else None)
                    else:
                        res = stream.run(items, kernel, chunk_elements=chunk_elements, workers=workers,
                                         sink=sink, advance=advance, mapped=True)
                    bytes_read = res.bytes_read
                else:
                    bytes_read = run_in_memory(items, kernel, chunk_elements, workers, sink,
                                               {"base": bsrc, "finetuned": fsrc})
            file_entries = _add_files(fsrc, writer) if files else []
            manifest = Manifest(
                tensors=entries, files=file_entries, base={"source": str(bsrc.label), "tensors": len(bsrc.tensors)},
                finetuned={"source": str(fsrc.label), "tensors": len(fsrc.tensors)}, tool=_version())
            manifest.stats = {"changed": sum(e.changed for e in entries if e.action == "delta"),
                              "numel": sum(e.numel for e in entries if e.action != "remove"),
                              "coded_bytes": sum(e.nbytes for e in entries),
                              "finetuned_bytes": sum(e.numel * dtypes.itemsize(e.dtype) for e in entries
                                                     if e.action != "remove")}
            data = writer.close(manifest)
        except BaseException:
            writer.abort()
            raise
    finally:
        bsrc.close()
        fsrc.close()
    size = len(data) if data is not None else _size_on_disk(Path(out))
    return PackResult(manifest, Path(out) if out is not None else None, data, size, time.perf_counter() - t0,
                      bytes_read, hist)


class _Sink:
    """Receives coded spans in order: appends bytes to the patch, records chunks and hashes."""

    def __init__(self, entries: list[TensorEntry], writer: PatchWriter, hist: dict[int, int]):
        self._by_item = [e for e in entries if e.action != "remove"]
        self._writer = writer
        self._hist = hist
        self._hashers = None

    def __call__(self, span: stream.Span, piece) -> None:
        enc, changed, data, (dig_old, dig_new), hist = piece
        e = self._by_item[span.item]
        if span.first:
            e.offset = self._writer.offset
            self._hashers = (new_hasher(), new_hasher())
            if span.count:
                e.chunk_elements = span.count
        e.chunks.append([enc, len(data)])
        e.changed += changed
        self._writer.write(data)
        if dig_old is not None:
            self._hashers[0].update(dig_old)
        self._hashers[1].update(dig_new)
        if hist:
            for k, v in hist.items():
                self._hist[k] = self._hist.get(k, 0) + v
        if span.last:
            if e.action == "delta":
                e.base_hash = self._hashers[0].hexdigest()
            e.hash = self._hashers[1].hexdigest()


def _plan(bsrc, fsrc) -> tuple[list[TensorEntry], list[stream.Item]]:
    entries: list[TensorEntry] = []
    items: list[stream.Item] = []
    for name, f in fsrc.tensors.items():
        b = bsrc.tensors.get(name)
        base = dict(base_dtype=b.dtype, base_shape=list(b.shape)) if b is not None else {}
        if b is not None and b.dtype == f.dtype and b.shape == f.shape:
            entries.append(TensorEntry(name, "delta", f.dtype, list(f.shape), **base))
            items.append(stream.Item(name, (_info(bsrc, name), _info(fsrc, name))))
        else:
            entries.append(TensorEntry(name, "whole", f.dtype, list(f.shape), **base))
            items.append(stream.Item(name, (_info(fsrc, name),)))
    for name, b in bsrc.tensors.items():
        if name not in fsrc.tensors:
            entries.append(TensorEntry(name, "remove", base_dtype=b.dtype, base_shape=list(b.shape)))
    return entries, items


def _info(src, name: str) -> TensorInfo:
    if isinstance(src, CheckpointSource):
        return src._infos[name]
    t = src.tensors[name]
    return TensorInfo(name, t.dtype, t.shape, Path(f"<{src.label}>"), None, t.numel * dtypes.itemsize(t.dtype))


def run_in_memory(items, kernel, chunk_elements: int, workers: int, sink, sources: dict[str, StateDictSource]) -> int:
    """The engine's loop for tensors already in memory: same spans, same kernel, same sink order."""
    spans = stream.split(items, chunk_elements)
    base, fin = sources.get("base"), sources["finetuned"]

    def compute(s: stream.Span):
        it = items[s.item]
        srcs = (base, fin) if len(it.infos) == 2 else (fin,)
        raws = tuple(src.read(it.name, s.start, s.count) for src in srcs)
        return kernel.compute(stream.Chunk(it, s, raws, (None,) * len(raws)))

    nbytes = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rlsparse-delta") as pool:
        for s, (_, piece) in zip(spans, pool.map(compute, spans)):
            sink(s, piece)
            nbytes += stream.span_bytes(items, s)
    return nbytes


def _add_files(fsrc, writer: PatchWriter) -> list[FileEntry]:
    import zstandard

    out = []
    for path in fsrc.files():
        data = path.read_bytes()
        h = new_hasher()
        h.update(data)
        packed = zstandard.ZstdCompressor(level=10).compress(data)
        out.append(FileEntry(path.name, len(data), h.hexdigest(), len(packed), writer.offset))
        writer.write(packed)
    return out


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _version() -> str:
    from rlsparse import __version__

    return f"rlsparse {__version__}"
