"""Chunked reading of stored tensors: one shard open at a time, bounded buffers.

Reads go into caller-owned buffers with ``os.preadv`` (no memory map stays in our resident set,
the GIL is released during the copy). ``.bin`` files are memory-mapped by torch and copied out
chunk by chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rlsparse.errors import CheckpointError
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import TensorInfo, load_bin


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

    def __init__(self) -> None:
        self._path: Path | None = None
        self._fd: int | None = None
        self._bin: dict | None = None
        self._prefetched = 0

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
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
        self._path = path

    def read(self, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, start + count)`` of the flattened tensor, as unsigned-int bits.

        ``out`` (uint8, at least ``count * itemsize`` bytes) is filled and a view of it returned.
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


def aligned_empty(nbytes: int, alignment: int = 4096) -> np.ndarray:
    """An uninitialised uint8 buffer of ``nbytes`` whose start is ``alignment``-aligned (page
    alignment lets the kernel copy whole pages and allows ``O_DIRECT`` reads into it)."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    skip = (-raw.ctypes.data) % alignment
    return raw[skip:skip + nbytes]


def _int_dtype(size: int):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
