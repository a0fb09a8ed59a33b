"""``pack.changes_and_digests`` (compare and hash a block at a time) returns exactly what the
three separate passes return: the changed indices and both chunk digests, with the C kernel
(``changed_positions`` of ``compiled.KERNELS``) where it was built and with numpy."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsparse.delta import codec, compiled

pack = importlib.import_module("rlsparse.delta.pack")  # the module (``rlsparse.delta.pack`` is also the function)
KERNELS = ["numpy"] + (["C"] if compiled.KERNELS is not None else [])

WIDTHS = [np.uint8, np.uint16, np.uint32, np.uint64]


@settings(max_examples=80, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(0, 700), block=st.sampled_from([1, 7, 64, 200, 1 << 17]),
       density=st.sampled_from([0.0, 0.01, 0.3, 1.0]), kernel=st.sampled_from(KERNELS), seed=st.integers(0, 2**31 - 1))
def test_blocked_pass_equals_separate_passes(width, n, block, density, kernel, seed):
    rng = np.random.default_rng(seed)
    old = rng.integers(0, np.iinfo(width).max, size=n, dtype=width, endpoint=True)
    new = old.copy()
    where = rng.random(n) < density
    # a change in any bit of the element: the lowest, the highest or many
    new[where] ^= rng.integers(1, np.iinfo(width).max, size=int(where.sum()), dtype=width, endpoint=True)
    saved = pack._BLOCK_ELEMENTS, compiled.KERNELS
    pack._BLOCK_ELEMENTS = block  # block boundaries anywhere, including after every element
    if kernel == "numpy":
        compiled.KERNELS = None
    try:
        idx, (dig_old, dig_new) = pack.changes_and_digests(old, new)
    finally:
        pack._BLOCK_ELEMENTS, compiled.KERNELS = saved
    assert idx.dtype == np.intp and np.array_equal(idx, np.flatnonzero(old != new))
    assert (dig_old, dig_new) == (pack.chunk_digest(old), pack.chunk_digest(new))


def test_views_that_are_not_contiguous_are_hashed_as_their_elements():
    old = np.arange(1000, dtype=np.uint16)[::2]
    new = old.copy()
    new[[3, 400]] += 1
    idx, digests = pack.changes_and_digests(old, new)
    assert idx.tolist() == [3, 400]
    assert digests == (pack.chunk_digest(np.ascontiguousarray(old)), pack.chunk_digest(new))


@pytest.mark.skipif(compiled.KERNELS is None, reason="the C kernels are not built: python setup.py build_ext --inplace")
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), block=st.sampled_from([1, 7, 64, 200, 1 << 17]), density=st.sampled_from([0.0, 0.01, 0.3]),
       seed=st.integers(0, 2**31 - 1))
def test_blocked_pass_with_a_scan_hashes_and_counts_the_same(n, block, density, seed):
    # 2-byte chunks: each block goes to a SparseScan instead of the positions' finder
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    new = old.copy()
    where = rng.random(n) < density
    new[where] ^= rng.integers(1, 1 << 16, size=int(where.sum()), dtype=np.uint16)
    scan = codec.SparseScan(compiled.KERNELS, n, True)
    saved = pack._BLOCK_ELEMENTS
    pack._BLOCK_ELEMENTS = block
    try:
        idx, digests = pack.changes_and_digests(old, new, scan=scan)
    finally:
        pack._BLOCK_ELEMENTS = saved
    assert idx is None and scan.changed == int(where.sum())
    assert digests == (pack.chunk_digest(old), pack.chunk_digest(new))
    assert codec.encode_chunk(old, new, True, scan=scan) == codec.encode_chunk(old, new, True)
