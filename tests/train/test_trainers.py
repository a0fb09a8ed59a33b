"""MaskCallback under every TRL trainer rlsparse supports: 2 steps, tiny batch, fp32 and bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

from trainhelpers import assert_masked_training, int_view, make_model, make_tokenizer, ones_mask, params_of, random_mask
from rlsparse.errors import MaskError, MismatchError
from rlsparse.masks import Mask
from rlsparse.train import MaskCallback, SparseAdamW
from rlsparse.train.trainers import ALGORITHMS, algorithm, build_trainer

PROMPTS = ["w1 w2 w3", "w4 w5", "what is 1 plus 2", "w9 w10 w11"]
PREFS = {"prompt": PROMPTS, "chosen": [" good", " yes", " 3", " w1"], "rejected": [" bad", " no", " 4", " w2"]}
ANSWERS = {"prompt": PROMPTS, "answer": ["3"] * 4}
DATA = {
    "sft": {"prompt": PROMPTS, "completion": [" w6 w7", " w8", " 3", " w1"]},
    "dpo": PREFS, "orpo": PREFS, "cpo": PREFS, "simpo": PREFS,
    "kto": {"prompt": PROMPTS, "completion": [" good", " bad", " 3", " 4"], "label": [True, False, True, False]},
    "grpo": ANSWERS, "rloo": ANSWERS, "online-dpo": ANSWERS, "ppo": ANSWERS, "prime": ANSWERS,
}
GENERATION = dict(num_generations=2, max_completion_length=4, beta=0.0)
OPTIONS = {"grpo": GENERATION, "rloo": GENERATION, "online-dpo": dict(max_new_tokens=4),
           "ppo": dict(num_generations=2, max_completion_length=4, num_ppo_epochs=2),
           "prime": dict(num_generations=2, max_completion_length=4, prm_learning_rate=1e-2)}
NEEDS_REF = ("dpo", "kto", "online-dpo")


def _length_reward(completions, **kwargs):
    # in [0, 1]: PRIME learns its implicit PRM on outcome labels
    return [min(1.0, len(str(c)) / 20) for c in completions]


def _trainer(tmp_path, name, model, mask=None, dtype=torch.float32, **kwargs):
    from datasets import Dataset

    algo = algorithm(name)
    _, config_cls = algo.classes()
    config = config_cls(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                        report_to="none", save_strategy="no", learning_rate=1e-2, weight_decay=0.1, use_cpu=True,
                        disable_tqdm=True, seed=0, **{**algo.defaults, **OPTIONS.get(name, {}),
                                                      **kwargs.pop("config", {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_trainer(name, model, config, Dataset.from_dict(DATA[name]), make_tokenizer(), mask=mask,
                             reward_funcs=[_length_reward] if algo.uses_rewards else None,
                             ref_model=make_model(dtype) if name in NEEDS_REF else None, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_masked_training_under_each_trainer(tmp_path, name, dtype):
    model = make_model(dtype)
    mask = random_mask(model)
    before = params_of(model)
    _trainer(tmp_path, name, model, mask, dtype, verify=True).train()
    assert_masked_training(before, model, mask)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_all_ones_mask_equals_full_finetuning(tmp_path, name):
    full, masked = make_model(), make_model()
    _trainer(tmp_path, name, full).train()
    _trainer(tmp_path, name, masked, ones_mask(masked)).train()
    for (n, a), (_, b) in zip(full.named_parameters(), masked.named_parameters()):
        assert torch.equal(int_view(a.detach()), int_view(b.detach())), n


def test_gradient_accumulation_and_clipping_under_trainer(tmp_path):
    model = make_model()
    mask = random_mask(model)
    before = params_of(model)
    _trainer(tmp_path, "sft", model, mask, config=dict(gradient_accumulation_steps=2, max_grad_norm=0.1)).train()
    assert_masked_training(before, model, mask)


@pytest.mark.parametrize("order", ["after_clip", "before_clip"])
def test_sparse_adamw_under_trainer_matches_dense_masked(tmp_path, order):
    dense, sparse = make_model(), make_model()
    mask = random_mask(dense)
    before = params_of(dense)
    _trainer(tmp_path, "dpo", dense, mask, order=order, config=dict(optim="adamw_torch")).train()
    _trainer(tmp_path, "dpo", sparse, mask, order=order, sparse_optimizer=True).train()
    assert_masked_training(before, sparse, mask)
    for (n, a), (_, b) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_verify_fails_loudly_when_something_else_moves_weights(tmp_path):
    from transformers import TrainerCallback

    class Vandal(TrainerCallback):  # an outside update the mask cannot stop
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.model.norm.weight.add_(1.0)

    model = make_model()
    trainer = _trainer(tmp_path, "sft", model, random_mask(model), verify=True, callbacks=[Vandal()])
    with pytest.raises(MaskError, match="masked-out elements changed"):
        trainer.train()


def test_wrong_mask_fails_when_the_trainer_is_built(tmp_path):
    model = make_model()
    bad = Mask.from_tensors({"model.embed_tokens.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MismatchError):
        _trainer(tmp_path, "sft", model, bad)
    with pytest.raises(MaskError, match="selects no elements"):
        MaskCallback(Mask.from_tensors({"w": torch.zeros(2)})).on_init_end(None, None, None, model=model)


def test_sparse_adamw_needs_names():
    model = make_model()
    with pytest.raises(Exception, match="named_parameters"):
        SparseAdamW(model.parameters(), random_mask(model))
