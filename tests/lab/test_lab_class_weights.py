"""KTO's "balanced" desirable_weight: set from the counts of the rows a cell trains on, inside the
KTO paper's range and TRL's own check; refused where it means nothing; a recipe changed this way
cannot be resumed into an older run."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlsparse.errors import UsageError
from rlsparse.lab import class_weights, runner
from rlsparse.lab.recipes import Recipe, load_recipe


def _rows(n_desirable, n_undesirable):
    return [{"prompt": "p", "completion": "c", "label": True}] * n_desirable + \
           [{"prompt": "p", "completion": "c", "label": False}] * n_undesirable


def test_the_weight_comes_from_the_counts_of_the_rows():
    recipe = load_recipe("kto", suite="real")
    assert recipe.trl["desirable_weight"] == "balanced"
    resolved, record = class_weights.resolve(recipe, _rows(78, 779))
    assert resolved.trl["desirable_weight"] == record["desirable_weight"] == 7 / 6 * 779 / 78
    assert (record["n_desirable"], record["n_undesirable"], record["undesirable_weight"]) == (78, 779, 1.0)
    assert record["ratio"] == pytest.approx(7 / 6, rel=1e-15)
    assert recipe.trl["desirable_weight"] == "balanced"  # the recipe itself is not changed
    # lambda_U is the recipe's own
    heavier = dataclasses.replace(recipe, trl={**recipe.trl, "undesirable_weight": 0.5})
    assert class_weights.resolve(heavier, _rows(10, 40))[1]["desirable_weight"] == 7 / 6 * 0.5 * 40 / 10


def test_a_number_or_no_weight_is_left_alone():
    recipe = load_recipe("dpo_id", suite="real")
    assert class_weights.resolve(recipe, _rows(1, 9)) == (recipe, None)
    fixed = dataclasses.replace(load_recipe("kto"), trl={"desirable_weight": 3.0})
    assert class_weights.resolve(fixed, _rows(1, 9)) == (fixed, None)


@given(n_d=st.integers(1, 5000), n_u=st.integers(1, 5000), extra=st.integers(0, 5000),
       lam_u=st.sampled_from([1.0, 0.5, 2.0]))
def test_the_weight_is_inside_the_kto_range_and_trls_rounded_check(n_d, n_u, extra, lam_u):
    w = class_weights.balanced_desirable_weight(n_d, n_u, lam_u)
    assert 1 <= w * n_d / (lam_u * n_u) <= 4 / 3
    # TRL 1.16 KTOTrainer's check: its bounds rounded to two decimals, 1.33 for 4/3. With the lab's
    # data (desirable rows the minority) lambda_D >= 0.5, where rounding cannot push 7/6 outside;
    # at lambda_D near 0.01 TRL's rounded range itself collapses, whatever the weight.
    n_u = n_d + extra
    w = class_weights.balanced_desirable_weight(n_d, n_u, lam_u)
    assert round(n_u * lam_u / n_d, 2) <= w <= round(n_u * lam_u / n_d * 1.33, 2)


def test_data_without_one_of_the_classes_is_a_one_line_error():
    with pytest.raises(UsageError) as err:
        class_weights.resolve(load_recipe("kto", suite="real"), _rows(0, 12))
    assert "0 desirable and 12 undesirable" in str(err.value) and "\n" not in str(err.value)


def test_balanced_is_refused_where_it_means_nothing():
    with pytest.raises(UsageError, match="only KTO has class weights"):
        Recipe(name="x", algorithm="dpo", data="policy_samples", trl={"desirable_weight": "balanced"})
    with pytest.raises(UsageError, match="expected a number or 'balanced'"):
        Recipe(name="x", algorithm="kto", data="policy_samples", trl={"desirable_weight": "even"})


def test_a_run_started_with_the_old_kto_recipe_refuses_to_resume_with_the_new_one():
    new = load_recipe("kto", suite="real").quickened()
    old = dataclasses.replace(new, trl={k: v for k, v in new.trl.items() if k != "desirable_weight"},
                              description="KTO on the base's own sampled replies, labelled desirable when correct "
                                          "(in distribution)")
    previous, current = {"recipes": [old.to_dict()]}, {"recipes": [new.to_dict()]}
    with pytest.raises(UsageError, match=r"recipes \['kto'\] changed since the run started"):
        runner._check_same_run(previous, current)
    runner._check_same_run(current, current)  # the same recipe resumes
