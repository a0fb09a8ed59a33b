"""The compiled (numba) decoder of sparse ULP-step chunks writes the very bits numpy's does."""

from __future__ import annotations

from pathlib import Path

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlsparse.delta as delta
from rlsparse.delta import codec
from rlsparse.errors import PatchError

from deltahelpers import assert_bit_identical, bits_of, bits_tensor, change, load, random_bits, write

apply_mod = importlib.import_module("rlsparse.delta.apply")  # the package exports the function under that name
compiled = pytest.importorskip("rlsparse.delta.compiled", reason="numba (the `delta` extra) is not installed")

WIDTHS = [np.uint8, np.uint16, np.uint32]


def _dtypes_seen(monkeypatch, name: str, arg: int) -> list:
    """Wrap ``compiled.<name>`` so that each call records the dtype of its ``arg``-th argument."""
    used, real = [], getattr(compiled, name)

    def counting(*args):
        used.append(args[arg].dtype)
        return real(*args)

    monkeypatch.setattr(compiled, name, counting)
    return used


@settings(max_examples=80, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 20000), density=st.sampled_from([0.0005, 0.02, 0.2, 0.3]),
       steps=st.sampled_from([3, 300, 70000]), is_float=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_compiled_sparse_delta_decode_equals_numpy(width, n, density, steps, is_float, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(width)
    old = rng.integers(0, info.max, size=n, dtype=width, endpoint=True)
    old[: min(n, 4)] = np.array([0, 1 << (8 * old.itemsize - 1), info.max, 1], dtype=np.uint64)[: min(n, 4)]  # +-0, NaN-ish
    idx = np.flatnonzero(rng.random(n) < density)
    # steps of either sign, small (ULPs) to large (raw bits in many groups), wrapping across zero
    z = codec.zigzag(rng.integers(-steps, steps + 1, size=idx.size).astype(np.int64).astype(width))
    new = old.copy()
    new[idx] = codec.apply_ulp_delta(old[idx], z, is_float)
    enc, changed, data = codec.encode_chunk(old, new, is_float)
    if enc != codec.SPARSE_DELTA:
        return  # only sparse ULP steps have a compiled decoder (the others decode as before)
    by_numpy = codec.decode_chunk(enc, data, old, n, width, is_float, "t")
    by_compiled = codec.decode_chunk(enc, data, old, n, width, is_float, "t", compiled=compiled.sparse_delta_apply)
    assert by_compiled.dtype == width and np.array_equal(by_compiled, by_numpy) and np.array_equal(by_compiled, new)
    scratch = old.copy()
    assert codec.decode_chunk(enc, data, scratch, n, width, is_float, "t", inplace=True,
                              compiled=compiled.sparse_delta_apply) is scratch
    assert np.array_equal(scratch, new)


def test_compiled_decoder_refuses_positions_outside_the_chunk():
    rng = np.random.default_rng(5)
    old = rng.integers(0, 2**16, size=6000, dtype=np.uint16)
    new = old.copy()
    new[::41] += np.uint16(1)
    enc, k, data = codec.encode_chunk(old, new, True)
    assert enc == codec.SPARSE_DELTA
    short = old[:3000].copy()  # the same code read as a shorter chunk: positions run past its end
    for decoder in (None, compiled.sparse_delta_apply):
        with pytest.raises(PatchError, match="corrupt"):
            codec.decode_chunk(enc, data, short, short.size, np.uint16, True, "t", compiled=decoder)


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_apply_with_the_compiled_decoder_is_bit_exact(tmp_path: Path, monkeypatch, parallel):
    rng = np.random.default_rng(11)
    base_t, ft_t = {}, {}
    for i, (code, n) in enumerate([("BF16", 70000), ("F32", 30000), ("F16", 20000), ("F8_E4M3", 9000)]):
        a = random_bits(rng, code, n, small=True)
        base_t[f"t{i}"] = bits_tensor(a, code, (n // 10, 10))
        ft_t[f"t{i}"] = bits_tensor(change(rng, a, 0.2, ulps=True), code, (n // 10, 10))
    base, ft = write(tmp_path / "base", base_t), write(tmp_path / "ft", ft_t)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=8192)
    monkeypatch.setattr(apply_mod, "COMPILED_FROM", 0)
    used = _dtypes_seen(monkeypatch, "sparse_delta_apply", 0)
    delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out", parallel=parallel, workers=2)
    assert_bit_identical(load(tmp_path / "out"), ft_t)
    if parallel == "threads":  # (forked workers count in their own memory)
        assert {np.dtype(d) for d in used} >= {np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint8)}
    monkeypatch.setattr(apply_mod, "COMPILED_FROM", 10**12)  # numpy only: the same files
    delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out2", parallel=parallel, workers=2)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "out2").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


pack_mod = importlib.import_module("rlsparse.delta.pack")


@settings(max_examples=120, deadline=None)
@given(width=st.sampled_from(WIDTHS), n=st.integers(1, 20000), density=st.sampled_from([0.0005, 0.02, 0.2, 0.45]),
       steps=st.sampled_from([3, 300, 70000, 2**31]), is_float=st.booleans(), new_bits=st.booleans(),
       readonly=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_compiled_encoder_writes_the_bytes_numpy_writes(width, n, density, steps, is_float, new_bits, readonly, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(width)
    old = rng.integers(0, info.max, size=n, dtype=width, endpoint=True)
    old[: min(n, 4)] = np.array([0, 1 << (8 * old.itemsize - 1), info.max, 1], dtype=np.uint64)[: min(n, 4)]  # +-0, NaN-ish
    idx = np.flatnonzero(rng.random(n) < density)
    new = old.copy()
    if new_bits:  # arbitrary new bits (sparse-bits territory)
        new[idx] = rng.integers(0, info.max, size=idx.size, dtype=width, endpoint=True)
    else:  # steps of either sign, small (ULPs) to large (raw bits in many groups), wrapping across zero
        z = codec.zigzag(rng.integers(-steps, steps + 1, size=idx.size).astype(np.int64).astype(width))
        new[idx] = codec.apply_ulp_delta(old[idx], z, is_float)
    if readonly:  # pack codes read-only views of page-cache maps
        old.flags.writeable = False
        new.flags.writeable = False
    by_numpy = codec.encode_chunk(old, new, is_float)
    assert codec.encode_chunk(old, new, is_float, compiled=compiled.sparse_delta_symbols) == by_numpy


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_pack_with_the_compiled_encoder_writes_the_same_patch(tmp_path: Path, monkeypatch, parallel):
    rng = np.random.default_rng(12)
    base_t, ft_t = {}, {}
    for i, (code, n, density) in enumerate([("BF16", 70000, 0.2), ("F32", 30000, 0.01), ("F16", 20000, 0.3),
                                            ("F8_E4M3", 9000, 0.05), ("I64", 5000, 0.1)]):
        a = random_bits(rng, code, n, small=True)
        base_t[f"t{i}"] = bits_tensor(a, code, (n // 10, 10))
        ft_t[f"t{i}"] = bits_tensor(change(rng, a, density, ulps=True), code, (n // 10, 10))
    base, ft = write(tmp_path / "base", base_t), write(tmp_path / "ft", ft_t)
    monkeypatch.setattr(pack_mod, "COMPILED_PACK_FROM", 0)
    used = _dtypes_seen(monkeypatch, "sparse_delta_symbols", 1)
    delta.pack(base, ft, tmp_path / "compiled.rlpatch", chunk_elements=8192, parallel=parallel, workers=2)
    if parallel == "threads":  # (forked workers count in their own memory)
        assert {np.dtype(d) for d in used} == {np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint8)}
    monkeypatch.setattr(pack_mod, "COMPILED_PACK_FROM", 10**15)  # numpy only
    delta.pack(base, ft, tmp_path / "numpy.rlpatch", chunk_elements=8192, parallel=parallel, workers=2)
    assert (tmp_path / "compiled.rlpatch").read_bytes() == (tmp_path / "numpy.rlpatch").read_bytes()
    delta.apply(base, tmp_path / "compiled.rlpatch", tmp_path / "out")
    assert_bit_identical(load(tmp_path / "out"), ft_t)


def test_pack_estimates_the_changed_elements_from_a_sample(tmp_path: Path, monkeypatch):
    # Whether pack loads the compiled encoder depends on the changes it expects; where the
    # sample's windows cover every tensor the estimate is the exact count.
    rng = np.random.default_rng(13)
    base_t, ft_t = {}, {}
    for i, (code, n, density) in enumerate([("BF16", 6000, 0.3), ("F32", 3000, 0.01), ("F16", 2000, 0.0)]):
        a = random_bits(rng, code, n, small=True)
        base_t[f"t{i}"] = bits_tensor(a, code, (n // 10, 10))
        ft_t[f"t{i}"] = bits_tensor(change(rng, a, density, ulps=True), code, (n // 10, 10))
    base, ft = write(tmp_path / "base", base_t), write(tmp_path / "ft", ft_t)
    from rlsparse.delta.sources import open_source

    items = pack_mod._plan(open_source(base), open_source(ft))[1]
    exact = sum(int(np.count_nonzero(bits_of(base_t[k]).numpy() != bits_of(ft_t[k]).numpy())) for k in base_t)
    assert exact > 0 and pack_mod._sampled_changes(items) == exact
    monkeypatch.setattr(pack_mod, "COMPILED_PACK_FROM", exact + 1)
    assert pack_mod._compiled_encoder(items) is None
    monkeypatch.setattr(pack_mod, "COMPILED_PACK_FROM", exact)
    assert pack_mod._compiled_encoder(items) is compiled.sparse_delta_symbols
