"""Direct (O_DIRECT) reads of cold ranges return the same bits as page-cache reads, at any offset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.memory import aligned_empty
from rlsparse.io.reader import TensorReader, direct_size


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages must be clean before the cache can drop them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs Linux preadv2 flags")
def test_direct_reads_equal_cached_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    # odd sizes so tensors start at offsets that are not page (or even 8-byte) aligned
    tensors = {f"t{i}": torch.randn(1000 + 37 * i, generator=g).to(torch.bfloat16) for i in range(5)}
    tensors["f32"] = torch.randn(3001, generator=g)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    with TensorReader() as cached:
        expected = {n: [cached.read(ck.tensors[n], s, c).copy() for s, c in ((0, 999), (3, 500), (517, 480))]
                    for n in tensors}
    _evict(tmp_path / "m.safetensors")
    with TensorReader(direct=True) as direct:
        for name in tensors:
            info = ck.tensors[name]
            for (s, c), exp in zip(((0, 999), (3, 500), (517, 480)), expected[name]):
                buf = aligned_empty(direct_size(c * 4))
                assert np.array_equal(direct.read(info, s, c, buf), exp), (name, s)
        if _direct_supported(tmp_path / "m.safetensors"):
            assert direct.direct_bytes > 0  # the cold file really went around the page cache
    # a buffer that cannot take a direct read (unaligned) falls back to the page cache, same bits
    _evict(tmp_path / "m.safetensors")
    with TensorReader(direct=True) as direct:
        raw = np.empty(direct_size(999 * 2) + 1, np.uint8)[1:]
        assert np.array_equal(direct.read(ck.tensors["t0"], 0, 999, raw), expected["t0"][0])


def test_stream_with_direct_reads_equals_page_cache_run(tiny_pair):
    from rlsparse.diff import stream
    from rlsparse.diff.engine import items_of, kernel_for
    from rlsparse.diff.plan import plan

    base, ft = tiny_pair
    items = items_of(plan(Checkpoint.open(base), Checkpoint.open(ft)))
    kernel = kernel_for([0.0, 1e-5], 1e-5, None)
    runs = []
    for direct in (False, True):
        for f in [*base.glob("*.safetensors"), *ft.glob("*.safetensors")]:
            _evict(f)
        pieces = []
        out = stream.run(items, kernel, chunk_elements=256, direct=direct,
                         sink=lambda s, p: pieces.append((s.item, s.start, p.tobytes())))
        runs.append((out, pieces))
    (a, pa), (b, pb) = runs
    assert pa == pb and sorted(a.partials) == sorted(b.partials)
    for i in a.partials:
        assert np.array_equal(a.partials[i].changed, b.partials[i].changed)
        assert np.array_equal(a.partials[i].hist, b.partials[i].hist)
