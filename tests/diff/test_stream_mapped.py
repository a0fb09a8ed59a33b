"""The engine's mapped mode (read-only views of the page cache) gives kernels the very bits the
copying mode gives, span for span, and the views cannot be written through."""

from __future__ import annotations

import hashlib

import numpy as np

from rlsparse.diff import stream
from rlsparse.io.checkpoint import Checkpoint


class _Record:
    """Digest of every source's bits per span; notes whether any view was writeable."""

    def compute(self, chunk: stream.Chunk):
        digests = tuple(hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for r in chunk.raw)
        return None, (digests, any(r.flags.writeable for r in chunk.raw))

    def merge(self, acc, partial):
        return None


def _run(items, mapped: bool) -> list:
    got = []
    stream.run(items, _Record(), chunk_elements=64, workers=2, mapped=mapped, sink=lambda s, p: got.append((s, p)))
    return got


def test_mapped_views_equal_copies(tiny_pair):
    base, ft = (Checkpoint.open(p) for p in tiny_pair)
    items = [stream.Item(n, (base.tensors[n], ft.tensors[n])) for n in sorted(ft.tensors)]
    copied, mapped = _run(items, False), _run(items, True)
    assert len(copied) == len(stream.split(items, 64)) > len(items)
    assert [(s, p[0]) for s, p in copied] == [(s, p[0]) for s, p in mapped]
    assert all(p[1] for _, p in copied) and not any(p[1] for _, p in mapped)


def test_files_that_cannot_be_mapped_are_copied_instead(tiny_pair, monkeypatch):
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what a file system without maps answers

    base, ft = (Checkpoint.open(p) for p in tiny_pair)
    items = [stream.Item(n, (base.tensors[n], ft.tensors[n])) for n in sorted(ft.tensors)]
    copied = _run(items, False)
    monkeypatch.setattr(mmap, "mmap", refuse)
    fallback = _run(items, True)
    assert [(s, p) for s, p in copied] == [(s, p) for s, p in fallback]  # writeable copies, same bits
