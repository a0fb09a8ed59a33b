"""FP8 block-scaled checkpoints (e4m3 and e5m2, DeepSeek-V3 style) through every stream analysis,
against brute-force references on dequantised values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rlsparse
from tinymodels import brute_changed
from rlsparse.analysis.overlap import overlap_from_checkpoints
from rlsparse.analysis.precision import precision
from rlsparse.analysis.series import series
from rlsparse.io import dtypes

FORMATS = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SHAPES = {"model.layers.0.mlp.up_proj.weight": (200, 300), "model.layers.1.self_attn.q_proj.weight": (130, 64),
          "model.layers.0.self_attn.q_proj.weight": (64, 64)}
NORM = "model.layers.0.input_layernorm.weight"


def _base(fmt: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (r, c) in SHAPES.items():
        codes = torch.randint(0, 256, (r, c), generator=g, dtype=torch.uint8)
        codes[(codes & 0x7F) >= (0x7C if fmt == "F8_E5M2" else 0x7F)] = 0x11  # finite codes only
        sd[name] = codes.view(FORMATS[fmt])
        sd[name + "_scale_inv"] = torch.rand(-(-r // 128), -(-c // 128), generator=g) + 0.5
    sd[NORM] = torch.randn(32, generator=g).to(torch.bfloat16)
    return sd


def _step(sd: dict[str, torch.Tensor], seed: int, density: float = 0.1, rescale: bool = True) -> dict[str, torch.Tensor]:
    """A copy with random codes moved by +-1..3 and, optionally, one block's scale changed."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    for name in SHAPES:
        bits = out[name].view(torch.uint8)
        hit = torch.rand(bits.shape, generator=g) < density
        step = torch.randint(1, 4, bits.shape, generator=g, dtype=torch.uint8)
        moved = torch.where(hit, bits ^ step, bits)  # low mantissa bits flip: a nearby code, same sign
        out[name] = moved.view(sd[name].dtype)
        if rescale:
            s = out[name + "_scale_inv"]
            s.view(-1)[seed % s.numel()] *= 2
    out[NORM] = (sd[NORM].float() + (torch.rand(32, generator=g) < density).float()).to(torch.bfloat16)
    return out


def _save(sd: dict[str, torch.Tensor], path) -> str:
    path.mkdir(parents=True)
    names = sorted(sd)
    half = len(names) // 2  # two shards, scales possibly in another shard than their weights
    save_file({k: sd[k] for k in names[:half]}, str(path / "a.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(path / "b.safetensors"))
    import json

    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a.safetensors" if k in names[:half] else "b.safetensors") for k in names}}))
    return str(path)


def _deq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in [*SHAPES, NORM]:
        w = sd[name]
        if name in SHAPES:
            r, c = w.shape
            s = sd[name + "_scale_inv"].repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]
            out[name] = w.float() * s
        else:
            out[name] = w.float()
    return out


def _changed(a, b, t):
    da, db = _deq(a), _deq(b)
    return {k: brute_changed(da[k], db[k], t) for k in da}


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    return request.param


def test_diff_fp8_equals_brute_force(fmt, tmp_path):
    a = _base(fmt)
    b = _step(a, seed=3)
    pa, pb = _save(a, tmp_path / "a"), _save(b, tmp_path / "b")
    ref = _changed(a, b, 1e-5)
    for chunk in (128 * 64, None):
        r = rlsparse.diff(pa, pb, tolerances=[0, 1e-5], chunk_elements=chunk, mask_path=tmp_path / f"{chunk}.mask")
        for name in ref:
            assert r.tensors[name].changed["1e-05"] == int(ref[name].sum()), name
        mask = rlsparse.Mask.load(tmp_path / f"{chunk}.mask")
        for name in ref:
            assert torch.equal(mask.get(name), ref[name]), name


def test_series_fp8_equals_brute_force(fmt, tmp_path):
    sds = [_base(fmt)]
    for k in range(3):
        sds.append(_step(sds[-1], seed=10 + k, rescale=k != 1))
    sds[3][NORM] = sds[0][NORM].clone()  # an update cancelled at the end
    paths = [_save(sd, tmp_path / f"c{k}") for k, sd in enumerate(sds)]
    r = series(paths[0], paths[1:], chunk_elements=128 * 64)
    chg = [_changed(sds[0], sd, 1e-5) for sd in sds[1:]]
    total = lambda m: sum(int(v.sum()) for v in m.values())  # noqa: E731
    assert r.changed == [total(c) for c in chg]
    assert r.consecutive_changed == [total(_changed(sds[k], sds[k + 1], 1e-5)) for k in (1, 2)]
    final = chg[-1]
    ever = {k: chg[0][k] | chg[1][k] | chg[2][k] for k in final}
    assert r.never == r.numel - total(ever)
    assert r.cancelled_count == total({k: ever[k] & ~final[k] for k in final}) > 0
    assert r.outside_final == [total({k: c[k] & ~final[k] for k in final}) for c in chg]
    # per-type breakdown: q is two tensors
    q = r.by_type()["q"]
    qn = [n for n in SHAPES if "q_proj" in n]
    assert q["changed"] == [sum(int(c[n].sum()) for n in qn) for c in chg]
    assert q["numel"] == sum(final[n].numel() for n in qn)
    assert r.by_layer()["1"]["changed"][-1] == int(final["model.layers.1.self_attn.q_proj.weight"].sum())


def test_overlap_fp8_three_runs_equals_brute_force(fmt, tmp_path):
    base = _base(fmt)
    fts = [_step(base, seed=20 + k) for k in range(3)]
    pb = _save(base, tmp_path / "base")
    pf = [_save(sd, tmp_path / f"ft{k}") for k, sd in enumerate(fts)]
    r = overlap_from_checkpoints(pb, pf[0], pb, pf[1], pb, pf[2], chunk_elements=128 * 64)
    chg = [_changed(base, sd, 1e-5) for sd in fts]
    for i in range(3):
        for j in range(3):
            exp = {k: int((chg[i][k] & chg[j][k]).sum()) for k in chg[0]}
            assert {k: int(c[i, j]) for k, c in r.counts.items()} == exp, (i, j)
    assert len(r.pairs) == 3


def _line(fmt: str) -> np.ndarray:
    vals = dtypes.widen(np.arange(256, dtype=np.uint8), fmt).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)])


def test_precision_fp8_equals_reference(fmt, tmp_path):
    a = _base(fmt)
    b = _step(a, seed=5, rescale=True)
    pa, pb = _save(a, tmp_path / "a"), _save(b, tmp_path / "b")
    r = precision(pa, pb, tolerances=[1e-3, 1e-2], chunk_elements=128 * 64)
    line = _line(fmt)
    gaps = np.diff(line)
    for name, (rows, cols) in SHAPES.items():
        ca = a[name].view(torch.uint8).numpy().reshape(-1)
        cb = b[name].view(torch.uint8).numpy().reshape(-1)
        sa = a[name + "_scale_inv"].repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols].reshape(-1).numpy()
        sb = b[name + "_scale_inv"].repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols].reshape(-1).numpy()
        fa = dtypes.widen(ca, fmt).astype(np.float64)
        fb = dtypes.widen(cb, fmt).astype(np.float64)
        ia, ib = np.searchsorted(line, fa), np.searchsorted(line, fb)
        same = sa == sb
        finite = np.isfinite(fa) & np.isfinite(fb)
        ulps = np.abs(ia - ib)[same & (ca != cb) & finite]
        s = r.tensors[name]
        assert (s.changed, s.ulp1, s.ulp2, s.ulp3_plus) == (
            int((ulps > 0).sum()), int((ulps == 1).sum()), int((ulps == 2).sum()), int((ulps >= 3).sum())), name
        deq_a, deq_b = fa * sa.astype(np.float32), fb * sb.astype(np.float32)
        both_nan = np.isnan(deq_a) & np.isnan(deq_b)
        assert s.rescaled_changed == int(((deq_a != deq_b) & ~same & ~both_nan).sum()) > 0
        assert s.nonfinite_changed == int((same & (ca != cb) & ~finite & ~(np.isnan(fa) & np.isnan(fb))).sum())
        spacing = np.minimum(np.append(gaps, np.inf)[ia], np.insert(gaps, 0, np.inf)[ia]) * sa
        for lab, t in zip(r.labels, (1e-3, 1e-2)):
            assert s.spacing_above[lab] == int((spacing > t).sum()), (name, lab)
