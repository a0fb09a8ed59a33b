"""Rank (Table 2) and spectral views against direct linear algebra on hand-made updates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _build import base_model, state, write
from rlsparse.analysis.rank import matrix_ranks, rank
from rlsparse.analysis.spectral import matrix_spectrum, spectral
from rlsparse.errors import UsageError

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def low_rank_update(tmp_path):
    """q_proj of layer 0 gets a rank-3 update (a 3x3 block), up_proj of layer 1 a rank-1 update,
    everything else a dense random update (full rank)."""
    base, sd = base_model(tmp_path)
    g = torch.Generator().manual_seed(5)
    ft = {k: v.clone() for k, v in sd.items()}
    ft[Q][2:5, 7:10] += (torch.randn(3, 3, generator=g) * 0.5 + 2).to(torch.bfloat16)
    # (a dense outer product u v^T would not stay rank 1 after rounding to bf16; one row does)
    ft[UP][3] += (torch.rand(32, generator=g) + 1).to(torch.bfloat16)
    for k in ft:
        if k not in (Q, UP) and ft[k].dim() == 2:
            ft[k] = (ft[k].float() + 0.1 * torch.randn(ft[k].shape, generator=g)).to(torch.bfloat16)
    return base, write(ft, base, tmp_path / "ft", shard="50KB"), sd


def test_rank_equals_reference(low_rank_update):
    base, ft, sd = low_rank_update
    r = rank(base, ft, device="cpu")
    fsd = state(ft)
    names = [m.name for m in r.matrices]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert all(len(sd[n].shape) == 2 for n in names)
    for m in r.matrices:
        d = fsd[m.name].float() - sd[m.name].float()
        assert m.rank == int(torch.linalg.matrix_rank(d)), m.name
        s = np.linalg.svd(d.double().numpy(), compute_uv=False)
        assert m.stable_rank == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-4)
        p = s / s.sum()
        p = p[p > 0]
        assert m.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
        assert m.rtol == max(d.shape) * torch.finfo(torch.float32).eps
    by = {m.name: m for m in r.matrices}
    assert by[Q].rank == 3 and by[Q].rank_pct == pytest.approx(100 * 3 / 32)
    assert by[UP].rank == 1 and by[UP].stable_rank == pytest.approx(1.0)
    assert r.mean_rank_pct == pytest.approx(sum(m.rank_pct for m in r.matrices) / len(r.matrices))
    doc = r.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema_version"] == 1 and doc["rtol"] == "max(m,n)*eps"
    assert set(doc["by_type"]) >= {"q", "k", "v", "o", "gate", "up", "down"}
    assert set(doc["by_layer"]) == {"0", "1"}


def test_rank_sampling_and_embeddings(low_rank_update):
    base, ft, _ = low_rank_update
    assert len(rank(base, ft, device="cpu", max_matrices=3).matrices) == 3
    r = rank(base, ft, device="cpu", layers=[1])
    assert {m.name.split(".")[2] for m in r.matrices} == {"1"}
    r = rank(base, ft, device="cpu", include_embeddings=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {m.name for m in r.matrices}
    with pytest.raises(UsageError):
        rank(base, ft, device="cpu", layers=[7])
    with pytest.raises(UsageError):
        rank(base, ft, device="cpu", max_matrices=0)


def test_zero_update_has_rank_zero():
    assert matrix_ranks(torch.zeros(4, 6))[0] == 0
    assert matrix_ranks(torch.zeros(4, 6))[4:] == (None, None)
    assert matrix_ranks(torch.eye(5))[4:] == (pytest.approx(5.0), pytest.approx(5.0))


def _rotation(n: int, i: int, j: int, theta: float) -> torch.Tensor:
    r = torch.eye(n, dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_spectrum_of_known_changes():
    w0 = torch.diag(torch.tensor([10.0, 8, 6, 4, 2, 1], dtype=torch.float64))
    # rotate the top left singular vector by 30 degrees towards the last one: only the left side moves
    w1 = _rotation(6, 0, 5, math.radians(30)) @ w0
    m = matrix_spectrum(w0.float(), w1.float(), k=1)
    assert m.left_angle_max == pytest.approx(30, abs=1e-3) and m.right_angle_max == pytest.approx(0, abs=1e-2)
    assert m.sv_rel_change_max_abs == pytest.approx(0, abs=1e-6)
    # rescale the top-2 singular values: an update entirely inside the top-2 block
    w2 = w0.clone()
    w2[0, 0], w2[1, 1] = 12.0, 7.0
    m = matrix_spectrum(w0.float(), w2.float(), k=2)
    assert m.energy_outside == pytest.approx(0, abs=1e-6)
    assert m.sv_rel_change_mean == pytest.approx((0.2 + (-0.125)) / 2)
    assert m.sv_rel_change_max_abs == pytest.approx(0.2)
    assert m.left_angle_max == pytest.approx(0, abs=1e-2)
    # an update outside the top-2 block: energy entirely outside
    w3 = w0.clone()
    w3[4, 5] = 0.5
    assert matrix_spectrum(w0.float(), w3.float(), k=2).energy_outside == pytest.approx(1.0)
    # half inside, half outside (equal squared entries)
    w4 = w0.clone()
    w4[0, 1], w4[3, 4] = 0.5, 0.5
    assert matrix_spectrum(w0.float(), w4.float(), k=2).energy_outside == pytest.approx(0.5, abs=1e-4)
    assert matrix_spectrum(w0.float(), w0.float(), k=2).energy_outside is None


def test_spectral_end_to_end(low_rank_update):
    base, ft, sd = low_rank_update
    r = spectral(base, ft, top_k=4, device="cpu", max_matrices=4)
    fsd = state(ft)
    assert len(r.matrices) == 4
    for m in r.matrices:
        ref = matrix_spectrum(sd[m.name].float(), fsd[m.name].float(), 4, m.name)
        assert m == ref
    doc = r.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["top_k"] == 4 and doc["schema_version"] == 1


@pytest.mark.gpu
def test_gpu_matches_cpu(low_rank_update):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base, ft, _ = low_rank_update
    cpu, gpu = rank(base, ft, device="cpu"), rank(base, ft, device="cuda")
    assert gpu.device == "cuda"
    for a, b in zip(cpu.matrices, gpu.matrices):
        assert a.rank == b.rank and a.stable_rank == pytest.approx(b.stable_rank, rel=1e-3)
    s_cpu, s_gpu = spectral(base, ft, device="cpu", top_k=4), spectral(base, ft, device="cuda", top_k=4)
    for a, b in zip(s_cpu.matrices, s_gpu.matrices):
        assert a.energy_outside == pytest.approx(b.energy_outside, abs=1e-3)
