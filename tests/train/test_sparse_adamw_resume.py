"""SparseAdamW resumes from its own checkpoint bit for bit (int32 and int64 indices, block
offsets, bitmap), under a plain loop and under Trainer(resume_from_checkpoint); a dense AdamW
state is converted."""

from __future__ import annotations

import io

import pytest
import torch

from trainhelpers import int_view, make_model, random_mask
from rlsparse.errors import MismatchError
from rlsparse.train import SparseAdamW, attach_mask
import rlsparse.train.sparse_adamw as sparse_adamw


def _batches(n, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 60, (2, 8), generator=g) for _ in range(n)]


def _steps(model, opt, batches):
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(a, b):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(int_view(x.detach()), int_view(y.detach())), n


@pytest.mark.parametrize("density,int64", [(0.02, False), (0.02, True), (0.15, False), (0.6, False)],
                         ids=["int32", "int64", "blocks", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resumed_run_is_bit_identical(monkeypatch, density, int64, dtype):
    if int64:
        monkeypatch.setattr(sparse_adamw, "_INT64_FROM", 0)  # int64 indices without a 2**31-element tensor
    batches = _batches(4)
    whole = make_model(dtype)
    mask = random_mask(whole, density)
    opt = SparseAdamW(whole.named_parameters(), mask, lr=1e-2, weight_decay=0.1, fused=False)
    _steps(whole, opt, batches)

    first = make_model(dtype)
    opt1 = SparseAdamW(first.named_parameters(), mask, lr=1e-2, weight_decay=0.1, fused=False)
    _steps(first, opt1, batches[:2])
    weights, state = _round_trip(first.state_dict()), _round_trip(opt1.state_dict())
    resumed = make_model(dtype, seed=5)
    resumed.load_state_dict(weights)
    opt2 = SparseAdamW(resumed.named_parameters(), mask, lr=1e-2, weight_decay=0.1, fused=False)
    opt2.load_state_dict(state)
    want = torch.int64 if int64 else None
    for p in resumed.parameters():
        for key in ("positions", "block_counts"):
            if key in opt1.state[p]:
                assert opt2.state[p][key].dtype == (want or opt1.state[p][key].dtype)
                assert torch.equal(opt2.state[p][key], opt1.state[p][key])
    _steps(resumed, opt2, batches[2:])
    _assert_same(whole, resumed)


def test_dense_adamw_state_is_converted():
    batches = _batches(4)
    dense = make_model()
    mask = random_mask(dense, 0.1)
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    attach_mask(dense, mask, opt)
    _steps(dense, opt, batches[:2])
    resumed = make_model()
    resumed.load_state_dict(dense.state_dict())
    sparse = SparseAdamW(resumed.named_parameters(), mask, lr=1e-2, weight_decay=0.0, fused=False)
    sparse.load_state_dict(_round_trip(opt.state_dict()))
    _steps(dense, opt, batches[2:])
    _steps(resumed, sparse, batches[2:])
    _assert_same(dense, resumed)


def test_state_of_another_mask_is_refused():
    model = make_model()
    opt = SparseAdamW(model.named_parameters(), random_mask(model, 0.02, seed=1), lr=1e-2)
    _steps(model, opt, _batches(1))
    other = SparseAdamW(model.named_parameters(), random_mask(model, 0.03, seed=2), lr=1e-2)
    with pytest.raises(MismatchError, match="different mask"):
        other.load_state_dict(opt.state_dict())


def _sft(out, model, mask, max_steps):
    import warnings

    from datasets import Dataset
    from trl import SFTConfig

    from test_trainers import DATA
    from trainhelpers import make_tokenizer
    from rlsparse.train.trainers import build_trainer

    config = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, report_to="none",
                       save_strategy="steps", save_steps=2, learning_rate=1e-2, weight_decay=0.1, use_cpu=True,
                       disable_tqdm=True, seed=0,
                       lr_scheduler_type="constant")  # the cut run must see the same learning rates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_trainer("sft", model, config, Dataset.from_dict(DATA["sft"]), make_tokenizer(), mask=mask,
                             sparse_optimizer=True)


def test_trainer_resume_from_checkpoint_with_sparse_optimizer(tmp_path):
    mask = random_mask(make_model(), 0.05)
    whole = make_model()
    _sft(tmp_path / "whole", whole, mask, 4).train()
    _sft(tmp_path / "cut", make_model(), mask, 2).train()
    resumed = make_model(seed=9)
    _sft(tmp_path / "cut", resumed, mask, 4).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    _assert_same(whole, resumed)
