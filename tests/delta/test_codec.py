"""The chunk codec: bit-exact round trips on random data of every width, every encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsparse.delta import codec
from rlsparse.errors import PatchError

WIDTHS = [np.uint8, np.uint16, np.uint32, np.uint64]


def _ulps(a: float, b: float) -> int:
    """Reference: signed distance in float32 ULPs along the ordered line (-0 and +0 one apart)."""
    def key(x):
        u = int(np.float32(x).view(np.uint32))
        return (u ^ 0xFFFFFFFF) if u >> 31 else (u | 0x80000000)
    return key(b) - key(a)


def test_ordered_view_is_monotone_and_counts_ulps():
    vals = np.array([-np.inf, -2.0, -1e-30, -0.0, 0.0, 1e-45, 1.0, 2.0, np.inf], dtype=np.float32)
    keys = codec.to_ordered(vals.view(np.uint32), True)
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    assert np.array_equal(codec.from_ordered(keys, True), vals.view(np.uint32))
    a = np.array([1.0, -0.0, 1.0], dtype=np.float32).view(np.uint32)
    b = np.array([np.nextafter(np.float32(1.0), np.float32(2.0)), 0.0, 0.5], dtype=np.float32).view(np.uint32)
    z = codec.ulp_delta(a, b, True)
    signed = codec.unzigzag(z).view(np.int32)
    assert signed.tolist() == [_ulps(1.0, float(b.view(np.float32)[0])), 1, _ulps(1.0, 0.5)]


@settings(max_examples=60, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(0, 3000), density=st.sampled_from([0.0, 0.001, 0.05, 0.4, 1.0]),
       small=st.booleans(), is_float=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_chunk_round_trip_is_bit_exact(width, n, density, small, is_float, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(width)
    old = rng.integers(0, info.max, size=n, dtype=width, endpoint=True)
    new = old.copy()
    idx = rng.random(n) < density
    if small:  # a few units in the last place, either sign
        steps = rng.integers(-3, 4, size=int(idx.sum())).astype(np.int64)
        with np.errstate(over="ignore"):
            new[idx] = codec.apply_ulp_delta(old[idx], codec.zigzag(steps.astype(width)), is_float)
    else:
        new[idx] = rng.integers(0, info.max, size=int(idx.sum()), dtype=width, endpoint=True)
    enc, changed, data = codec.encode_chunk(old, new, is_float)
    assert changed == int(np.count_nonzero(old != new))
    back = codec.decode_chunk(enc, data, old, n, width, is_float, "test")
    assert back.dtype == width and np.array_equal(back, new)
    enc, changed, data = codec.encode_chunk(None, new, is_float)
    assert enc == codec.DENSE_BITS and np.array_equal(codec.decode_chunk(enc, data, None, n, width, is_float, "t"), new)


def test_special_bit_patterns_survive():
    # NaN payloads (quiet and signalling, both signs), +-0, +-inf, subnormals: bf16 as uint16
    old = np.array([0x7FC0, 0x7F81, 0xFFC1, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x3F80] * 50, dtype=np.uint16)
    new = old.copy()
    new[::9] = 0x7FC3
    new[1::9] = 0x8000
    new[3::9] = 0x8000
    new[4::9] = 0x0000
    new[7::9] = 0x8001
    for is_float in (True, False):
        enc, _, data = codec.encode_chunk(old, new, is_float)
        assert np.array_equal(codec.decode_chunk(enc, data, old, new.size, np.uint16, is_float, "t"), new)


def test_encoding_follows_density():
    rng = np.random.default_rng(0)
    old = rng.integers(0, 2**16, size=100_000, dtype=np.uint16)
    sparse = old.copy()
    sparse[::500] += 1
    assert codec.encode_chunk(old, sparse, True)[0] == codec.SPARSE_DELTA
    dense = old + np.uint16(1)
    assert codec.encode_chunk(old, dense, True)[0] == codec.DENSE_DELTA
    assert codec.encode_chunk(old, old.copy(), True)[:2] == (codec.SAME, 0)


def test_corrupt_codes_are_refused_not_crashing():
    rng = np.random.default_rng(1)
    old = rng.integers(0, 2**16, size=5000, dtype=np.uint16)
    new = old.copy()
    new[::37] ^= 0x0101
    enc, _, data = codec.encode_chunk(old, new, True)
    with pytest.raises(PatchError):
        codec.decode_chunk(enc, data[: len(data) // 3], old, old.size, np.uint16, True, "t")


def test_order0_bound_matches_hand_count():
    # 4 of 8 changed (H = 1 bit each) and deltas {1: 2, 2: 2} (1 bit each): 8 + 4 bits
    assert codec.order0_bits(4, 8, {1: 2, 2: 2}) == pytest.approx(12.0)


def test_plane_estimate_of_large_16_bit_chunks_equals_per_plane_reference():
    # large 16-bit chunks take both byte planes' histograms from one 65536-bin count: same number
    rng = np.random.default_rng(3)
    bits = (rng.standard_normal(1 << 19) * 0.02).astype(np.float32).view(np.uint32) >> 16
    bits = bits.astype(np.uint16)
    planes = bits.view(np.uint8).reshape(-1, 2)
    reference = sum(codec._entropy_bytes(np.bincount(planes[:, i], minlength=256)) for i in range(2))
    assert codec.estimate_planes(bits) == reference



# The raw low bits were packed with numpy's bit arrays (one byte per bit) before the word
# packing; the format is those bytes, so the reference stays here, and only here.
def _reference_pack_bits(vals: np.ndarray, k: int) -> bytes:
    le = vals.astype(vals.dtype.newbyteorder("<"), copy=False)
    bits = np.unpackbits(le.view(np.uint8).reshape(-1, vals.dtype.itemsize), axis=1, count=k, bitorder="little")
    return np.packbits(bits, bitorder="little").tobytes()


def _reference_unpack_bits(raw: np.ndarray, m: int, k: int, work) -> np.ndarray:
    size = np.dtype(work).itemsize
    bits = np.unpackbits(raw, count=m * k, bitorder="little").reshape(m, k)
    full = np.zeros((m, 8 * size), dtype=np.uint8)
    full[:, :k] = bits
    return np.packbits(full, axis=1, bitorder="little").view(np.dtype(work).newbyteorder("<")).reshape(m)


@settings(max_examples=150, deadline=None)
@given(width=st.sampled_from(WIDTHS), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_bit_packing_equals_the_bit_array_reference(width, data, seed):
    bits = 8 * np.dtype(width).itemsize
    k = data.draw(st.integers(1, bits), label="k")
    # both sides of the switch to word packing, and odd lengths (a partial row of eight values)
    m = data.draw(st.one_of(st.integers(0, 40), st.integers(codec._WORD_PACK_FROM - 9, codec._WORD_PACK_FROM + 40),
                            st.integers(0, 3 * codec._WORD_PACK_FROM)), label="m")
    vals = np.random.default_rng(seed).integers(0, np.iinfo(width).max, size=m, dtype=width, endpoint=True)
    packed = codec._pack_bits(vals, k)  # bits above k are ignored, as by the reference
    assert packed == _reference_pack_bits(vals, k)
    work = np.uint64 if bits == 64 else np.uint32
    raw = np.frombuffer(packed, dtype=np.uint8)
    back = codec._unpack_bits(raw, m, k, work)
    assert back.dtype == work and np.array_equal(back, _reference_unpack_bits(raw, m, k, work))
    low = vals.astype(np.uint64) & np.uint64((1 << k) - 1 if k < 64 else 2**64 - 1)
    assert np.array_equal(back.astype(np.uint64), low)


@settings(max_examples=60, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 6000), big_share=st.sampled_from([0.0, 0.01, 0.2, 0.3, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_integer_streams_code_the_same_bytes_whichever_values_are_looked_up(width, n, big_share, seed):
    # Values below 16 are their own symbols; where few values are larger, only those are looked
    # up and grouped (``_FEW_RAW``). Both ways must write, and read back, the very same bytes.
    rng = np.random.default_rng(seed)
    top = np.iinfo(width).max
    v = rng.integers(0, 16, size=n).astype(width)
    big = rng.random(n) < big_share
    v[big] = rng.integers(16, top, size=int(big.sum()), dtype=width, endpoint=True) >> rng.integers(
        0, max(1, 8 * np.dtype(width).itemsize - 5), size=int(big.sum())).astype(width)
    v[big] = np.maximum(v[big], width(16))
    coded = {}
    saved = codec._FEW_RAW
    try:
        for few in (0, 10**9):  # always / never the lookup of the larger values alone
            codec._FEW_RAW = few
            out = codec._Out()
            codec._encode_uints(out, v)
            coded[few] = out.getvalue()
            for read_few in (0, 10**9):
                codec._FEW_RAW = read_few
                back = codec._decode_uints(codec._In(coded[few], "t"), n, width)
                assert back.dtype == width and np.array_equal(back, v)
    finally:
        codec._FEW_RAW = saved
    assert coded[0] == coded[10**9]
