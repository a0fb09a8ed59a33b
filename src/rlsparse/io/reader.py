"""Chunked reading of stored tensors: one shard open at a time, bounded buffers.

Reads go into caller-owned buffers with ``os.preadv`` (no memory map stays in our resident set,
the GIL is released during the copy). ``.bin`` files are memory-mapped by torch and copied out
chunk by chunk.

Direct reads (``TensorReader(direct=True)``): a range that is not in the page cache is read
with ``O_DIRECT`` straight into the caller's page-aligned buffer (the disk's DMA fills it: no
page-cache copy costing the CPU the compute threads need); a range that is cached is still
read from the cache (``RWF_NOWAIT`` tells which without waiting). Where the filesystem or the
platform refuses ``O_DIRECT``, reads fall back to the page cache.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np

from rlsparse.errors import CheckpointError
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import TensorInfo, load_bin
from rlsparse.io.memory import PAGE


DIRECT_ALIGN = PAGE  # O_DIRECT offset, length and address alignment
_DIRECT_OK = hasattr(os, "O_DIRECT") and hasattr(os, "RWF_NOWAIT")


class TensorReader:
    """Reads element ranges of stored tensors as raw bits (unsigned ints of the dtype's width).

    Keeps at most one file (or one ``.bin`` state dict) open. Not thread-safe: use one reader
    per thread.

    Example:
        >>> with TensorReader() as r:
        ...     bits = r.read(info, start=0, count=1024)
    """

    # Ask the kernel to read this far ahead of us asynchronously (cold-cache runs): the default
    # readahead window (128-256 KiB) leaves the disk idle while chunks are being compared.
    PREFETCH_BYTES = 64 << 20

    def __init__(self, direct: bool = False) -> None:
        self._path: Path | None = None
        self._fd: int | None = None
        self._dfd: int | None = None  # the same file opened with O_DIRECT (direct mode)
        self._bin: dict | None = None
        self._prefetched = 0
        self.direct = direct and _DIRECT_OK
        self.direct_bytes = 0  # bytes read with O_DIRECT (for benchmarks and tests)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._dfd is not None:
            os.close(self._dfd)
        self._fd = self._dfd = None
        self._bin = None
        self._path = None
        self._prefetched = 0

    def _switch(self, path: Path, binary: bool) -> None:
        if self._path == path:
            return
        self.close()
        if binary:
            self._bin = load_bin(path)
        else:
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if self.direct:
                try:
                    self._dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # the filesystem refuses O_DIRECT (tmpfs, some FUSE): page cache
                    self._dfd = None
        self._path = path

    def read(self, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, start + count)`` of the flattened tensor, as unsigned-int bits.

        ``out`` (uint8, at least ``count * itemsize`` bytes) is filled and a view of it returned;
        in direct mode give ``direct_size(count * itemsize)`` bytes, page-aligned
        (``io.memory.aligned_empty``), and use the returned view: it may start a little into ``out``.
        """
        size = dtypes.itemsize(info.dtype)
        nbytes = count * size
        if out is None:
            out = np.empty(nbytes, dtype=np.uint8)
        buf = out[:nbytes]
        if info.offset is None:
            self._switch(info.file, binary=True)
            t = self._bin.get(info.name)
            if t is None:
                raise CheckpointError(f"{info.file}: tensor {info.name!r} disappeared while reading")
            flat = t.reshape(-1)[start:start + count]
            buf.view(dtypes.uint_view(info.dtype))[:] = flat.view(_int_dtype(size)).numpy().view(dtypes.uint_view(info.dtype))
        else:
            self._switch(info.file, binary=False)
            pos = info.offset + start * size
            if self._dfd is not None and nbytes and self._cold(pos, buf):
                view = self._read_direct(info, pos, nbytes, out)
                if view is not None:
                    return view.view(dtypes.uint_view(info.dtype))
            self._prefetch(pos + nbytes)
            got = 0
            mv = memoryview(buf)
            while got < nbytes:
                n = os.preadv(self._fd, [mv[got:]], pos + got)
                if n <= 0:
                    raise CheckpointError(
                        f"{info.file}: ended while reading {info.name!r} (got {got} of {nbytes} bytes); "
                        "the file is truncated or changed during the run"
                    )
                got += n
        return buf.view(dtypes.uint_view(info.dtype))

    def _cold(self, pos: int, buf: np.ndarray) -> bool:
        """Whether the range starting at ``pos`` is not in the page cache: a non-blocking read of
        its first bytes (into ``buf``, overwritten later) fails or comes back short."""
        probe = memoryview(buf)[:min(buf.nbytes, 4096)]
        try:
            return os.preadv(self._fd, [probe], pos, os.RWF_NOWAIT) < len(probe)
        except BlockingIOError:
            return True
        except OSError:  # RWF_NOWAIT unsupported here: decide by nothing, read through the cache
            return False

    def _read_direct(self, info: TensorInfo, pos: int, nbytes: int, out: np.ndarray) -> np.ndarray | None:
        """Read ``[pos, pos + nbytes)`` with O_DIRECT into ``out``: the enclosing aligned range,
        returning the view of the bytes asked for; None (caller reads buffered) if ``out`` is
        not aligned or large enough, or the filesystem refuses the read."""
        first = pos - pos % DIRECT_ALIGN
        skip = pos - first
        length = _round_up(skip + nbytes, DIRECT_ALIGN)
        if out.nbytes < length or out.ctypes.data % DIRECT_ALIGN:
            return None
        mv = memoryview(out)
        got = 0
        try:
            while got < skip + nbytes:
                n = os.preadv(self._dfd, [mv[got:length]], first + got)
                if n <= 0:
                    raise CheckpointError(
                        f"{info.file}: ended while reading {info.name!r} (got {max(got - skip, 0)} of {nbytes} bytes); "
                        "the file is truncated or changed during the run")
                got += n
                if got % DIRECT_ALIGN and got < skip + nbytes:
                    break  # a short read off the alignment: finish through the page cache
        except OSError:
            os.close(self._dfd)
            self._dfd = None  # refused (alignment rules of this filesystem): page cache from now on
            return None
        if got < skip + nbytes:
            return None
        self.direct_bytes += nbytes
        return out[skip:skip + nbytes]

    def _prefetch(self, end: int) -> None:
        if not self.PREFETCH_BYTES or not hasattr(os, "posix_fadvise") or end + self.PREFETCH_BYTES // 2 < self._prefetched:
            return
        start = max(end, self._prefetched)
        os.posix_fadvise(self._fd, start, self.PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
        self._prefetched = start + self.PREFETCH_BYTES

    def read_tensor(self, info: TensorInfo):
        """The whole tensor as a torch tensor of its stored dtype (for small/2-D analyses)."""
        import torch

        bits = self.read(info, 0, info.numel)
        t = torch.from_numpy(bits.copy()).view(dtypes.torch_dtype(info.dtype))
        return t.reshape(info.shape)


class MappedFiles:
    """Read-only views of stored tensors straight from the page cache (memory maps, no copy).

    For kernels that only read: a view costs page-table entries instead of a copy (measured on
    the 269 MB SmolLM2 pair: reading and comparing both files took 0.15-0.21 s of CPU with
    ``preadv`` into a buffer, 0.085 s through maps). ``release`` drops a range's pages from this
    process's resident set again (``MADV_DONTNEED`` on a file map only unmaps; the page cache
    keeps them), so memory stays bounded by the ranges in flight. Thread-safe.
    Safetensors files only; a file must not shrink while mapped (that would be SIGBUS).
    """

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray] | None] = {}
        self._lock = threading.Lock()

    def _map(self, path: Path) -> tuple[mmap.mmap, np.ndarray] | None:
        with self._lock:
            if path not in self._maps:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
                try:
                    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                    self._maps[path] = (m, np.frombuffer(m, dtype=np.uint8))
                except (OSError, ValueError):  # a file system without maps, an empty file: caller copies
                    self._maps[path] = None
                finally:
                    os.close(fd)
            return self._maps[path]

    def view(self, info: TensorInfo, start: int, count: int) -> np.ndarray | None:
        """Elements ``[start, start + count)`` as unsigned-int bits: a read-only view (None when
        the file cannot be mapped: read it instead)."""
        size = dtypes.itemsize(info.dtype)
        got = self._map(info.file)
        if got is None:
            return None
        m, arr = got
        pos = info.offset + start * size
        if pos + count * size > len(m):
            raise CheckpointError(f"{info.file}: ended before {info.name!r} (the file is truncated or changed)")
        if hasattr(m, "madvise"):  # start reading it in now on a cold cache
            first = pos - pos % mmap.PAGESIZE
            m.madvise(mmap.MADV_WILLNEED, first, pos + count * size - first)
        return arr[pos:pos + count * size].view(dtypes.uint_view(info.dtype))

    def release(self, info: TensorInfo, start: int, count: int) -> None:
        """Drop the pages of a range viewed before from the resident set (they stay cached)."""
        got = self._map(info.file)
        if got is None:
            return
        m = got[0]
        size = dtypes.itemsize(info.dtype)
        pos = info.offset + start * size
        first = pos - pos % mmap.PAGESIZE
        if hasattr(m, "madvise") and count:
            m.madvise(mmap.MADV_DONTNEED, first, pos + count * size - first)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for m, arr in filter(None, maps.values()):
            del arr
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere: the map goes with it
                pass


def direct_size(nbytes: int) -> int:
    """Buffer bytes that hold ``nbytes`` read directly from any offset (aligned head and tail)."""
    return _round_up(nbytes, DIRECT_ALIGN) + 2 * DIRECT_ALIGN


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _int_dtype(size: int):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
