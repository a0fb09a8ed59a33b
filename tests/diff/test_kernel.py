"""The comparison kernel against a brute-force reference on random inputs."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymodels import brute_changed
from rlsparse.diff.kernel import Accumulator, ChunkSpec, compare_chunk, float32_threshold, hist_edges
from rlsparse.io import dtypes

TOLS = [0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-3, 0.5]
SPECIAL = {
    "BF16": [0x0000, 0x8000, 0x7FC0, 0xFFC1, 0x7F80, 0xFF80, 0x0001, 0x3F80],  # +0,-0,NaN,NaN,+inf,-inf,denorm,1
    "F16": [0x0000, 0x8000, 0x7E00, 0x7C00, 0xFC00, 0x0001, 0x3C00],
    "F32": [0x00000000, 0x80000000, 0x7FC00000, 0x7F800000, 0xFF800000, 0x00000001, 0x3F800000],
}


def _random_pair(rng, code, n, density):
    width = dtypes.itemsize(code)
    u = dtypes.uint_view(code)
    if code == "F32":
        a = rng.standard_normal(n).astype(np.float32).view(u)
    else:
        a = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtypes.torch_dtype(code)).view(
            {2: torch.int16}[width]).numpy().view(u)
    b = a.copy()
    k = int(n * density)
    idx = rng.choice(n, size=k, replace=False)
    # nudges of 1..3 units in the last place, plus some large changes
    b[idx] = (b[idx].astype(np.int64) + rng.integers(1, 4, size=k)).astype(u)
    big = idx[: k // 4]
    fb = dtypes.widen(b[big], code) * 1.5 + 0.01
    b[big] = torch.from_numpy(fb.astype(np.float32)).to(dtypes.torch_dtype(code)).view(
        {2: torch.int16, 4: torch.int32}[width]).numpy().view(u)
    specials = np.array(SPECIAL[code], dtype=u)
    pos = rng.choice(n, size=min(n, 2 * len(specials)), replace=False)
    a[pos] = rng.choice(specials, size=pos.size)
    b[pos] = rng.choice(specials, size=pos.size)
    return a, b


def _torch_view(raw, code):
    width = dtypes.itemsize(code)
    return torch.from_numpy(raw.view({2: np.int16, 4: np.int32}[width]).copy()).view(dtypes.torch_dtype(code))


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(["BF16", "F16", "F32"]), n=st.integers(1, 3000), density=st.floats(0, 1),
       seed=st.integers(0, 2**31), mask_t=st.sampled_from(TOLS))
def test_counts_and_mask_equal_brute_force(code, n, density, seed, mask_t):
    rng = np.random.default_rng(seed)
    a, b = _random_pair(rng, code, n, density)
    acc = Accumulator(ntol=len(TOLS))
    thr = np.array([float32_threshold(t) for t in TOLS], dtype=np.float32)
    res = compare_chunk(a, b, ChunkSpec(code, code), thr, float32_threshold(mask_t))
    acc.add(res)
    packed = res.packed
    ta, tb = _torch_view(a, code), _torch_view(b, code)
    for j, t in enumerate(TOLS):
        assert acc.changed[j] == int(brute_changed(ta, tb, t).sum()), (code, t)
    assert acc.bit_changed == int(np.count_nonzero(a != b))
    bits = np.unpackbits(packed, count=n, bitorder="little").astype(bool)
    assert np.array_equal(bits, brute_changed(ta, tb, mask_t).numpy())
    assert acc.nan_base == int(ta.float().isnan().sum()) and acc.inf_finetuned == int(tb.float().isinf().sum())
    assert int(acc.hist.sum()) == acc.changed[0]


def test_zero_signs_and_nans_are_unchanged_nan_on_one_side_is_changed():
    code = "BF16"
    a = np.array([0x0000, 0x7FC0, 0x7FC0, 0x3F80, 0x3F80, 0x7F80], dtype=np.uint16)
    b = np.array([0x8000, 0x7FC1, 0x3F80, 0x7FC0, 0x3F81, 0x7F80], dtype=np.uint16)
    acc = Accumulator(ntol=2)
    thr = np.array([float32_threshold(0.0), float32_threshold(1.0)], dtype=np.float32)
    res = compare_chunk(a, b, ChunkSpec(code, code), thr, float32_threshold(0.0))
    acc.add(res)
    packed = res.packed
    # -0/+0 equal; NaN/NaN equal; NaN vs 1 changed both ways at any tolerance; 1 ulp changed at 0 only
    assert list(np.unpackbits(packed, count=6, bitorder="little")) == [0, 0, 1, 1, 1, 0]
    assert list(acc.changed) == [3, 2]
    assert acc.bit_changed == 5
    assert (acc.nan_base, acc.nan_finetuned, acc.inf_base, acc.inf_finetuned) == (2, 2, 1, 1)


def test_threshold_is_exact_for_unrepresentable_tolerances():
    for t in [1e-5, 1e-8, 0.1, 3e-7]:
        thr = float32_threshold(t)
        below = np.nextafter(thr, np.float32(np.inf))
        assert float(thr) <= t < float(below) or float(thr) == t


def test_histogram_edges_are_float32_bit_boundaries():
    e = hist_edges()
    assert e[0] == 0.0 and e[1016] == 1.0  # 127 << 3 = 1016: exponent of 1.0
    assert e[1017] == 1.125


def test_numpy_dtype_conversions_match_torch():
    """The torch-free conversions (FP8 tables, bf16 rounding) equal torch's casts bit for bit."""
    bits = np.arange(256, dtype=np.uint8)
    for code in ("F8_E4M3", "F8_E5M2"):
        ref = torch.from_numpy(bits.copy()).view(dtypes.torch_dtype(code)).float().numpy()
        ours = dtypes.widen(bits, code)
        assert np.array_equal(ours.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
        assert np.array_equal(np.isnan(ours), np.isnan(ref))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-45], np.float32)]).astype(np.float32)
    for code in ("BF16", "F16"):
        ref = torch.from_numpy(x).to(dtypes.torch_dtype(code)).float().numpy()
        assert np.array_equal(dtypes.round_to(x, code).view(np.uint32), ref.view(np.uint32)), code
