"""Masked training cannot be fooled: the mask's bits (not its metadata) decide what is frozen,
a NaN loss under before_clip leaves frozen weights alone, NaN payloads outside the mask are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainhelpers import int_view, make_model, params_of, random_mask
from rlsparse.errors import MaskError
from rlsparse.masks import Mask, MaskMeta, MaskWriter, pack
from rlsparse.train import attach_mask, verify_unchanged


def _lying_mask(model, path, bits_of, counts_of):
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    with MaskWriter(path, shapes) as w:
        for n, s in shapes.items():
            w.write(n, pack(bits_of(n, s)))
        w.set_meta(MaskMeta(shapes={n: list(s) for n, s in shapes.items()},
                            counts={n: counts_of(n, s) for n, s in shapes.items()}))
    return Mask.load(path)


def _numel(s):
    return int(np.prod(s))


def test_counts_that_disagree_with_bits_are_refused(tmp_path):
    model = make_model()
    # all bits 0, metadata claims every element is in the subnetwork
    mask = _lying_mask(model, tmp_path / "m", lambda n, s: np.zeros(s, dtype=bool), lambda n, s: _numel(s))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(MaskError, match=r"has 0 elements set but its metadata says \d+"):
        attach_mask(model, mask, opt)


def test_padding_bits_must_be_zero(tmp_path):
    from rlsparse.masks.mask import _numel as numel

    shapes = {"w": (3, 5)}  # 15 elements: one padding bit
    packed = pack(np.zeros(15, dtype=bool))
    packed[-1] |= 0x80
    with MaskWriter(tmp_path / "m", shapes) as w:
        w.write("w", packed)
        w.set_meta(MaskMeta(shapes={"w": [3, 5]}, counts={"w": 1}))
    with pytest.raises(MaskError, match="padding"):
        Mask.load(tmp_path / "m").get("w")
    assert numel((3, 5)) == 15


def test_verify_reads_the_bits(tmp_path):
    model = make_model()
    mask = _lying_mask(model, tmp_path / "m", lambda n, s: np.zeros(s, dtype=bool), lambda n, s: _numel(s))
    before = params_of(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(1.0)  # every element moved, and the bits say every element is frozen
    with pytest.raises(MaskError):
        verify_unchanged(model, mask, before)


def _nan_loss_step(model, opt, clip=1.0):
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(3))
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("order", ["after_clip", "before_clip"])
def test_nan_loss_leaves_frozen_weights_bit_identical(order):
    model = make_model()
    mask = random_mask(model)
    before = params_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    handle = attach_mask(model, mask, opt, order=order)
    _nan_loss_step(model, opt)
    handle.verify(before)
    for n, p in model.named_parameters():
        frozen = ~mask.get(n)
        assert not p.detach()[frozen].isnan().any(), n


@pytest.mark.parametrize("order", ["after_clip", "before_clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_payloads_outside_the_mask_are_kept(order, dtype):
    model = make_model(dtype)
    mask = random_mask(model)
    name, p = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    frozen = ~mask.get(name)
    idx = frozen.view(-1).nonzero().squeeze(1)[:4]
    payloads = {torch.bfloat16: [0x7FC0, 0xFFFF, 0x7F81, 0xFFC1],
                torch.float32: [0x7FC00000, 0xFFFFFFFF, 0x7F800001, 0xFFC00001]}[dtype]
    with torch.no_grad():
        view = int_view(p.data).view(-1)
        for i, bits in zip(idx.tolist(), payloads):
            view[i] = bits - (1 << (8 * p.element_size())) if bits >= 1 << (8 * p.element_size() - 1) else bits
    before = params_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = attach_mask(model, mask, opt, order=order)
    for _ in range(2):
        ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(5))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(int_view(p.detach()).view(-1)[idx], int_view(before[name]).view(-1)[idx])
    handle.verify(before)
