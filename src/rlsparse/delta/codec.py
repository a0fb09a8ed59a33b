"""Lossless coding of one chunk of a tensor's update: what changed, and how.

A chunk is a run of elements of one tensor, given as raw bits (unsigned ints of the dtype's
width) on both sides. Four encodings; the smallest is chosen per chunk from symbol histograms
(estimated sizes, so only the winner is actually coded):

- ``SPARSE_DELTA``: positions as gaps between changed indices, values as the difference of the
  two elements in the dtype's *ordered* integer view (for floats: sign-magnitude mapped onto a
  monotone integer line, so a change of k units in the last place is the integer k, across zero
  too: -0.0 and +0.0 are one apart).
- ``SPARSE_BITS``: gaps, and the new bits of the changed elements, one byte plane at a time.
- ``DENSE_DELTA``: the ordered-integer difference of every element (zero where unchanged).
- ``DENSE_BITS``: the new bits of every element, byte plane by byte plane (used alone when
  there is no base element: added or resized tensors).

Every integer sequence is coded by ``_encode_uints``: small values (< 16) are symbols of their
own, larger ones a symbol for (bit length, next two bits) plus the remaining low bits stored
raw. Byte planes are coded as symbols directly. All maps are bijections on bits, so NaN
payloads and signed zeros survive. How a stream of symbols is entropy-coded is what the patch's
schema version says:

- version 1: an order-0 ANS coder (``constriction``) whose model is the stream's own symbol
  histogram, stored in front. Within 1-2% of the order-0 entropy, but ~33 ns per symbol to
  decode with the GIL held.
- version 2 (written now): zstd (``zstandard``, level 1: its Huffman coder for literals, which
  releases the GIL), over the symbols packed two per byte when all are below 16, else one per
  byte. ~3-5% bigger symbol streams, 10-20x faster to code. Where two encodings of a chunk are
  estimated within ``_TRY_RATIO`` of each other, both are coded and the smaller is kept
  (Huffman codes skewed streams, such as the mostly-zero dense ULP differences, far above their
  entropy, which the estimate does not see).
"""

from __future__ import annotations

import threading

import numpy as np

from rlsparse.errors import PatchError, require

SAME, SPARSE_DELTA, SPARSE_BITS, DENSE_DELTA, DENSE_BITS = range(5)
ENCODING_NAMES = {SAME: "same", SPARSE_DELTA: "sparse-delta", SPARSE_BITS: "sparse-bits",
                  DENSE_DELTA: "dense-delta", DENSE_BITS: "dense-bits"}
_DIRECT = 16  # values below this are symbols of their own
_LAZY_MEAN_SYMBOL = 2.0  # decode with constriction's lazy model up to this mean symbol
_ALPHABET = 256
CODER_VERSION = 2  # the schema version whose symbol coder ``encode_chunk`` uses by default
_ZSTD_LEVEL = 1  # Huffman-coded literals either way; level 3 was 0.1% smaller on a real pair's streams, slower
_TRY_RATIO = 1.25  # version 2: code every candidate estimated within this factor of the best
_SAME, _NIBBLES, _BYTES = range(3)  # version 2 symbol-stream modes
_local = threading.local()
_BITLEN16 = np.zeros(1 << 16, dtype=np.int64)
_BITLEN16[1:] = np.floor(np.log2(np.arange(1, 1 << 16))).astype(np.int64) + 1
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def scratch(name: str, size: int, dtype) -> np.ndarray:
    """``size`` elements of ``dtype`` from an array of this thread's that is reused call after
    call (uninitialised): the encoder's per-chunk arrays (a few MB of a dense update's chunk),
    allocated afresh, cost their page faults again for every chunk (~4% of a dense pack's CPU).
    The array stays valid until the next call with the same name on this thread."""
    bufs = _local.__dict__.setdefault("scratch", {})
    got = bufs.get(name)
    if got is None or got.size < size or got.dtype != dtype:
        got = bufs[name] = np.empty(size, dtype)
    return got[:size]


def _constriction():
    return require("constriction", "delta")


def _zstd():
    """(compressor, decompressor) of this thread (zstd contexts are not thread-safe)."""
    got = getattr(_local, "zstd", None)
    if got is None:
        zstandard = require("zstandard", "delta")
        got = _local.zstd = (zstandard.ZstdCompressor(level=_ZSTD_LEVEL), zstandard.ZstdDecompressor())
    return got


# ---------------------------------------------------------------- ordered integer view

def to_ordered(bits: np.ndarray, is_float: bool) -> np.ndarray:
    """Map float bits onto a monotone unsigned integer line (a bijection); other dtypes unchanged."""
    if not is_float:
        return bits
    width = bits.dtype.itemsize * 8
    t = bits.dtype.type
    sign = bits >> t(width - 1)
    # positive: set the sign bit; negative: flip every bit
    return bits ^ ((sign * t((1 << (width - 1)) - 1)) | t(1 << (width - 1)))


def from_ordered(keys: np.ndarray, is_float: bool) -> np.ndarray:
    """Inverse of :func:`to_ordered`."""
    if not is_float:
        return keys
    width = keys.dtype.itemsize * 8
    t = keys.dtype.type
    positive = keys >> t(width - 1)
    return keys ^ (((t(1) - positive) * t((1 << (width - 1)) - 1)) | t(1 << (width - 1)))


def zigzag(d: np.ndarray) -> np.ndarray:
    """Wrapped difference (unsigned) -> small unsigned for small magnitudes of either sign."""
    width = d.dtype.itemsize * 8
    s = d.view(_INT[d.dtype.itemsize])
    return ((s << s.dtype.type(1)) ^ (s >> s.dtype.type(width - 1))).view(d.dtype)


def unzigzag(z: np.ndarray) -> np.ndarray:
    t = z.dtype.type
    return (z >> t(1)) ^ (t(0) - (z & t(1)))


def ulp_delta(old: np.ndarray, new: np.ndarray, is_float: bool) -> np.ndarray:
    """Zigzagged difference new - old in the ordered integer view (|d| in units in the last place)."""
    with np.errstate(over="ignore"):
        return zigzag(to_ordered(new, is_float) - to_ordered(old, is_float))


def apply_ulp_delta(old: np.ndarray, z: np.ndarray, is_float: bool) -> np.ndarray:
    with np.errstate(over="ignore"):
        return from_ordered(to_ordered(old, is_float) + unzigzag(z), is_float)


# ---------------------------------------------------------------- symbols

def _bit_length(v: np.ndarray) -> np.ndarray:
    if v.dtype.itemsize <= 2:
        return _BITLEN16[v]
    top = int(v.max(initial=0))
    if top < 1 << 16:
        return _BITLEN16[v.astype(np.uint16)]
    if top < 1 << 53:
        return np.frexp(v.astype(np.float64))[1].astype(np.int64)  # exact below 2**53
    out = np.zeros(v.shape, dtype=np.int64)
    x = v.astype(np.uint64)
    for s in (32, 16, 8, 4, 2, 1):
        m = (x >> np.uint64(s)) != 0
        x = np.where(m, x >> np.uint64(s), x)
        out += m * s
    return out + (x != 0)


def _symbol_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(symbol, raw-bit count) of every 16-bit value; (base value, raw-bit count) of every symbol."""
    v = np.arange(1 << 16, dtype=np.int64)
    length = _BITLEN16
    big = length > 4
    nbits = np.where(big, length - 3, 0)
    sym = np.where(big, _DIRECT + (length - 5) * 4 + ((v >> nbits) & 3), v)
    q = np.arange(_ALPHABET, dtype=np.int64) - _DIRECT
    sym_nbits = np.where(q >= 0, q // 4 + 2, 0)
    sym_base = np.where(q >= 0, (4 | (q & 3)).astype(np.uint64) << sym_nbits.astype(np.uint64),
                        np.arange(_ALPHABET, dtype=np.uint64))
    return sym.astype(np.uint8), nbits.astype(np.uint8), sym_base, sym_nbits.astype(np.uint8)


_SYM16, _NBITS16, _SYM_BASE, _SYM_NBITS = _symbol_tables()
# Symbols are bytes (uint8: less memory traffic than int32); the raw low bits of a 16-bit value
# are ``v & _LOW16[v]``; the raw-bit count of each symbol, as int64 for exact sums over histograms.
_LOW16 = ((np.uint32(1) << _NBITS16.astype(np.uint32)) - np.uint32(1)).astype(np.uint16)
_SYM_NBITS64 = _SYM_NBITS.astype(np.int64)
_SYM_BASE_AS = {np.uint32: _SYM_BASE.astype(np.uint32), np.uint64: _SYM_BASE}  # decode's work types (no cast per chunk)


_FEW_RAW = 4  # at most 1 in this many values has raw bits: look up and group only those


def _symbolize(v: np.ndarray) -> tuple:
    """(symbol per value, raw bits, the symbols' histogram): the histogram is counted once for
    both the size estimate and the coder. Raw bits are (positions, raw-bit counts, raw bits):
    positions None where the counts and bits are given for every value, else the ascending
    positions of the values that have raw bits (all others have none)."""
    sym, where, nbits, extra = _symbols_of(v)
    return sym, (where, nbits, extra), np.bincount(sym, minlength=_ALPHABET)


_NO_RAW = (np.zeros(0, np.intp), np.zeros(0, np.uint8), np.zeros(0, np.uint8))


def _symbols_of(v: np.ndarray) -> tuple:
    top = int(v.max()) if v.size else 0
    if top < _DIRECT:  # every value is its own symbol (dense ULP steps): no lookups, no raw bits
        return (v.astype(np.uint8), *_NO_RAW)
    if v.dtype.itemsize > 2 and top < 1 << 16:
        v = v.astype(np.uint16)
    if v.dtype.itemsize <= 2:  # the common case (16-bit dtypes, small gaps): table lookups
        big = np.flatnonzero(v >= _DIRECT)
        if big.size * _FEW_RAW <= v.size:
            # mostly direct symbols (gaps of dense updates): the others looked up alone
            sym = v.astype(np.uint8)
            vb = v[big]
            at = vb.astype(np.intp)
            sym[big] = _SYM16[at]
            return sym, big, _NBITS16[at], vb & _LOW16[at]
        at = v.astype(np.intp)  # once: each lookup would convert a uint16 index again (3x slower)
        return _SYM16[at], None, _NBITS16[at], v & _LOW16[at]
    length = _bit_length(v)
    big = length > 4
    nbits = np.where(big, length - 3, 0)
    v64 = v.astype(np.uint64)
    top = (v64 >> nbits.astype(np.uint64)) & np.uint64(3)
    sym = np.where(big, _DIRECT + (length - 5) * 4 + top.astype(np.int64), v64.astype(np.int64))
    extra = v64 & ((np.uint64(1) << nbits.astype(np.uint64)) - np.uint64(1))
    return sym.astype(np.uint8), None, nbits.astype(np.uint8), extra


def _entropy_bytes(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float((c * np.log2(n / c)).sum()) / 8 + 2 * len(c) + 8 if n else 1.0


def estimate_uints(v) -> float:
    """Estimated coded size in bytes of ``_encode_uints(v)`` (``v``: values or their symbols)."""
    counts = (_symbolize(v) if isinstance(v, np.ndarray) else v)[2]
    return _entropy_bytes(counts) + float((counts * _SYM_NBITS64).sum()) / 8  # raw bits: counted per symbol


def estimate_planes(bits: np.ndarray) -> float:
    size = bits.dtype.itemsize
    if size == 2 and bits.size >= 1 << 18:  # both byte planes' histograms from one pass
        both = np.bincount(bits.astype("<u2", copy=False).view(np.uint16), minlength=1 << 16).reshape(256, 256)
        return _entropy_bytes(both.sum(axis=0)) + _entropy_bytes(both.sum(axis=1))
    planes = bits.view(np.uint8).reshape(-1, size)
    return sum(_entropy_bytes(np.bincount(planes[:, i], minlength=256)) for i in range(size))


def varints(values) -> bytes:
    """LEB128 varints of non-negative integers (a plain loop: headers hold a few dozen)."""
    out = bytearray()
    for x in values:
        while x >= 0x80:
            out.append((x & 0x7F) | 0x80)
            x >>= 7
        out.append(x)
    return bytes(out)


class _Out:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def varint(self, x: int) -> None:
        self.parts.append(varints((x,)))

    def blob(self, data: bytes) -> None:
        self.varint(len(data))
        self.parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _In:
    def __init__(self, data, where: str) -> None:
        self.mv = memoryview(data)
        self.pos = 0
        self.where = where

    def _fail(self) -> PatchError:
        return PatchError(f"{self.where}: encoded data ends early or is corrupt; the patch is damaged: re-create it")

    def varint(self) -> int:
        return self.varints(1)[0]

    def varints(self, count: int) -> list[int]:
        """``count`` varints."""
        mv, pos, end = self.mv, self.pos, len(self.mv)
        out = []
        for _ in range(count):
            x = shift = 0
            while True:
                if pos >= end or shift > 63:
                    raise self._fail()
                byte = mv[pos]
                pos += 1
                x |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            out.append(x)
        self.pos = pos
        return out

    def blob(self) -> memoryview:
        n = self.varint()
        if self.pos + n > len(self.mv):
            raise self._fail()
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out


_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _low_mask(width) -> np.ndarray:
    """All ones in the low ``width`` bits (1..64; scalar or per value); no shift by 64."""
    return _ONES >> (np.uint64(64) - np.asarray(width, dtype=np.uint64))


_WORD_PACK_FROM = 4096  # values in a group from which packing by words beats one byte per bit (measured)


def _pack_bits(vals: np.ndarray, k: int) -> bytes:
    """The low ``k`` bits of each value, least significant first, concatenated (little bit order)."""
    m = vals.size
    if m < _WORD_PACK_FROM:
        # small groups (most groups of sparse updates): three numpy calls over one byte per bit
        # cost less than the dozen calls of the word packing below
        le = vals.astype(vals.dtype.newbyteorder("<"), copy=False)
        bits = np.unpackbits(le.view(np.uint8).reshape(-1, vals.dtype.itemsize), axis=1, count=k, bitorder="little")
        return np.packbits(bits, bitorder="little").tobytes()
    # Eight values of k bits fill exactly k bytes: build each row of eight as ceil(k / 8) 64-bit
    # words by shift-and-OR, one column at a time (all columns' offsets are the same constants),
    # then keep each row's first k bytes.
    rows = (m + 7) // 8
    flat = np.zeros(rows * 8, dtype=vals.dtype)
    flat[:m] = vals
    if k < 8 * vals.dtype.itemsize:
        flat &= vals.dtype.type((1 << k) - 1)
    cols = np.empty((8, rows), dtype=np.uint64)
    cols[...] = flat.reshape(rows, 8).T
    words = (k + 7) // 8
    acc = np.zeros((words, rows), dtype=np.uint64)
    for c in range(8):
        w, s = divmod(c * k, 64)
        if s == 0:
            acc[w] |= cols[c]
            continue
        acc[w] |= cols[c] << np.uint64(s)
        if s + k > 64:
            acc[w + 1] |= cols[c] >> np.uint64(64 - s)
    rowbytes = np.ascontiguousarray(acc.T).astype("<u8", copy=False).view(np.uint8).reshape(rows, 8 * words)
    return rowbytes[:, :k].tobytes()[:(m * k + 7) // 8]


def _unpack_fields(raw: np.ndarray, bitpos: np.ndarray, width, top: int) -> np.ndarray:
    """The ``width``-bit fields (little bit order) starting at bits ``bitpos`` (int64) of the
    bytes ``raw``, as uint64 (``top``: the largest width; ``width`` a uint64 scalar or array).

    Each field is read from the 8 bytes starting at its first byte (an unaligned 64-bit view of
    the buffer: one gather per value); fields wider than 56 bits may need the byte after those.
    """
    total = raw.size
    buf = np.zeros(total + 16, dtype=np.uint8)
    buf[:total] = raw
    windows = np.ndarray((total + 9,), dtype="<u8", buffer=buf, strides=(1,))
    byte = bitpos >> 3  # int64: indexing with uint64 is 2-3x slower
    shift = bitpos.view(np.uint64) & np.uint64(7)
    vals = windows[byte] >> shift
    if top > 56:
        spill = np.flatnonzero(shift + width > 64)
        if spill.size:
            vals[spill] |= windows[byte[spill] + 8] << (np.uint64(64) - shift[spill])
    vals &= _low_mask(width)
    return vals


def _unpack_bits(raw: np.ndarray, m: int, k: int, work) -> np.ndarray:
    """Inverse of :func:`_pack_bits`: ``m`` values of ``k`` bits as ``work`` (unsigned)."""
    return _unpack_fields(raw, np.arange(0, m * k, k, dtype=np.int64), np.uint64(k), k).astype(work, copy=False)


def _raw_layout(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the raw low bits of a stream's values lie: the values with k raw bits (``counts[k]``
    of them) are packed together, groups by ascending k, each group starting on a byte.

    Returns (the ks that occur, per value in group order: its bit count and its first bit); the
    bytes themselves are taken by :func:`_take_raw`.
    """
    ks = np.flatnonzero(counts[1:]) + 1
    reps = counts[ks]
    group_bytes = (reps * ks + 7) // 8
    m = int(reps.sum())
    if len(ks) == 1:
        k = int(ks[0])
        return ks, np.uint64(k), np.arange(0, m * k, k, dtype=np.int64)
    # value j of the whole sequence, in group k: bit 8 * (group k's first byte) + (j - first j of k) * k
    first = (np.cumsum(group_bytes) - group_bytes) * 8 - (np.cumsum(reps) - reps) * ks
    width = np.repeat(ks.astype(np.uint64), reps)
    bitpos = np.arange(m, dtype=np.int64) * width.view(np.int64)
    bitpos += np.repeat(first, reps)
    return ks, width, bitpos


def _group_order(nbits: np.ndarray, counts: np.ndarray, ks: np.ndarray) -> np.ndarray | None:
    """Positions of the values with raw bits, grouped by ascending bit count (ascending within
    a group); None where that is every value in order."""
    if len(ks) == 1:
        return None if counts[0] == 0 else np.flatnonzero(nbits)
    if len(ks) <= 3:  # few groups (dense ULP steps): a mask each is cheaper than a stable sort
        return np.concatenate([np.flatnonzero(nbits == k) for k in ks])
    return np.argsort(nbits, kind="stable")[counts[0]:]  # many groups (gaps of sparse updates)


def _encode_symbols(out: _Out, sym: np.ndarray, counts: np.ndarray | None = None, version: int = CODER_VERSION,
                    compiled=None) -> None:
    if version >= 2:
        _encode_symbols_zstd(out, sym, counts, compiled)
        return
    if counts is None:
        counts = np.bincount(sym, minlength=_ALPHABET)
    used = np.flatnonzero(counts)
    out.parts.append(varints([len(used), *np.stack([used, counts[used]], axis=1).reshape(-1).tolist()]))
    if len(used) <= 1:  # one symbol: nothing to code
        return
    c = _constriction()
    coder = c.stream.stack.AnsCoder()
    coder.encode_reverse(sym.astype(np.int32), c.stream.model.Categorical(counts.astype(np.float64), perfect=False))
    out.blob(coder.get_compressed().tobytes())


def _encode_symbols_zstd(out: _Out, sym: np.ndarray, counts: np.ndarray | None, compiled=None) -> None:
    """Version 2: mode, then the symbols packed two per byte (all < 16) or one per byte, zstd
    (``compiled``: the C kernels pack the nibbles in one pass, ~15x faster than numpy's three)."""
    if counts is not None:  # the histogram has the smallest and largest symbol: no pass over them
        used = np.flatnonzero(counts)
        low, top = (int(used[0]), int(used[-1])) if used.size else (0, 0)
    else:
        low, top = (int(sym.min()), int(sym.max())) if sym.size else (0, 0)
    if sym.size == 0 or low == top:
        out.parts.append(varints((_SAME, top)))
        return
    s8 = sym.astype(np.uint8, copy=False)
    if top < 16:
        if compiled is not None:
            raw = compiled.pack_nibbles(s8)
        else:
            if s8.size % 2:
                s8 = np.append(s8, np.uint8(0))
            raw = s8[0::2] | (s8[1::2] << np.uint8(4))
        out.varint(_NIBBLES)
    else:
        raw = s8
        out.varint(_BYTES)
    out.blob(_zstd()[0].compress(memoryview(raw)))


def _decode_symbols(inp: _In, n: int, version: int = CODER_VERSION) -> np.ndarray:
    if version >= 2:
        return _decode_symbols_zstd(inp, n)
    counts = np.zeros(_ALPHABET, dtype=np.float64)
    k = inp.varint()
    if k > _ALPHABET:
        raise inp._fail()
    pairs = np.array(inp.varints(2 * k), dtype=np.uint64).reshape(k, 2)
    used = pairs[:, 0]
    if k and (int(used[-1]) >= _ALPHABET or (k > 1 and not np.all(used[1:] > used[:-1]))):
        raise inp._fail()
    counts[used.astype(np.intp)] = pairs[:, 1]
    if int(pairs[:, 1].sum()) != n:
        raise inp._fail()
    if k <= 1:
        return np.full(n, int(used[0]) if k else 0, dtype=np.int32)
    c = _constriction()
    words = np.frombuffer(inp.blob(), dtype=np.uint32).copy()
    # A lazy model decodes the same bits (``perfect=False`` either way: documented by constriction)
    # by scanning up from symbol 0: ~2x faster where the symbols are mostly the first few (dense
    # ULP differences: 57 vs 128 ms per 4M symbols), slower where they spread (a binary search,
    # ~30 ns per symbol, whatever the histogram). Measured: never slower at a mean symbol <= 2.
    lazy = float(counts @ np.arange(_ALPHABET)) <= _LAZY_MEAN_SYMBOL * n
    try:
        sym = c.stream.stack.AnsCoder(words).decode(c.stream.model.Categorical(counts, perfect=False, lazy=lazy), n)
    except Exception:  # constriction raises its own types on inconsistent data
        raise inp._fail() from None
    return np.asarray(sym, dtype=np.int32)


def _decode_symbols_zstd(inp: _In, n: int) -> np.ndarray:
    mode = inp.varint()
    if mode == _SAME:
        top = inp.varint()
        if top >= _ALPHABET:
            raise inp._fail()
        return np.full(n, top, dtype=np.uint8)
    if mode not in (_NIBBLES, _BYTES):
        raise inp._fail()
    size = (n + 1) // 2 if mode == _NIBBLES else n
    try:
        raw = _zstd()[1].decompress(inp.blob(), max_output_size=size)
    except Exception:  # zstandard.ZstdError: damaged frame
        raise inp._fail() from None
    if len(raw) != size:
        raise inp._fail()
    b = np.frombuffer(raw, dtype=np.uint8)
    if mode == _BYTES:
        return b
    sym = np.empty(2 * size, dtype=np.uint8)
    sym[0::2] = b & np.uint8(15)
    sym[1::2] = b >> np.uint8(4)
    return sym[:n]


def _encode_uints(out: _Out, v, version: int = CODER_VERSION, compiled=None) -> None:
    sym, (where, nbits, extra), sym_counts = _symbolize(v) if isinstance(v, np.ndarray) else v
    _encode_symbols(out, sym, sym_counts, version, compiled)
    # the raw low bits of values with the same bit count, packed together (ascending count);
    # how many values have each count follows from the symbols' histogram
    counts = np.bincount(_SYM_NBITS, weights=sym_counts, minlength=65).astype(np.int64)
    if counts[0] == len(sym):
        return
    if compiled is not None:  # every group in one compiled pass (the same bytes)
        out.parts.append(compiled.pack_raw_bits(nbits, extra))
        return
    if where is not None:  # only the values with raw bits are listed
        counts[0] = 0
    for k, at in _by_bit_count(nbits, counts):
        out.parts.append(_pack_bits(extra if at is None else extra[at], k))


def _by_bit_count(nbits: np.ndarray, counts: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
    """(k, positions of the values with k raw bits, ascending; None: every value) for each k > 0
    that occurs (``counts[k]``: how many values of ``nbits`` have k)."""
    ks = np.flatnonzero(counts[1:]) + 1
    if len(ks) == 1 and counts[0] == 0:
        return [(int(ks[0]), None)]
    if len(ks) <= 3:  # few groups (dense ULP steps): a mask each is 4x cheaper than a stable sort
        return [(int(k), np.flatnonzero(nbits == k)) for k in ks]
    order = np.argsort(nbits, kind="stable")  # many groups (gaps of sparse updates): cheaper
    first = np.cumsum(counts) - counts
    return [(int(k), order[first[k]:first[k] + counts[k]]) for k in ks]


def _decode_uints(inp: _In, n: int, dtype, version: int = CODER_VERSION) -> np.ndarray:
    sym = _decode_symbols(inp, n, version)
    # One histogram of the symbols gives the largest symbol and how many values have each raw-bit
    # count (the tables map symbols to bit counts), instead of a pass over the values for each.
    sym_counts = np.bincount(sym, minlength=_ALPHABET)
    if len(sym_counts) > _ALPHABET:
        raise inp._fail()
    if n and not sym_counts[_DIRECT:].any():  # every value is its own symbol (dense ULP steps): no raw bits
        return sym.astype(dtype)
    counts = np.bincount(_SYM_NBITS, weights=sym_counts, minlength=65).astype(np.int64)
    width_bits = 8 * np.dtype(dtype).itemsize
    work = np.uint32 if width_bits <= 32 else np.uint64
    raw, _ = _take_raw(inp, counts, width_bits)
    ks, width, bitpos = _raw_layout(counts)
    vals = _unpack_fields(raw, bitpos, width, int(ks[-1])).astype(work, copy=False)
    if (n - counts[0]) * _FEW_RAW <= n:
        # mostly direct symbols (gaps of dense updates): they are their own values; only the
        # others are looked up and completed with their raw bits
        v = sym.astype(work)
        big = np.flatnonzero(sym >= _DIRECT)
        sb = sym[big]
        vb = _SYM_BASE_AS[work][sb]
        counts[0] = 0
        order = _group_order(_SYM_NBITS[sb], counts, ks)
    else:
        v = _SYM_BASE_AS[work][sym.astype(np.intp)]
        big, vb = None, v
        order = None if len(ks) == 1 and counts[0] == 0 else _group_order(_SYM_NBITS[sym], counts, ks)
    if order is None:
        vb |= vals
    else:
        vb[order] |= vals
    if big is not None:
        v[big] = vb
    return v.astype(dtype, copy=False)


def _symbols_and_raw(inp: _In, n: int, width_bits: int, version: int,
                     compiled) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`_decode_uints` reads, undecoded: (symbols, the raw-bit bytes, the first bit of
    each raw-bit count's group), with the same checks; the layout by the C kernels (``compiled``:
    one call instead of a dozen numpy calls per stream)."""
    direct = _all_direct(inp) if version >= 2 else False
    sym = _decode_symbols(inp, n, version)
    start = np.empty(65, dtype=np.int64)
    if direct:  # every symbol below 16 is its own value: no raw bits, no pass to count them
        start[:] = 0
        return sym, np.empty(0, dtype=np.uint8), start
    nbytes = compiled.raw_layout(sym, _SYM_NBITS, width_bits, start)
    if nbytes < 0 or inp.pos + nbytes > len(inp.mv):
        raise inp._fail()
    raw = np.frombuffer(inp.mv[inp.pos:inp.pos + nbytes], dtype=np.uint8)
    inp.pos += nbytes
    return sym, raw, start


def _all_direct(inp: _In) -> bool:
    """Whether the version-2 symbol stream at the cursor holds only symbols below 16 (packed two
    per byte, or one symbol repeated), read from its mode without moving the cursor."""
    probe = _In(inp.mv[inp.pos:], inp.where)
    mode = probe.varint()
    return mode == _NIBBLES or (mode == _SAME and probe.varint() < _DIRECT)


def _take_raw(inp: _In, counts: np.ndarray, width_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw-bit bytes that follow a stream's symbols (``counts[k]``: its values with k raw
    bits; each k's group starts on a byte), checked against the value width and the input's end.

    Returns (the bytes, the first byte of each k's group, indexed by k).
    """
    ks = np.flatnonzero(counts[1:]) + 1
    if len(ks) and int(ks[-1]) + 3 > width_bits:
        raise inp._fail()
    group_bytes = (counts * np.arange(65) + 7) // 8
    nbytes = int(group_bytes.sum())
    if inp.pos + nbytes > len(inp.mv):
        raise inp._fail()
    raw = np.frombuffer(inp.mv[inp.pos:inp.pos + nbytes], dtype=np.uint8)
    inp.pos += nbytes
    return raw, np.cumsum(group_bytes) - group_bytes


def _encode_planes(out: _Out, bits: np.ndarray, version: int = CODER_VERSION, compiled=None) -> None:
    size = bits.dtype.itemsize
    planes = bits.view(np.uint8).reshape(-1, size)
    for i in range(size):
        _encode_symbols(out, np.ascontiguousarray(planes[:, i]), version=version, compiled=compiled)


def _decode_planes(inp: _In, n: int, dtype, version: int = CODER_VERSION) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    planes = np.empty((n, size), dtype=np.uint8)
    for i in range(size):
        planes[:, i] = _decode_symbols(inp, n, version)
    return planes.reshape(-1).view(dtype)


# ---------------------------------------------------------------- chunks

def encode_chunk(old: np.ndarray | None, new: np.ndarray, is_float: bool,
                 version: int = CODER_VERSION, changed: np.ndarray | None = None,
                 compiled=None, scan: SparseScan | None = None) -> tuple[int, int, bytes]:
    """Code ``new`` against ``old`` (same length and unsigned dtype; None: no base), with the
    symbol coder of patch schema ``version``. ``changed``: the ascending indices where the two
    differ, if the caller found them already (``np.flatnonzero(old != new)`` otherwise).
    ``compiled``: the C kernels (``compiled.KERNELS``) to make the sparse encodings' symbols of
    dtypes up to 32 bits in one compiled pass and pack their raw bits (the same bytes), or None
    for numpy throughout. ``scan``: a :class:`SparseScan` that has seen the whole chunk (it found
    the changes and made their symbols; ``changed`` is then not needed).

    Returns (encoding, changed elements, bytes); ``SAME`` chunks carry no bytes.
    """
    n = new.size
    if old is None:
        out = _Out()
        _encode_planes(out, new, version, compiled)
        return DENSE_BITS, n, out.getvalue()
    if scan is not None:
        idx, k = None, scan.changed
    else:
        idx = np.flatnonzero(old != new) if changed is None else changed
        k = idx.size
    if k == 0:
        return SAME, 0, b""
    candidates: dict[int, float] = {}
    streams: dict[int, tuple] = {}
    if k <= n // 2:
        if scan is not None:
            gaps, delta, w, planes_size = scan.symbols()
        elif compiled is not None and new.itemsize <= 4 and n < 1 << 32:
            gaps, delta, w, planes_size = _sparse_symbols(compiled, old, new, idx, is_float)
        else:
            gaps = _symbolize((np.diff(idx, prepend=-1) - 1).astype(np.uint32 if n < 1 << 32 else np.uint64))
            o, w = np.take(old, idx), np.take(new, idx)  # take: ~25% cheaper than [idx] here
            delta = _symbolize(ulp_delta(o, w, is_float))
            planes_size = estimate_planes(w)
        gap_size = estimate_uints(gaps)
        candidates[SPARSE_DELTA] = gap_size + estimate_uints(delta)
        candidates[SPARSE_BITS] = gap_size + planes_size
        streams[SPARSE_DELTA] = (gaps, delta)
        streams[SPARSE_BITS] = (gaps, w)
    # Version 2 codes skewed dense streams far above their entropy (Huffman: >= 1 bit a symbol),
    # so dense encodings are only worth estimating from a third of the elements changed up.
    if k >= (n // 8 if version < 2 else n // 3):
        dense = _symbolize(ulp_delta(old, new, is_float))
        candidates[DENSE_DELTA] = estimate_uints(dense)
        candidates[DENSE_BITS] = estimate_planes(new)
        streams[DENSE_DELTA] = (dense,)
        streams[DENSE_BITS] = (new,)
    best = min(candidates, key=candidates.__getitem__)
    if version < 2:
        return best, k, _code(best, k, streams[best], version, compiled)
    tries = [e for e in candidates if candidates[e] <= _TRY_RATIO * candidates[best]]
    coded = [(_code(e, k, streams[e], version, compiled), e) for e in tries]
    data, best = min(coded, key=lambda c: len(c[0]))
    return best, k, data


class SparseScan:
    """The sparse encodings' streams of a chunk of 2-byte elements made while the chunk is compared,
    a block at a time (the C kernels' ``scan_symbols16``): its changed positions are never written
    down and read back, and each block is coded while the compare has it in the CPU cache. Feed
    the chunk's blocks in order (:meth:`add`), then pass it to :func:`encode_chunk`: the same
    bytes as ``encode_chunk(old, new, is_float, compiled=...)``. Its arrays are this thread's
    (:func:`scratch`): one chunk at a time per thread."""

    def __init__(self, compiled, n: int, is_float: bool):
        self._kernel = compiled.scan_symbols16
        self._is_float = is_float
        self._limit = n // 2  # more changes than this: no sparse encoding, so only counted
        k = self._limit
        self._state = np.array([0, 0, 0, -1], dtype=np.int64)  # changes, raw values per stream, last position
        self._streams = _stream_arrays(k)
        self._values = scratch("values", 2 * k, np.uint8).view(np.uint16)
        self._planes = np.zeros((2, 256), np.int64)

    def add(self, old: np.ndarray, new: np.ndarray, offset: int) -> None:
        """The next block: ``old`` and ``new`` (uint16) from chunk position ``offset``."""
        self._kernel(old, new, offset, self._limit, self._is_float, self._state, *self._streams[0],
                     *self._streams[1], self._values, self._planes)

    @property
    def changed(self) -> int:
        return int(self._state[0])

    def symbols(self) -> tuple:
        """What :func:`_sparse_symbols` returns, for a chunk with at most half its elements changed."""
        k = self.changed
        big = self._state[1:3]
        out = [(sym[:k], (where[:m], nbits[:m], extra[:m]), counts)
               for (sym, where, nbits, extra, counts), m in zip(self._streams, big)]
        return out[0], out[1], self._values[:k], _entropy_bytes(self._planes[0]) + _entropy_bytes(self._planes[1])


def _stream_arrays(k: int) -> list[tuple]:
    """The arrays the C encoder fills for the gaps' and the ULP differences' streams of up to ``k``
    changes: symbols, raw bits (where, counts, bits), histogram; this thread's (:func:`scratch`),
    valid while one chunk is coded."""
    return [(scratch(f"{s}sym", k, np.uint8), scratch(f"{s}where", k, np.intp), scratch(f"{s}nbits", k, np.uint8),
             scratch(f"{s}extra", k, np.uint32), np.zeros(_ALPHABET, np.int64)) for s in "gd"]


def _sparse_symbols(compiled, old: np.ndarray, new: np.ndarray, idx: np.ndarray, is_float: bool) -> tuple:
    """(gaps, ULP differences, new bits, estimated size of the new bits' byte planes) at the
    changed positions ``idx``, the two streams as :func:`_symbolize` gives them, by the C kernels."""
    k = idx.size
    streams = _stream_arrays(k)
    values = scratch("values", k * new.itemsize, np.uint8).view(new.dtype)  # one array for every width
    planes = np.zeros((new.itemsize, 256), np.int64)
    big = compiled.sparse_delta_symbols(old, new, idx, _BITLEN16, 8 * new.itemsize, is_float, *streams[0], *streams[1],
                                        values, planes)
    out = [(sym, (where[:m], nbits[:m], extra[:m]), counts) for (sym, where, nbits, extra, counts), m in zip(streams, big)]
    # the same sum as estimate_planes: plane by plane from the lowest byte
    return out[0], out[1], values, sum(_entropy_bytes(planes[i]) for i in range(new.itemsize))


def _code(encoding: int, k: int, streams: tuple, version: int, compiled=None) -> bytes:
    out = _Out()
    out.varint(k)
    if encoding in (SPARSE_DELTA, SPARSE_BITS):
        _encode_uints(out, streams[0], version, compiled)
        if encoding == SPARSE_DELTA:
            _encode_uints(out, streams[1], version, compiled)
        else:
            _encode_planes(out, streams[1], version, compiled)
    elif encoding == DENSE_DELTA:
        _encode_uints(out, streams[0], version, compiled)
    else:
        _encode_planes(out, streams[0], version, compiled)
    return out.getvalue()


def decode_chunk(encoding: int, data, old: np.ndarray | None, n: int, dtype, is_float: bool,
                 where: str, inplace: bool = False, version: int = CODER_VERSION, compiled=None) -> np.ndarray:
    """Rebuild the new bits of a chunk (``n`` elements of unsigned ``dtype``) coded with the
    symbol coder of patch schema ``version``.

    ``inplace=True`` writes the result over ``old`` and returns it (no copy of the chunk);
    otherwise ``old`` is left as it is (an unchanged chunk returns ``old`` itself).
    ``compiled``: the C kernels (``compiled.KERNELS``) to decode sparse ULP-step chunks of dtypes
    up to 32 bits in one compiled pass (the same bits), or None for numpy throughout.
    """
    if encoding == SAME:
        if old is None:
            raise PatchError(f"{where}: chunk marked unchanged but there is no base data; the patch is corrupt")
        return old
    inp = _In(data, where)
    if encoding == DENSE_BITS and old is None:
        return _decode_planes(inp, n, dtype, version)
    if old is None:
        raise PatchError(f"{where}: chunk needs base data that the patch does not map; the patch is corrupt")
    k = inp.varint()
    if k > n:
        raise inp._fail()
    if encoding == SPARSE_DELTA and compiled is not None and version >= 2 and np.dtype(dtype).itemsize <= 4:
        new = old if inplace else old.copy()
        gaps = _symbols_and_raw(inp, k, 64, version, compiled)
        deltas = _symbols_and_raw(inp, k, 8 * new.itemsize, version, compiled)
        if not compiled.sparse_delta_apply(new, *gaps, *deltas, _SYM_BASE, _SYM_NBITS, 8 * new.itemsize, is_float):
            raise inp._fail()
        return new
    if encoding in (SPARSE_DELTA, SPARSE_BITS):
        gaps = _decode_uints(inp, k, np.int64, version)
        idx = np.cumsum(gaps + 1) - 1
        if k and (idx[-1] >= n or gaps.min() < 0):
            raise inp._fail()
        if encoding == SPARSE_DELTA:
            values = apply_ulp_delta(np.take(old, idx), _decode_uints(inp, k, dtype, version), is_float)
        else:
            values = _decode_planes(inp, k, dtype, version)
        new = old if inplace else old.copy()
        new[idx] = values
        return new
    if encoding in (DENSE_DELTA, DENSE_BITS):
        if encoding == DENSE_DELTA:
            new = apply_ulp_delta(old, _decode_uints(inp, n, dtype, version), is_float)
        else:
            new = _decode_planes(inp, n, dtype, version)
        if inplace:
            old[:] = new
            return old
        return new
    raise PatchError(f"{where}: unknown chunk encoding {encoding}; the patch is corrupt or from a newer rlsparse")


def order0_bits(changed: int, numel: int, ulp_hist: dict[int, int]) -> float:
    """The order-0 bound in bits: positions at the measured density plus the entropy of the
    changes counted in units in the last place (``ulp_hist``: zigzagged difference -> count)."""
    bits = 0.0
    if 0 < changed < numel:
        p = changed / numel
        bits += numel * (-p * np.log2(p) - (1 - p) * np.log2(1 - p))
    if ulp_hist:
        c = np.array(list(ulp_hist.values()), dtype=np.float64)
        bits += float((c * np.log2(c.sum() / c)).sum())
    return bits
