"""The engine's inline mode (every span read and computed on the calling thread, as forked
workers run it) gives the kernel the same bits and the sink the same pieces, in the same order,
as the threaded loop; merged partials and byte counts agree too."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from rlsparse.diff import stream
from rlsparse.io.checkpoint import Checkpoint


class _Record:
    """Digest of every source's bits per span, the thread that computed it, and a count to merge."""

    def compute(self, chunk: stream.Chunk):
        digests = tuple(hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for r in chunk.raw)
        return chunk.span.count, (digests, threading.get_ident())

    def merge(self, acc, partial):
        return acc + partial


def _run(items, **kwargs) -> tuple[stream.StreamOutput, list]:
    got = []
    out = stream.run(items, _Record(), chunk_elements=64, workers=2, sink=lambda s, p: got.append((s, p)), **kwargs)
    return out, got


@pytest.mark.parametrize("mapped", [False, True])
def test_inline_equals_threaded(tiny_pair, mapped):
    base, ft = (Checkpoint.open(p) for p in tiny_pair)
    items = [stream.Item(n, (base.tensors[n], ft.tensors[n])) for n in sorted(ft.tensors)]
    threaded, t_pieces = _run(items, mapped=mapped)
    inline, i_pieces = _run(items, mapped=mapped, inline=True)
    assert len(i_pieces) == len(stream.split(items, 64)) > len(items)
    assert [(s, p[0]) for s, p in i_pieces] == [(s, p[0]) for s, p in t_pieces]
    assert {p[1] for _, p in i_pieces} == {threading.get_ident()}  # all on the caller's thread
    assert threading.get_ident() not in {p[1] for _, p in t_pieces}  # the threaded loop uses workers
    assert inline.partials == threaded.partials == {i: it.numel for i, it in enumerate(items)}
    assert inline.bytes_read == threaded.bytes_read > 0
