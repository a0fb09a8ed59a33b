import json

import pytest

from rlsparse.errors import UsageError
from rlsparse.lab.recipes import Recipe, load_recipe, recipe_names


def test_builtin_recipes_load_and_cover_the_issue():
    names = recipe_names()
    recipes = [load_recipe(n) for n in names]
    algos = {r.algorithm for r in recipes}
    assert {"sft", "rft", "dpo", "grpo"} <= algos
    assert any(r.algorithm == "dpo" and r.in_distribution for r in recipes)
    assert any(r.algorithm == "dpo" and not r.in_distribution for r in recipes)
    grpo = {(r.trl.get("beta", 0) > 0, r.trl.get("max_grad_norm", 1) > 0) for r in recipes if r.algorithm == "grpo"}
    assert grpo == {(True, True), (True, False), (False, True), (False, False)}
    for r in recipes:
        assert len(r.learning_rates) >= 2, f"{r.name} needs a learning-rate sweep"
        assert r.schema_version == 1


def test_quick_overrides_apply():
    r = load_recipe("grpo")
    q = r.quickened()
    assert q.steps < r.steps and q.name == r.name and q.trl == r.trl


def test_recipe_file_by_path_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"algorithm": "sft", "learning_rates": [1e-5]}))
    assert load_recipe(path).name == "mine"
    with pytest.raises(UsageError, match="not found"):
        load_recipe("no_such_recipe")
    with pytest.raises(UsageError, match="algorithm 'a2c'"):
        Recipe(name="x", algorithm="a2c")
    with pytest.raises(UsageError, match="unknown fields"):
        Recipe.from_dict({"name": "x", "algorithm": "sft", "lr": 1})
    with pytest.raises(UsageError, match="schema_version"):
        Recipe(name="x", algorithm="sft", schema_version=99)


def test_preregistered_conjecture_runs_are_points_of_their_sweeps():
    from rlsparse.lab.recipes import load_recipe, recipe_names

    for name in recipe_names():
        for r in (load_recipe(name), load_recipe(name).quickened()):
            if r.conjecture_lr is not None:
                assert r.conjecture_lr in r.learning_rates, name
            assert r.seeds and len(set(r.seeds)) == len(r.seeds), name


def test_bad_pre_sft_and_the_preregistration_file(tmp_path):
    import json

    from rlsparse.errors import UsageError
    from rlsparse.lab.preregistration import load_preregistration
    from rlsparse.lab.recipes import Recipe

    with pytest.raises(UsageError, match="pre_sft"):
        Recipe(name="x", algorithm="dpo", pre_sft={"learning_rate": 1e-4})
    assert Recipe(name="x", algorithm="dpo", seed=4).seeds == [4]
    pre = load_preregistration()
    assert pre["matched_gain"] == 0.10 and pre["learned_gain"] == 0.05 and len(pre.sha256) == 64
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"schema_version": 1, "matched_gain": 0.1}))
    with pytest.raises(UsageError, match="missing"):
        load_preregistration(bad)
