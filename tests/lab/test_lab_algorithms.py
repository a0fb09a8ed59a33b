"""Every built-in recipe, two steps on a tiny base, through the lab's runner and train.trainers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from rlsparse.lab import measure, runner
from rlsparse.lab.base import BaseConfig
from rlsparse.lab.recipes import ALGORITHMS, load_recipe, recipe_names
from rlsparse.train.trainers import algorithm

# Trained until it is right on some problems, so that recipes built from the policy's own
# correct and wrong samples (RFT, DPO, KTO, SimPO pairs) get data.
LEARNED = BaseConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, steps=600, batch_size=32,
                     target_accuracy=0.3, n_test=40)
TABLE1 = {  # the paper's Table 1: (on-policy, KL, online)
    "dpo": (False, True, False), "grpo": (True, True, True), "orpo": (False, False, False),
    "kto": (False, True, False), "ppo": (True, True, True), "simpo": (False, False, False),
    "prime": (True, False, True),
}


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    from rlsparse.lab.base import ensure_base

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lab-algos")
    opts = runner.LabOptions(out=out, base=LEARNED, n_test=40, compute="float32")
    run = runner._Run(opts, lambda *a: None)
    run.base_path = ensure_base(LEARNED, cache_dir=out / "cache")
    runner._quiet()
    return run


def _two_steps(recipe):
    return dataclasses.replace(recipe, steps=2, n_train=32, batch_size=8 if recipe.algorithm != "prime" else 2,
                               samples_per_prompt=4, learning_rates=[1e-3])


def test_every_algorithm_has_a_recipe_and_the_table1_flags_are_the_papers():
    recipes = [load_recipe(n) for n in recipe_names()]
    assert set(ALGORITHMS) == {r.algorithm for r in recipes}
    for r in recipes:
        if r.algorithm in TABLE1 and r.on_policy is not None:
            assert (r.on_policy, r.kl, r.online) == TABLE1[r.algorithm], r.name


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_trains_two_steps_through_train_trainers(lab_run, tmp_path, name):
    recipe = _two_steps(load_recipe(name))
    rows = runner.build_rows(lab_run, recipe)
    out = tmp_path / name
    trained = runner.train_one(lab_run, recipe, 1e-3, rows, out)
    expected = algorithm(runner._TRAINER.get(recipe.algorithm, recipe.algorithm)).trainer
    assert trained["trainer"] == expected
    assert [e["step"] for e in trained["log_history"]] == [1, 2]
    assert trained["trace"][-1]["step"] == 2
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert trained["trl_config"]["max_steps"] == 2 and trained["trl_config"]["learning_rate"] == 1e-3
    if recipe.trl.get("desirable_weight") == "balanced":  # KTO: lambda_D from the counts of these very rows
        n_d, n_u = sum(r["label"] is True for r in rows), sum(r["label"] is False for r in rows)
        assert (trained["class_weights"]["n_desirable"], trained["class_weights"]["n_undesirable"]) == (n_d, n_u)
        assert trained["trl_config"]["desirable_weight"] == trained["class_weights"]["desirable_weight"] == 7 / 6 * n_u / n_d


@pytest.mark.parametrize("name", ["ppo", "prime"])
def test_masked_run_of_ppo_and_prime_moves_only_the_subnetwork(lab_run, tmp_path, name):
    from rlsparse.masks import Mask

    # two rollouts of 16 samples: enough for some reward (and so some update) from this weak base
    recipe = dataclasses.replace(_two_steps(load_recipe(name)), steps=4, batch_size=16 if name == "ppo" else 4)
    rows = runner.build_rows(lab_run, recipe)
    g = torch.Generator().manual_seed(0)
    base = load_file(str(lab_run.base_path / "model.safetensors"))
    mask = Mask.from_tensors({n: torch.rand(t.shape, generator=g) < 0.3 for n, t in base.items()})
    runner.train_one(lab_run, recipe, 1e-3, rows, tmp_path / "sub", mask=mask)  # MaskCallback(verify=True)
    assert measure.changed_outside(lab_run.base_path, tmp_path / "sub", mask) == 0
    changed = measure.sparsity(lab_run.base_path, tmp_path / "sub", tolerances=("0",))["changed"]["0"]
    assert 0 < changed <= sum(int(mask.get(n).sum()) for n in mask.names)
