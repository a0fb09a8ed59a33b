"""The C kernels (``delta/_kernels.c``) code and decode the very bytes numpy's paths do, and
refuse damaged data and wrong arguments without touching memory outside their buffers."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlsparse.delta as delta
from rlsparse.delta import codec, compiled
from rlsparse.errors import PatchError

from deltahelpers import assert_bit_identical, bits_tensor, change, load, random_bits, write

kernels = pytest.importorskip("rlsparse.delta._kernels",
                              reason="the C kernels are not built: python setup.py build_ext --inplace")

WIDTHS = [np.uint8, np.uint16, np.uint32]


def _dtypes_seen(monkeypatch) -> dict[str, list]:
    """Replace ``compiled.KERNELS`` by wrappers of the kernels that record, per kernel, the dtype
    of each call's array of elements."""
    arg = {"sparse_delta_apply": 0, "sparse_delta_symbols": 1, "changed_positions": 1, "pack_raw_bits": 1,
           "raw_layout": 0, "pack_nibbles": 0, "scan_symbols16": 0}
    used: dict[str, list] = {name: [] for name in arg}

    def spy(name):
        def counting(*args):
            used[name].append(args[arg[name]].dtype)
            return getattr(kernels, name)(*args)
        return counting

    monkeypatch.setattr(compiled, "KERNELS", types.SimpleNamespace(**{name: spy(name) for name in arg}))
    return used


def _chunk(rng, width, n, density, steps, is_float, new_bits=False):
    """(old, new): random base bits with +-0 and NaN-like patterns, changed at ``density``."""
    info = np.iinfo(width)
    old = rng.integers(0, info.max, size=n, dtype=width, endpoint=True)
    old[: min(n, 4)] = np.array([0, 1 << (8 * old.itemsize - 1), info.max, 1], dtype=np.uint64)[: min(n, 4)]
    idx = np.flatnonzero(rng.random(n) < density)
    new = old.copy()
    if new_bits:  # arbitrary new bits (sparse-bits territory)
        new[idx] = rng.integers(0, info.max, size=idx.size, dtype=width, endpoint=True)
    else:  # steps of either sign, small (ULPs) to large (raw bits in many groups), wrapping across zero
        z = codec.zigzag(rng.integers(-steps, steps + 1, size=idx.size).astype(np.int64).astype(width))
        new[idx] = codec.apply_ulp_delta(old[idx], z, is_float)
    return old, new


def test_the_kernels_are_the_c_module_where_built():
    assert compiled.KERNELS is kernels and compiled.name() == "C"


@settings(max_examples=80, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 20000), density=st.sampled_from([0.0005, 0.02, 0.2, 0.3]),
       steps=st.sampled_from([3, 300, 70000, 2**31]), is_float=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_c_sparse_delta_decode_equals_numpy(width, n, density, steps, is_float, seed):
    old, new = _chunk(np.random.default_rng(seed), width, n, density, steps, is_float)
    enc, changed, data = codec.encode_chunk(old, new, is_float)
    if enc != codec.SPARSE_DELTA:
        return  # only sparse ULP steps have a compiled decoder (the others decode as before)
    by_numpy = codec.decode_chunk(enc, data, old, n, width, is_float, "t")
    by_c = codec.decode_chunk(enc, data, old, n, width, is_float, "t", compiled=kernels)
    assert by_c.dtype == width and np.array_equal(by_c, by_numpy) and np.array_equal(by_c, new)
    scratch = old.copy()
    assert codec.decode_chunk(enc, data, scratch, n, width, is_float, "t", inplace=True,
                              compiled=kernels) is scratch
    assert np.array_equal(scratch, new)


@settings(max_examples=120, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 20000), density=st.sampled_from([0.0005, 0.02, 0.2, 0.45]),
       steps=st.sampled_from([3, 300, 70000, 2**31]), is_float=st.booleans(), new_bits=st.booleans(),
       readonly=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_c_encoder_writes_the_bytes_numpy_writes(width, n, density, steps, is_float, new_bits, readonly, seed):
    old, new = _chunk(np.random.default_rng(seed), width, n, density, steps, is_float, new_bits)
    if readonly:  # pack codes read-only views of page-cache maps
        old.flags.writeable = False
        new.flags.writeable = False
    by_numpy = codec.encode_chunk(old, new, is_float)
    assert codec.encode_chunk(old, new, is_float, compiled=kernels) == by_numpy


def _outcome(fn):
    try:
        return fn()
    except PatchError:
        return "PatchError"


@settings(max_examples=150, deadline=None)
@given(width=st.sampled_from(WIDTHS), density=st.sampled_from([0.002, 0.05, 0.3]), steps=st.sampled_from([3, 70000]),
       cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_c_decoder_on_damaged_data_does_what_numpy_does(width, density, steps, cut, flips, seed):
    # truncated or corrupted chunks: the same bits or the same one-line PatchError on both paths
    old, new = _chunk(np.random.default_rng(seed), width, 3000, density, steps, True)
    enc, _, data = codec.encode_chunk(old, new, True)
    if enc != codec.SPARSE_DELTA:
        return
    bad = bytearray(data[: len(data) - cut % (len(data) + 1)])
    for at, x in flips:
        if bad:
            bad[at % len(bad)] ^= x
    bad = bytes(bad)
    by_numpy = _outcome(lambda: codec.decode_chunk(enc, bad, old, old.size, width, True, "t"))
    by_c = _outcome(lambda: codec.decode_chunk(enc, bad, old, old.size, width, True, "t",
                                               compiled=kernels))
    assert isinstance(by_c, str) == isinstance(by_numpy, str)
    if not isinstance(by_c, str):
        assert np.array_equal(by_c, by_numpy)


def test_c_decoder_refuses_positions_outside_the_chunk():
    rng = np.random.default_rng(5)
    old = rng.integers(0, 2**16, size=6000, dtype=np.uint16)
    new = old.copy()
    new[::41] += np.uint16(1)
    enc, k, data = codec.encode_chunk(old, new, True)
    assert enc == codec.SPARSE_DELTA
    short = old[:3000].copy()  # the same code read as a shorter chunk: positions run past its end
    for decoder in (None, kernels):
        with pytest.raises(PatchError, match="corrupt"):
            codec.decode_chunk(enc, data, short, short.size, np.uint16, True, "t", compiled=decoder)


def _streams(old, new, is_float):
    """A SPARSE_DELTA chunk's arguments to the decoder, as ``codec.decode_chunk`` reads them."""
    enc, k, data = codec.encode_chunk(old, new, is_float)
    assert enc == codec.SPARSE_DELTA
    inp = codec._In(data, "t")
    assert inp.varint() == k
    width = 8 * old.itemsize
    return codec._symbols_and_raw(inp, k, 64, 2, kernels), codec._symbols_and_raw(inp, k, width, 2, kernels)


def test_c_decoder_refuses_raw_bits_past_their_bytes():
    # the kernel called directly with a stream cut short: False, no read past the buffer
    rng = np.random.default_rng(6)
    old = rng.integers(0, 2**32, size=50000, dtype=np.uint32)
    new = old.copy()
    new[::97] += rng.integers(1, 2**20, size=new[::97].size, dtype=np.uint32)  # wide ULP steps: many raw bits
    (gsym, graw, gstart), (dsym, draw, dstart) = _streams(old, new, False)
    args = (codec._SYM_BASE, codec._SYM_NBITS, 32, False)
    out = old.copy()
    assert kernels.sparse_delta_apply(out, gsym, graw, gstart, dsym, draw, dstart, *args)
    assert np.array_equal(out, new)
    for cut_g, cut_d in ((1, 0), (0, 1), (graw.size, 0), (0, draw.size)):
        assert not kernels.sparse_delta_apply(old.copy(), gsym, graw[:graw.size - cut_g], gstart, dsym,
                                              draw[:draw.size - cut_d], dstart, *args)
    far = dstart.copy()
    far[far > 0] = -8  # a negative start reads as far beyond the bytes
    assert not kernels.sparse_delta_apply(old.copy(), gsym, graw, gstart, dsym, draw, far, *args)


def test_c_kernels_refuse_wrong_arguments():
    old = np.zeros(100, np.uint16)
    new = old.copy()
    new[[3, 50]] = 1
    (gsym, graw, gstart), (dsym, draw, dstart) = _streams(old, new, True)
    tail = (codec._SYM_BASE, codec._SYM_NBITS)
    decode = kernels.sparse_delta_apply
    with pytest.raises(ValueError, match="old has 16-bit elements and width is 32"):
        decode(old.copy(), gsym, graw, gstart, dsym, draw, dstart, *tail, 32, True)
    with pytest.raises(ValueError, match="old must be a C-contiguous, writable"):
        ro = old.copy()
        ro.flags.writeable = False
        decode(ro, gsym, graw, gstart, dsym, draw, dstart, *tail, 16, True)
    with pytest.raises(ValueError, match="old has elements of 8 bytes"):
        decode(np.zeros(100, np.uint64), gsym, graw, gstart, dsym, draw, dstart, *tail, 64, True)
    with pytest.raises(ValueError, match="gstart has elements of 8 bytes .* and 64 of them"):
        decode(old.copy(), gsym, graw, gstart[:64], dsym, draw, dstart, *tail, 16, True)
    with pytest.raises(ValueError, match="two symbol streams have 2 and 1 values"):
        decode(old.copy(), gsym, graw, gstart, dsym[:1], draw, dstart, *tail, 16, True)
    with pytest.raises(ValueError, match="must be a C-contiguous"):
        decode(np.zeros(200, np.uint16)[::2], gsym, graw, gstart, dsym, draw, dstart, *tail, 16, True)
    with pytest.raises(ValueError, match="sym_base has elements of 4 bytes"):
        decode(old.copy(), gsym, graw, gstart, dsym, draw, dstart, codec._SYM_BASE.astype(np.uint32), tail[1], 16, True)

    def encode(idx, values=None, counts=256):
        k = idx.size
        streams = [(np.empty(k, np.uint8), np.empty(k, np.intp), np.empty(k, np.uint8), np.empty(k, np.uint32),
                    np.zeros(counts, np.int64)) for _ in range(2)]
        values = np.empty(k, np.uint16) if values is None else values
        return kernels.sparse_delta_symbols(old, new, idx, codec._BITLEN16, 16, True, *streams[0], *streams[1],
                                            values, np.zeros((2, 256), np.int64))

    assert encode(np.array([3, 50], np.intp)) == (1, 0)  # the gap 46 has raw bits; the steps of one ULP none
    for idx in ([50, 3], [3, 3], [3, 100], [-1, 3]):
        with pytest.raises(ValueError, match="idx must be ascending positions inside the chunk"):
            encode(np.array(idx, np.intp))
    with pytest.raises(ValueError, match="gcounts has elements of 8 bytes .* and 255 of them"):
        encode(np.array([3, 50], np.intp), counts=255)
    with pytest.raises(ValueError, match="found 2-, 2- and 1-byte elements"):
        encode(np.array([3, 50], np.intp), values=np.empty(2, np.uint8))


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_apply_with_the_c_decoder_is_bit_exact(tmp_path: Path, monkeypatch, parallel):
    rng = np.random.default_rng(11)
    base_t, ft_t = {}, {}
    for i, (code, n) in enumerate([("BF16", 70000), ("F32", 30000), ("F16", 20000), ("F8_E4M3", 9000)]):
        a = random_bits(rng, code, n, small=True)
        base_t[f"t{i}"] = bits_tensor(a, code, (n // 10, 10))
        ft_t[f"t{i}"] = bits_tensor(change(rng, a, 0.2, ulps=True), code, (n // 10, 10))
    base, ft = write(tmp_path / "base", base_t), write(tmp_path / "ft", ft_t)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=8192)
    used = _dtypes_seen(monkeypatch)["sparse_delta_apply"]
    delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out", parallel=parallel, workers=2)
    assert_bit_identical(load(tmp_path / "out"), ft_t)
    if parallel == "threads":  # (forked workers count in their own memory)
        assert {np.dtype(d) for d in used} >= {np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint8)}
    monkeypatch.setattr(compiled, "KERNELS", None)  # numpy only: the same files
    delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out2", parallel=parallel, workers=2)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "out2").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_pack_with_the_c_encoder_writes_the_same_patch(tmp_path: Path, monkeypatch, parallel):
    rng = np.random.default_rng(12)
    base_t, ft_t = {}, {}
    for i, (code, n, density) in enumerate([("BF16", 70000, 0.2), ("F32", 30000, 0.01), ("F16", 20000, 0.3),
                                            ("F8_E4M3", 9000, 0.05), ("I64", 5000, 0.1)]):
        a = random_bits(rng, code, n, small=True)
        base_t[f"t{i}"] = bits_tensor(a, code, (n // 10, 10))
        ft_t[f"t{i}"] = bits_tensor(change(rng, a, density, ulps=True), code, (n // 10, 10))
    base, ft = write(tmp_path / "base", base_t), write(tmp_path / "ft", ft_t)
    used = _dtypes_seen(monkeypatch)
    delta.pack(base, ft, tmp_path / "c.rlpatch", chunk_elements=8192, parallel=parallel, workers=2)
    if parallel == "threads":  # (forked workers count in their own memory)
        # 2-byte elements are found and coded block by block (scan_symbols16), the others in two passes
        assert {np.dtype(d) for d in used["sparse_delta_symbols"]} == {np.dtype(np.uint32), np.dtype(np.uint8)}
        assert {np.dtype(d) for d in used["scan_symbols16"]} == {np.dtype(np.uint16)}
        assert np.dtype(np.uint64) in {np.dtype(d) for d in used["changed_positions"]}  # the I64 tensor too
        assert used["pack_raw_bits"] and used["pack_nibbles"]
    monkeypatch.setattr(compiled, "KERNELS", None)  # numpy only
    delta.pack(base, ft, tmp_path / "numpy.rlpatch", chunk_elements=8192, parallel=parallel, workers=2)
    assert (tmp_path / "c.rlpatch").read_bytes() == (tmp_path / "numpy.rlpatch").read_bytes()
    delta.apply(base, tmp_path / "c.rlpatch", tmp_path / "out")
    assert_bit_identical(load(tmp_path / "out"), ft_t)


def test_state_dict_pack_and_apply_use_the_c_kernels(monkeypatch):
    # weight sync codes in memory: the same kernels as files, the same bytes as numpy
    rng = np.random.default_rng(14)
    a, f = random_bits(rng, "BF16", 40000, small=True), random_bits(rng, "F32", 20000, small=True)
    base = {"w": bits_tensor(a, "BF16", (400, 100)), "v": bits_tensor(f, "F32", (200, 100))}
    ft = {"w": bits_tensor(change(rng, a, 0.05, ulps=True), "BF16", (400, 100)),
          "v": bits_tensor(change(rng, f, 0.05, ulps=True), "F32", (200, 100))}
    used = _dtypes_seen(monkeypatch)
    by_c = delta.pack(base, ft, chunk_elements=8192).data
    sd = {name: t.clone() for name, t in base.items()}
    delta.apply_to_state_dict(sd, by_c)
    assert_bit_identical(sd, ft)
    assert all(used.values())
    monkeypatch.setattr(compiled, "KERNELS", None)
    assert delta.pack(base, ft, chunk_elements=8192).data == by_c


@settings(max_examples=150, deadline=None)
@given(width=st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]), n=st.integers(0, 1000),
       density=st.sampled_from([0.0, 0.003, 0.1, 0.9, 1.0]), offset=st.integers(0, 2**40), seed=st.integers(0, 2**31 - 1))
def test_c_changed_positions_equal_numpy(width, n, density, offset, seed):
    rng = np.random.default_rng(seed)
    old = rng.integers(0, np.iinfo(width).max, size=n, dtype=width, endpoint=True)
    new = old.copy()
    where = rng.random(n) < density
    new[where] ^= rng.integers(1, np.iinfo(width).max, size=int(where.sum()), dtype=width, endpoint=True)
    out = np.full(n + 3, -1, np.int64)
    k = kernels.changed_positions(old, new, out, offset)
    assert np.array_equal(out[:k], np.flatnonzero(old != new) + offset)
    assert (out[n:] == -1).all()  # nothing written past the first n slots


def test_c_changed_positions_refuse_wrong_arguments():
    old = np.zeros(100, np.uint16)
    out = np.zeros(100, np.int64)
    with pytest.raises(ValueError, match="out at least as long"):
        kernels.changed_positions(old, old, out[:99], 0)
    with pytest.raises(ValueError, match="old and new must be the same width and length"):
        kernels.changed_positions(old, old[:99], out, 0)
    with pytest.raises(ValueError, match="old and new must be the same width"):
        kernels.changed_positions(old, np.zeros(100, np.uint32), out, 0)
    with pytest.raises(ValueError, match="out has elements of 4 bytes"):
        kernels.changed_positions(old, old, out.astype(np.int32), 0)
    with pytest.raises(ValueError, match="out must be a C-contiguous, writable"):
        ro = out.copy()
        ro.flags.writeable = False
        kernels.changed_positions(old, old, ro, 0)
    with pytest.raises(ValueError, match="old has elements of 8 bytes .format d"):
        kernels.changed_positions(np.zeros(100), np.zeros(100), out, 0)  # floats: compare their bits instead


@settings(max_examples=150, deadline=None)
@given(m=st.integers(0, 3000), top=st.sampled_from([3, 12, 29, 61]), extra_width=st.sampled_from([np.uint16, np.uint32,
       np.uint64]), seed=st.integers(0, 2**31 - 1))
def test_c_raw_bit_packing_equals_numpy(m, top, extra_width, seed):
    # every group (0-61 raw bits, values wider than their count) as _encode_uints packs them with numpy
    rng = np.random.default_rng(seed)
    nbits = rng.integers(0, top + 1, size=m).astype(np.uint8)
    if extra_width != np.uint64:
        nbits = np.minimum(nbits, 8 * np.dtype(extra_width).itemsize).astype(np.uint8)
    extra = rng.integers(0, np.iinfo(extra_width).max, size=m, dtype=extra_width, endpoint=True)
    by_numpy = b"".join(codec._pack_bits(extra[nbits == k] & extra_width((1 << int(k)) - 1) if k < 64 else
                                         extra[nbits == k], int(k))
                        for k in np.unique(nbits) if k)
    assert kernels.pack_raw_bits(nbits, extra) == by_numpy


def test_c_raw_bit_packing_refuses_wrong_arguments():
    with pytest.raises(ValueError, match="nbits has 3 values and extra 2"):
        kernels.pack_raw_bits(np.ones(3, np.uint8), np.ones(2, np.uint32))
    with pytest.raises(ValueError, match=r"nbits\[1\] is 62; expected at most 61"):
        kernels.pack_raw_bits(np.array([1, 62], np.uint8), np.ones(2, np.uint64))


@settings(max_examples=150, deadline=None)
@given(m=st.integers(0, 2000), top=st.sampled_from([15, 40, 120, 255]), width_bits=st.sampled_from([8, 16, 32, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_c_raw_layout_equals_numpy(m, top, width_bits, seed):
    # where a stream's raw bits lie, and the refusal of symbols too wide for the values: as _take_raw
    sym = np.random.default_rng(seed).integers(0, top + 1, size=m).astype(np.uint8)
    counts = np.bincount(codec._SYM_NBITS, weights=np.bincount(sym, minlength=256), minlength=65).astype(np.int64)
    data = bytes(range(256)) * 200
    try:
        raw, first_byte = codec._take_raw(codec._In(data, "t"), counts, width_bits)
    except PatchError:
        raw = None
    start = np.full(65, -7, np.int64)
    nbytes = kernels.raw_layout(sym, codec._SYM_NBITS, width_bits, start)
    if raw is None:
        assert nbytes == -1
    else:
        assert nbytes == raw.size and np.array_equal(start, first_byte * 8)


def _per_value(stream, k: int) -> tuple:
    """A stream as (symbols, raw-bit count and raw bits of every value, histogram), whichever way
    its raw bits are listed (for every value, or only where a value has some)."""
    sym, (where, nbits, extra), counts = stream
    full_nbits, full_extra = np.zeros(k, np.uint8), np.zeros(k, np.uint64)
    at = np.arange(k) if where is None else where
    full_nbits[at], full_extra[at] = nbits, extra
    return sym.tolist(), full_nbits.tolist(), full_extra.tolist(), counts.tolist()


def _numpy_streams(old, new, is_float) -> tuple:
    idx = np.flatnonzero(old != new)
    gaps = codec._symbolize((np.diff(idx, prepend=-1) - 1).astype(np.uint32))
    delta = codec._symbolize(codec.ulp_delta(old[idx], new[idx], is_float))
    return idx.size, gaps, delta, new[idx], codec.estimate_planes(new[idx])


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 20000), density=st.sampled_from([0.0005, 0.02, 0.2, 0.45, 0.7]),
       steps=st.sampled_from([3, 300, 70000]), is_float=st.booleans(), new_bits=st.booleans(), readonly=st.booleans(),
       block=st.sampled_from([1, 63, 64, 1000, 1 << 17]), seed=st.integers(0, 2**31 - 1))
def test_c_2byte_symbols_and_scan_equal_numpy(n, density, steps, is_float, new_bits, readonly, block, seed):
    # the 2-byte loop of sparse_delta_symbols and the block-by-block scan_symbols16 make numpy's
    # streams (every symbol, every value's raw bits, the histograms), new bits and plane estimate
    old, new = _chunk(np.random.default_rng(seed), np.uint16, n, density, steps, is_float, new_bits)
    if readonly:
        old.flags.writeable = False
        new.flags.writeable = False
    k, gaps, delta, values, planes = _numpy_streams(old, new, is_float)
    scan = codec.SparseScan(kernels, n, is_float)
    for a in range(0, n, block):  # blocks of any size, ending anywhere
        scan.add(old[a:a + block], new[a:a + block], a)
    assert scan.changed == k
    by_c = [codec._sparse_symbols(kernels, old, new, np.flatnonzero(old != new), is_float)]
    if k <= n // 2:  # more: no sparse encoding, so the scan only counts them
        by_c.append(scan.symbols())
    for c_gaps, c_delta, c_values, c_planes in by_c:
        assert _per_value(c_gaps, k) == _per_value(gaps, k) and _per_value(c_delta, k) == _per_value(delta, k)
        assert np.array_equal(c_values, values) and c_planes == pytest.approx(planes, rel=1e-12)
    by_numpy = codec.encode_chunk(old, new, is_float)
    assert codec.encode_chunk(old, new, is_float, compiled=kernels, scan=scan) == by_numpy


def test_c_scan_refuses_wrong_arguments():
    old = np.zeros(100, np.uint16)
    new = old.copy()
    new[[3, 50]] = 1
    k = 50

    def scan(o=old, w=new, offset=0, limit=k, state=None, values=None, gsym=None):
        streams = [(np.empty(k, np.uint8), np.empty(k, np.intp), np.empty(k, np.uint8), np.empty(k, np.uint32),
                    np.zeros(256, np.int64)) for _ in range(2)]
        if gsym is not None:
            streams[0] = (gsym, *streams[0][1:])
        state = np.array([0, 0, 0, -1], np.int64) if state is None else np.array(state, np.int64)
        values = np.empty(k, np.uint16) if values is None else values
        kernels.scan_symbols16(o, w, offset, limit, True, state, *streams[0], *streams[1], values,
                               np.zeros((2, 256), np.int64))
        return state.tolist()

    assert scan() == [2, 1, 0, 50]  # the gap 46 has raw bits; the steps of one ULP none
    assert scan(limit=1) == [2, 0, 0, 50]  # the second change counted, not coded
    assert scan(o=old[50:], w=new[50:], offset=50, state=[1, 0, 0, 3]) == [2, 1, 0, 50]  # a second block
    for state, offset in (([0, 0, 0, 5], 5), ([1, 0, 0, -1], 0), ([2, 3, 0, 10], 20), ([-1, 0, 0, -1], 0),
                          ([0, 0, 0, -1], -3), ([5, 0, 0, 2], 10)):
        with pytest.raises(ValueError, match="state must be a chunk's"):
            scan(state=state, offset=offset)
    with pytest.raises(ValueError, match="gsym has elements of 1 bytes .* and 49 of them"):
        scan(gsym=np.empty(49, np.uint8))
    with pytest.raises(ValueError, match="values has elements of 4 bytes"):
        scan(values=np.empty(k, np.uint32))
    with pytest.raises(ValueError, match="old has 100 elements and new 99"):
        scan(w=new[:99])
    with pytest.raises(ValueError, match="old has elements of 4 bytes"):
        scan(o=old.astype(np.uint32), w=new.astype(np.uint32))
    with pytest.raises(ValueError, match="limit is -1"):
        scan(limit=-1)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(0, 5000), seed=st.integers(0, 2**31 - 1))
def test_c_nibble_packing_equals_numpy(m, seed):
    sym = np.random.default_rng(seed).integers(0, 16, size=m).astype(np.uint8)
    out_c, out_numpy = codec._Out(), codec._Out()
    counts = np.bincount(sym, minlength=256)
    codec._encode_symbols_zstd(out_c, sym, counts, kernels)
    codec._encode_symbols_zstd(out_numpy, sym, counts)
    assert out_c.getvalue() == out_numpy.getvalue()
    padded = np.append(sym, np.uint8(0)) if m % 2 else sym
    assert kernels.pack_nibbles(sym) == (padded[0::2] | (padded[1::2] << np.uint8(4))).tobytes()
