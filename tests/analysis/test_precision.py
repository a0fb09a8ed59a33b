"""Precision view: ULP distances and grid spacing against a table of every representable value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _build import base_model, state, write
from rlsparse.analysis.precision import precision, spacing, ulp_distance
from rlsparse.errors import MismatchError
from rlsparse.io import dtypes


def _line(code: str):
    """Every finite value of a 16-bit dtype, sorted, with -0.0 and +0.0 merged: the obvious reference."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        vals = dtypes.widen(bits, code).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)])


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(["BF16", "F16"]), a=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=50),
       b=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=50))
def test_ulp_distance_and_spacing_equal_reference(code, a, b):
    n = min(len(a), len(b))
    ra, rb = np.array(a[:n], np.uint16), np.array(b[:n], np.uint16)
    fa, fb = dtypes.widen(ra, code).astype(np.float64), dtypes.widen(rb, code).astype(np.float64)
    ok = np.isfinite(fa) & np.isfinite(fb)
    line = _line(code)
    ia, ib = np.searchsorted(line, fa[ok]), np.searchsorted(line, fb[ok])
    assert np.array_equal(ulp_distance(ra[ok], rb[ok], code), np.abs(ia - ib).astype(np.uint64))
    sp = spacing(ra[ok], code)
    gaps = np.diff(line)
    up = np.append(gaps, np.inf)[ia]
    down = np.insert(gaps, 0, np.inf)[ia]
    assert np.array_equal(sp, np.minimum(up, down))


def test_known_ulp_moves(tmp_path):
    base, sd = base_model(tmp_path)
    ft = {k: v.clone() for k, v in sd.items()}
    name = "model.layers.0.mlp.down_proj.weight"
    bits = ft[name].view(torch.int16).view(-1)
    bits[0:5] += 1  # 5 elements one ULP away (same sign: the next stored value)
    bits[5:8] += 2
    bits[8:10] += 9
    w = ft[name].view(-1)
    w[10] = 0.0
    sd_zero = {k: v.clone() for k, v in sd.items()}
    sd_zero[name].view(-1)[10] = -0.0  # -0.0 -> +0.0 is no change
    w[11] = float("inf")
    base = write(sd_zero, base, tmp_path / "base0")
    ft_path = write(ft, base, tmp_path / "ft", shard="50KB")
    r = precision(base, ft_path, tolerances=[1e-6, 1e-5], chunk_elements=64)
    s = r.tensors[name]
    assert (s.changed, s.ulp1, s.ulp2, s.ulp3_plus, s.nonfinite_changed) == (10, 5, 3, 2, 1)
    t = r.total
    assert (t.changed, t.ulp1, t.ulp2, t.ulp3_plus) == (10, 5, 3, 2)
    # spacing fractions against the reference line of bf16 values
    line = _line("BF16")
    gaps = np.diff(line)
    all_sp = []
    for v in state(base).values():
        x = v.float().double().numpy().reshape(-1)
        i = np.searchsorted(line, x)
        all_sp.append(np.minimum(np.append(gaps, np.inf)[i], np.insert(gaps, 0, np.inf)[i]))
    sp = np.concatenate(all_sp)
    assert t.spacing_above == {"1e-06": int((sp > 1e-6).sum()), "1e-05": int((sp > 1e-5).sum())}
    assert t.numel == sp.size
    doc = r.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema_version"] == 1 and doc["tolerances"] == ["1e-06", "1e-05"]
    assert doc["total"]["spacing_above"]["1e-05"]["fraction"] == pytest.approx((sp > 1e-5).mean())
    assert set(doc["by_type"]) >= {"down", "norm"}


def test_refuses_different_dtypes(tmp_path):
    base, sd = base_model(tmp_path)
    other = write({k: v.float() for k, v in sd.items()}, base, tmp_path / "f32", dtype=torch.float32)
    with pytest.raises(MismatchError, match="dtypes differ"):
        precision(base, other)
