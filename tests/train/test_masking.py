"""attach_mask in a plain PyTorch loop: orders, weight decay, non-finite gradients, errors."""

from __future__ import annotations

import pytest
import torch

from trainhelpers import assert_masked_training, int_view, make_model, ones_mask, params_of, random_mask
from rlsparse.errors import MaskError, MismatchError, UsageError
from rlsparse.masks import Mask
from rlsparse.train import attach_mask, mask_name, verify_unchanged


def _train(model, optimizer, steps=3, accumulate=1, clip=0.5):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for _ in range(accumulate):
            ids = torch.randint(4, 60, (2, 8), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("order", ["after_clip", "before_clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_out_bit_identical_masked_in_changed(order, dtype):
    model = make_model(dtype)
    mask = random_mask(model)
    before = params_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = attach_mask(model, mask, opt, order=order)
    _train(model, opt, accumulate=2)
    assert_masked_training(before, model, mask)
    handle.verify(before)


def test_all_ones_mask_equals_no_mask():
    plain, masked = make_model(), make_model()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_masked = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    attach_mask(masked, ones_mask(masked), opt_masked)
    _train(plain, opt_plain)
    _train(masked, opt_masked)
    for (n, a), (_, b) in zip(plain.named_parameters(), masked.named_parameters()):
        assert torch.equal(int_view(a.detach()), int_view(b.detach())), n


def test_weight_decay_leaks_without_our_handling_and_not_with_it():
    mask_model = make_model()
    mask = random_mask(mask_model)
    # naive: gradients masked by hooks, the optimizer left alone -> AdamW's decay moves everything
    naive = make_model()
    before = params_of(naive)
    opt = torch.optim.AdamW(naive.parameters(), lr=1e-2, weight_decay=0.1)
    attach_mask(naive, mask, order="before_clip")
    _train(naive, opt)
    with pytest.raises(MaskError, match="masked-out elements changed"):
        verify_unchanged(naive, mask, before)
    # ours: decay confined to the mask
    ours = make_model()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    attach_mask(ours, mask, opt)
    _train(ours, opt)
    assert_masked_training(before, ours, mask)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after each step


def test_weight_decay_refuse_raises_before_training():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(UsageError, match="weight_decay=0.1 would move masked-out weights"):
        attach_mask(model, random_mask(model), opt, weight_decay="refuse")


def test_coupled_l2_decay_confined_too():
    model = make_model()
    mask = random_mask(model)
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9, weight_decay=0.1)
    attach_mask(model, mask, opt)
    _train(model, opt)
    assert_masked_training(before, model, mask)


@pytest.mark.parametrize("order", ["after_clip", "before_clip"])
def test_inf_in_masked_out_gradient_gives_no_nan(order):
    model = make_model()
    mask = random_mask(model)
    before = params_of(model)
    name = "model.layers.0.mlp.up_proj.weight"
    row, col = (~mask.get(name)).nonzero()[0].tolist()

    def poison(grad):  # registered first, so it runs as if backward itself produced the inf
        grad = grad.clone()
        grad[row, col] = float("inf")
        return grad

    model.get_parameter(name).register_hook(poison)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    attach_mask(model, mask, opt, order=order)
    _train(model, opt)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    verify_unchanged(model, mask, before)


def test_after_clip_uses_full_gradient_norm_before_clip_the_masked_one():
    """after_clip: clip coefficient from the full gradient; before_clip: from the subnetwork's."""
    model = make_model()
    mask = random_mask(model, density=0.1)
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(3))
    norms = {}
    for order in ("after_clip", "before_clip"):
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        attach_mask(m, mask, opt, order=order)
        m(input_ids=ids, labels=ids).loss.backward()
        norms[order] = float(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9))
    model(input_ids=ids, labels=ids).loss.backward()
    full = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    masked = float(torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad.masked_fill(~mask.get(n), 0)) for n, p in model.named_parameters()])))
    assert norms["after_clip"] == pytest.approx(full, rel=1e-6)
    assert norms["before_clip"] == pytest.approx(masked, rel=1e-5)
    assert masked < full


def test_dense_optimizer_state_is_zeroed_outside_the_mask():
    """Resuming from a full-finetuning checkpoint: nonzero moments would keep moving frozen weights."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    _train(model, opt, steps=1)  # dense state everywhere
    mask = random_mask(model)
    before = params_of(model)
    state = opt.state_dict()
    attach_mask(model, mask, opt)
    opt.load_state_dict(state)  # the load hook marks the state for zeroing
    _train(model, opt, steps=2)
    assert_masked_training(before, model, mask)


def test_detach_restores_plain_training():
    model = make_model()
    mask = random_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    attach_mask(model, mask, opt).detach()
    before = params_of(model)
    _train(model, opt, steps=1)
    with pytest.raises(MaskError):
        verify_unchanged(model, mask, before)


def test_tied_embeddings_and_wrapper_prefixes():
    assert mask_name("module._orig_mod.base_model.model.lm_head.weight") == "lm_head.weight"
    assert mask_name("model._fsdp_wrapped_module.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    model = make_model(tie=True)
    # a mask saved from the tied checkpoint has no lm_head.weight
    mask = Mask.from_tensors({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.3
                              for n, p in model.named_parameters()})
    assert "lm_head.weight" not in mask
    before = params_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach_mask(torch.nn.ModuleDict({"module": model}), mask, opt)  # names now start with "module."
    _train(model, opt)
    assert_masked_training(before, model, mask)


def test_mask_from_another_model_fails_with_all_problems():
    model = make_model()
    other = make_model()
    other.model.layers = other.model.layers[:1]
    tensors = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in other.state_dict().items()}
    tensors["model.norm.weight"] = torch.ones(7, dtype=torch.bool)
    tensors["extra.weight"] = torch.ones(2, dtype=torch.bool)
    with pytest.raises(MismatchError) as err:
        attach_mask(model, Mask.from_tensors(tensors), torch.optim.AdamW(model.parameters()))
    message = str(err.value)
    assert "1 mask tensors match no parameter" in message
    assert "trainable parameters are not in the mask" in message
    assert "model.norm.weight: mask [7] vs model [32]" in message


def test_empty_mask_fails():
    model = make_model()
    empty = Mask.from_tensors({n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.state_dict().items()})
    with pytest.raises(MaskError, match="selects no elements"):
        attach_mask(model, empty, torch.optim.AdamW(model.parameters()))


def test_file_that_is_not_a_mask_fails(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(MaskError, match="without rlsparse mask metadata"):
        Mask.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MaskError):
        Mask.load(tmp_path / "junk.safetensors")


def test_bad_options():
    model = make_model()
    mask = random_mask(model)
    with pytest.raises(UsageError, match="no optimizer was given"):
        attach_mask(model, mask)
    with pytest.raises(UsageError, match="order="):
        attach_mask(model, mask, order="sideways")
    with pytest.raises(UsageError, match="order='before_clip'"):
        attach_mask(model, mask, torch.optim.AdamW(model.parameters()), deepspeed=True)
    with pytest.raises(UsageError, match="under DeepSpeed"):
        attach_mask(model, mask, torch.optim.AdamW(model.parameters(), weight_decay=0.1), order="before_clip",
                    deepspeed=True)
