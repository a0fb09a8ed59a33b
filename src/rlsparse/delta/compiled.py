"""Compiled (numba) coding of sparse chunks, for packs and applies with many changed elements.

``codec.decode_chunk`` rebuilds a ``SPARSE_DELTA`` chunk in ~15 numpy passes over its changed
elements (symbols to values, raw bits, positions, the ordered view and back). Where a patch
changes tens of millions of elements (dense updates, SFT) those passes are most of apply's CPU;
:func:`sparse_delta_apply` does the same work in one compiled pass per chunk. It writes the very
same bits (tested against the numpy decoder) and refuses positions outside the chunk.
:func:`sparse_delta_symbols` is the encoder's counterpart: the symbols, raw bits and histograms
of both sparse streams (gaps, ULP differences) and the byte-plane histograms of the new bits,
in one pass instead of ~20 numpy passes; ``codec.encode_chunk`` codes the very same bytes
from them (tested against numpy).

Importing this module imports numba, and the first call of each function loads it from numba's
cache (compiles it, the first time on a machine): ~0.4 s of CPU per process, more than a whole
apply of a 269 MB checkpoint. So ``apply`` imports it only for patches with many changed
elements (``apply.COMPILED_FROM``) and ``pack`` only for updates that a sample predicts to
change many (``pack.COMPILED_PACK_FROM``), and both load it (:func:`warm`, :func:`warm_encoder`) before
their workers fork.
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
        # (written out for both streams: a shared helper, even inlined, measured 5-10% slower)
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


@numba.njit(cache=True, nogil=True, inline="always")
def _put_symbol(v, i, bitlen16, sym_out, counts, where, nbits, extra, big):
    """Value ``v`` (the ``i``-th of its stream) as ``codec._symbolize`` codes it: below 16 its own
    symbol; else (bit length, next two bits) with the rest raw, recorded at ``big`` of the raw-bit
    arrays. Adds to the histogram; returns the new raw-bit count."""
    if v < 16:
        sym_out[i] = v
        counts[v] += 1
        return big
    length = np.int64(bitlen16[v]) if v < 65536 else 16 + np.int64(bitlen16[v >> 16])
    k = length - 3
    sym = 16 + (length - 5) * 4 + ((v >> k) & 3)
    sym_out[i] = sym
    counts[sym] += 1
    where[big] = i
    nbits[big] = k
    extra[big] = v & ((np.int64(1) << k) - 1)
    return big + 1


@numba.njit(cache=True, nogil=True)
def sparse_delta_symbols(old, new, idx, bitlen16, width, is_float, gsym, gwhere, gnbits, gextra, gcounts,
                         dsym, dwhere, dnbits, dextra, dcounts, values, planes):
    """The symbols of a sparse chunk's two streams, as ``codec._symbolize`` makes them, in one
    pass over its changed positions ``idx`` (ascending): the gaps between them and the zigzagged
    ULP differences of ``new`` against ``old`` (unsigned bits, ``width`` <= 32).

    Per stream: the symbol of every value (``*sym``), and for the values with raw bits (symbols
    >= 16) their positions, raw-bit counts and raw bits, packed at the front of ``*where``,
    ``*nbits``, ``*extra``; adds to the stream's histogram (``*counts``, zeroed by the caller).
    Copies the new bits into ``values`` and counts their byte planes' histograms into
    ``planes`` (``width // 8`` rows of 256, zeroed). Returns how many values of each stream
    have raw bits."""
    mask = (np.int64(1) << width) - 1
    top = np.int64(1) << (width - 1)
    nplanes = width // 8
    prev = np.int64(-1)
    gbig = 0
    dbig = 0
    for i in range(idx.size):
        p = np.int64(idx[i])
        v = p - prev - 1
        prev = p
        gbig = _put_symbol(v, i, bitlen16, gsym, gcounts, gwhere, gnbits, gextra, gbig)
        a = np.int64(old[p])
        b = np.int64(new[p])
        values[i] = new[p]
        for j in range(nplanes):
            planes[j, (b >> (8 * j)) & 255] += 1
        if is_float:  # onto the ordered line: negative flips every bit, else the sign bit is set
            a ^= mask if a & top else top
            b ^= mask if b & top else top
        d = (b - a) & mask
        if d & top:  # zigzag of the difference as a signed width-bit integer
            v = ((d << 1) ^ mask) & mask
        else:
            v = d << 1
        dbig = _put_symbol(v, i, bitlen16, dsym, dcounts, dwhere, dnbits, dextra, dbig)
    return gbig, dbig


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


def warm_encoder(dtypes) -> None:
    """Compile (or load from numba's cache) :func:`sparse_delta_symbols` for these unsigned
    dtypes now, for read-only arrays (what ``pack`` codes: views of page-cache maps), before
    any worker forks (a writable array, from a file that cannot be mapped, loads its own)."""
    from rlsparse.delta import codec

    idx = np.zeros(1, dtype=np.intp)
    for dt in dtypes:
        bits = np.zeros(2, dtype=dt)
        bits.flags.writeable = False
        streams = [(np.empty(1, np.uint8), np.empty(1, np.intp), np.empty(1, np.uint8), np.empty(1, np.uint32),
                    np.zeros(256, np.int64)) for _ in range(2)]
        sparse_delta_symbols(bits, bits, idx, codec._BITLEN16, 8 * np.dtype(dt).itemsize, True, *streams[0],
                             *streams[1], np.empty(1, dtype=dt), np.zeros((np.dtype(dt).itemsize, 256), np.int64))
