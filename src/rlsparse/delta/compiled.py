"""A compiled decoder (numba) for sparse ULP-step chunks, for applies with many changed elements.

``codec.decode_chunk`` rebuilds a ``SPARSE_DELTA`` chunk in ~15 numpy passes over its changed
elements (symbols to values, raw bits, positions, the ordered view and back). Where a patch
changes tens of millions of elements (dense updates, SFT) those passes are most of apply's CPU;
:func:`sparse_delta_apply` does the same work in one compiled pass per chunk. It writes the very
same bits (tested against the numpy decoder) and refuses positions outside the chunk.

Importing this module imports numba, and the first call loads the compiled function from
numba's cache (compiles it, the first time on a machine): ~0.4 s of CPU per process, more than
a whole apply of a 269 MB checkpoint. So ``apply`` imports it only for patches with many changed
elements (``apply.COMPILED_FROM``), and compiles it (:func:`warm`) before its workers fork.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _raw_bits(raw, pos, k):
    """k bits (little bit order) of ``raw`` from bit ``pos`` (int64 arithmetic: k <= 61)."""
    bits = np.int64(0)
    got = np.int64(0)
    while got < k:
        off = pos & 7
        take = min(8 - off, k - got)
        bits |= ((np.int64(raw[pos >> 3]) >> off) & ((np.int64(1) << take) - 1)) << got
        got += take
        pos += take
    return bits


@numba.njit(cache=True, nogil=True)
def sparse_delta_apply(old, gsym, graw, gstart, dsym, draw, dstart, sym_base, sym_nbits, width, is_float):
    """Write a SPARSE_DELTA chunk's new bits over ``old`` (its base bits, unsigned, ``width`` <= 32
    bits). ``gsym`` / ``dsym``: the symbols of the gaps between changed positions and of the
    zigzagged ULP differences; ``graw`` / ``draw``: their raw low bits; ``gstart`` / ``dstart``:
    the first bit of each raw-bit count's group (65 entries, int64). Returns False where a
    position falls outside the chunk (damaged data); ``old`` is then partly written."""
    n = old.size
    gcur = gstart.copy()
    dcur = dstart.copy()
    mask = (np.int64(1) << width) - 1
    top = np.int64(1) << (width - 1)
    low = top - 1
    pos = np.int64(-1)
    for i in range(gsym.size):
        # a symbol below 16 is its value; else its base and raw bits, read at its bit count's cursor
        s = gsym[i]
        gap = np.int64(s)
        if s >= 16:
            k = np.int64(sym_nbits[s])
            gap = np.int64(sym_base[s]) | _raw_bits(graw, gcur[k], k)
            gcur[k] += k
            if gap < 0 or gap >= n:
                return False
        pos += gap + 1
        if pos >= n:
            return False
        s = dsym[i]
        z = np.int64(s)
        if s >= 16:
            k = np.int64(sym_nbits[s])
            z = np.int64(sym_base[s]) | _raw_bits(draw, dcur[k], k)
            dcur[k] += k
        step = ((z >> 1) ^ -(z & 1)) & mask  # unzigzag, wrapped to the width
        x = np.int64(old[pos])
        if is_float:  # onto the ordered line (negative: every bit flipped; else the sign set), step, back
            if x >> (width - 1):
                x ^= low
            x ^= top
            x = (x + step) & mask
            x ^= top
            if x >> (width - 1):
                x ^= low
        else:
            x = (x + step) & mask
        old[pos] = x
    return True


def warm(dtypes) -> None:
    """Compile (or load from numba's cache) the decoder for these unsigned dtypes now, in this
    process, so that forked workers inherit it instead of each loading it again."""
    ro = np.zeros(0, dtype=np.uint8)
    ro.flags.writeable = False
    start = np.zeros(65, dtype=np.int64)
    from rlsparse.delta import codec

    for dt in dtypes:
        sparse_delta_apply(np.zeros(1, dtype=dt), ro, ro, start, ro, ro, start, codec._SYM_BASE, codec._SYM_NBITS,
                           8 * np.dtype(dt).itemsize, True)
