"""SparseAdamW against dense masked AdamW (the slow, obviously-correct reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from trainhelpers import assert_masked_training, make_model, params_of, random_mask
from rlsparse.masks import Mask
from rlsparse.train import SparseAdamW, attach_mask
from rlsparse.train.sparse_adamw import _indices, _positions


def _dense_reference(params, masks, grads_per_step, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Dense AdamW written out, with the update applied inside the mask only."""
    out = []
    for p, keep in zip(params, masks):
        p = p.clone()
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        for step, grads in enumerate(grads_per_step, start=1):
            g = grads[len(out)]
            new_m = m * betas[0] + (1 - betas[0]) * g
            new_v = v * betas[1] + (1 - betas[1]) * g * g
            m, v = torch.where(keep, new_m, m), torch.where(keep, new_v, v)
            update = (m / (1 - betas[0] ** step)) / ((v / (1 - betas[1] ** step)).sqrt() + eps)
            p = torch.where(keep, p * (1 - lr * wd) - lr * update, p)
        out.append(p)
    return out


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
       density=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]), seed=st.integers(0, 2**16), steps=st.integers(1, 3),
       wd=st.sampled_from([0.0, 0.1]))
def test_matches_dense_reference_on_random_inputs(shapes, density, seed, steps, wd):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < density for s in shapes]
    masks[0].view(-1)[0] = True  # never an empty mask
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = SparseAdamW([(f"p{i}", p) for i, p in enumerate(live)],
                      Mask.from_tensors({f"p{i}": m for i, m in enumerate(masks)}), lr=1e-2, weight_decay=wd)
    for step_grads in grads:
        for p, gr in zip(live, step_grads):
            p.grad = gr.clone()
        opt.step()
    for got, want, keep, start in zip(live, _dense_reference(params, masks, grads, 1e-2, wd), masks, params):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.detach()[~keep], start[~keep])  # masked-out: bit-identical


@pytest.mark.parametrize("fused", [False, True], ids=["single-tensor", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])  # indices, block offsets, bitmap
def test_bit_identical_to_torch_adamw_with_attach_mask(dtype, density, fused):
    dense, sparse = make_model(dtype), make_model(dtype)
    mask = random_mask(dense, density)
    before = params_of(dense)
    kind = {"fused": True} if fused else {"foreach": False}
    # attach_mask applies decay itself, the fused kernel inside (in float32 for bf16 weights): the
    # same AdamW rounded in another order, which pure-bf16 training amplifies; compare without decay
    wd = 0.0 if fused else 0.1
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=wd, **kind)
    attach_mask(dense, mask, opt_dense)
    opt_sparse = SparseAdamW(sparse.named_parameters(), mask, lr=1e-2, weight_decay=wd, fused=fused)
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(dense.named_parameters(), sparse.named_parameters()):
        if fused:
            # the fused kernel's rounding depends on an element's vector lane, which gathering moves:
            # the same AdamW to within float rounding, not bit for bit
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b), n
    assert_masked_training(before, sparse, mask)


@pytest.mark.parametrize("density,form", [(0.05, "indices"), (0.2, "blocks"), (0.5, "bitmap")])
def test_positions_pick_the_form_and_decode_exactly(density, form):
    keep = torch.rand(5003, generator=torch.Generator().manual_seed(0)) < density
    keep[4999] = True
    state = _positions(keep)
    got = {torch.int32: "indices", torch.uint8: "blocks" if "block_counts" in state else "bitmap"}
    assert got[state["positions"].dtype] == form
    assert torch.equal(_indices(state, keep.numel()).long(), keep.nonzero().squeeze(1))


def test_state_is_small_and_survives_a_state_dict_round_trip():
    model = make_model()
    mask = random_mask(model, 0.2)
    opt = SparseAdamW(model.named_parameters(), mask, lr=1e-2)
    ids = torch.randint(4, 60, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() <= (0.2 + 0.05) * 8 * numel
    again = SparseAdamW(model.named_parameters(), mask, lr=1e-2)
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("positions", "exp_avg", "exp_avg_sq"):
            assert torch.equal(again.state[p][key], opt.state[p][key])
