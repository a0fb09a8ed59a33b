"""Each verdict on synthetic results whose verdict is known by hand, including the failing case
and the control that makes it fail."""

import pytest

from rlsparse.lab.preregistration import load_preregistration
from rlsparse.lab.verdicts import conjecture, figure1, figure5, kl_clip, precision, table2, table5, table6

TOLS = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")
LRS = (1e-6, 1e-5, 1e-4)
PRE = load_preregistration()


def _point(lr, sparsity, gain, seed=0, **extra):
    s = {t: sparsity for t in TOLS}
    return {"learning_rate": lr, "seed": seed, "sparsity": s, "accuracy": {"add": 0.5 + gain},
            "accuracy_gain": {"add": gain}, "update_rank": 1.0, "probe_kl": 1 - sparsity, "delta_norm": 1 - sparsity,
            "log_history": [{"step": 1, "loss": 1.0}], **extra}


def _entry(name, algo, in_dist, curves, group="sft_vs_rl", trl=None, **extra):
    """curves: {seed: [(sparsity, gain) per learning rate in LRS]}."""
    points = [_point(lr, s, g, seed) for seed, rows in curves.items() for lr, (s, g) in zip(LRS, rows)]
    return {"recipe": {"name": name, "algorithm": algo, "in_distribution": in_dist, "group": group, "family": "add",
                       "seed": 0, "trl": trl or {}},
            "points": points, "base_accuracy": {"add": 0.5}, **extra}


def _results(**entries):
    return {"run": {"base": "b", "device": "cpu", "quick": True, "eval_family": "add"}, "recipes": entries,
            "conjecture": {}}


def _seeds(rows, jitter=0.0):
    return {s: [(sp + (s - 1) * jitter, g) for sp, g in rows] for s in (0, 1, 2)}


# Figure 1 ------------------------------------------------------------------------------------

def test_figure1_reproduces_at_a_matched_gain_by_hand():
    r = _results(grpo=_entry("grpo", "grpo", True, _seeds([(0.95, 0.0), (0.8, 0.2), (0.5, 0.3)], 0.001)),
                 sft_id=_entry("sft_id", "sft", False, _seeds([(0.9, 0.0), (0.1, 0.2), (0.05, 0.3)], 0.001)))
    f = figure1.finding(r, PRE)
    # +10 points is halfway between the first two learning rates: 0.95 + (0.8 - 0.95) / 2, 0.9 + (0.1 - 0.9) / 2
    assert f.data["sparsity_at_matched_gain"]["grpo"] == pytest.approx(0.875)
    assert f.data["sparsity_at_matched_gain"]["sft_id"] == pytest.approx(0.5)
    assert f.data["rl_minus_sft"][0] == pytest.approx(0.375)
    assert f.verdict == "reproduces" and f.rule and f.control


def test_figure1_direction_only_is_partly():
    r = _results(grpo=_entry("grpo", "grpo", True, _seeds([(0.6, 0.0), (0.5, 0.2), (0.3, 0.3)])),
                 sft_id=_entry("sft_id", "sft", False, _seeds([(0.9, 0.0), (0.1, 0.2), (0.05, 0.3)])))
    assert figure1.finding(r, PRE).verdict == "partly reproduces"  # 55% vs 50%: sparser, but below 68.5%


def test_figure1_matched_learning_rates_mislead_and_the_matched_gain_fails():
    # RL learns less per step: sparser at every matched learning rate, denser at a matched gain.
    r = _results(grpo=_entry("grpo", "grpo", True, _seeds([(0.95, 0.0), (0.6, 0.05), (0.35, 0.2)])),
                 sft_id=_entry("sft_id", "sft", False, _seeds([(0.9, 0.0), (0.5, 0.2), (0.3, 0.3)])))
    f = figure1.finding(r, PRE)
    assert f.data["matched_lr_tally"]["wins"] == 3
    # RL: 0.6 + (0.35 - 0.6) * (0.10 - 0.05) / (0.2 - 0.05); SFT: 0.9 + (0.5 - 0.9) * 0.5
    assert f.data["sparsity_at_matched_gain"]["grpo"] == pytest.approx(0.6 - 0.25 / 3)
    assert f.data["sparsity_at_matched_gain"]["sft_id"] == pytest.approx(0.7)
    assert f.verdict == "does not reproduce at this scale"


def test_figure1_noisy_seeds_keep_the_interval_across_zero():
    rl = {0: [(0.3, 0.0), (0.3, 0.2), (0.3, 0.3)], 1: [(0.9, 0.0), (0.9, 0.2), (0.9, 0.3)],
          2: [(0.6, 0.0), (0.6, 0.2), (0.6, 0.3)]}
    r = _results(grpo=_entry("grpo", "grpo", True, rl),
                 sft_id=_entry("sft_id", "sft", False, _seeds([(0.5, 0.0), (0.5, 0.2), (0.5, 0.3)])))
    f = figure1.finding(r, PRE)
    diff, lo, hi = f.data["rl_minus_sft"]
    assert diff == pytest.approx(0.1) and lo < 0 < hi
    assert f.verdict == "does not reproduce at this scale"


def test_figure1_a_gain_at_the_level_is_not_lost_to_rounding():
    gain = 0.6 - 0.5  # 0.09999999999999998
    r = _results(grpo=_entry("grpo", "grpo", True, {0: [(0.9, 0.0), (0.8, gain), (0.2, 0.3)]}),
                 sft_id=_entry("sft_id", "sft", False, {0: [(0.9, 0.0), (0.3, gain), (0.1, 0.3)]}))
    f = figure1.finding(r, PRE)
    assert f.data["sparsity_at_matched_gain"] == {"grpo": 0.8, "sft_id": 0.3}


def test_figure1_not_measured_when_a_side_never_reaches_the_gain():
    r = _results(grpo=_entry("grpo", "grpo", True, {0: [(0.9, 0.0), (0.8, 0.01), (0.2, 0.02)]}),
                 sft_id=_entry("sft_id", "sft", False, {0: [(0.9, 0.0), (0.3, 0.2), (0.1, 0.3)]}))
    assert figure1.finding(r, PRE).verdict == "not measured"


# Table 5 -------------------------------------------------------------------------------------

def _dpo(name, sparsity, nll, **kw):
    return _entry(name, "dpo", True, _seeds([(sparsity, 0.0)] * 3), group="table5",
                  data_nll={"chosen": nll, "rejected": nll}, **kw)


def test_table5_lower_nll_sparser_reproduces_and_reversed_fails():
    f = table5.finding(_results(dpo_id=_dpo("dpo_id", 0.8, 0.5), dpo_ood=_dpo("dpo_ood", 0.3, 5.0)), PRE)
    assert f.verdict == "reproduces" and f.data["total"]["wins"] == 3
    assert f.data["controls"]["dpo_id vs dpo_ood"]["in"] == "dpo_id"
    f = table5.finding(_results(dpo_id=_dpo("dpo_id", 0.3, 0.5), dpo_ood=_dpo("dpo_ood", 0.8, 5.0)), PRE)
    assert f.verdict == "does not reproduce at this scale" and f.data["total"]["losses"] == 3
    # "in distribution" is the measured NLL, not the label: a labelled-in recipe with the higher NLL is the "out" side
    f = table5.finding(_results(dpo_id=_dpo("dpo_id", 0.8, 5.0), dpo_ood=_dpo("dpo_ood", 0.3, 0.5)), PRE)
    assert f.data["pairs"][0]["in"] == "dpo_ood" and f.verdict == "does not reproduce at this scale"


def test_table5_within_the_noise_margin_is_a_tie_and_close_nll_is_not_compared():
    f = table5.finding(_results(dpo_id=_dpo("dpo_id", 0.51, 0.5), dpo_ood=_dpo("dpo_ood", 0.5, 5.0)), PRE)
    assert f.data["total"]["ties"] == 3 and f.verdict == "does not reproduce at this scale"
    f = table5.finding(_results(dpo_id=_dpo("dpo_id", 0.8, 0.5), dpo_ood=_dpo("dpo_ood", 0.3, 0.55)), PRE)
    assert f.verdict == "not measured"


# Table 2, Table 6 ----------------------------------------------------------------------------

def test_table2_shows_the_random_sparse_control_and_can_fail():
    e = _entry("grpo", "grpo", True, {0: [(0.5, 0.1)] * 3})
    for p in e["points"]:
        p["update_rank_random_control"] = 1.0
    f = table2.finding(_results(grpo=e), PRE)
    assert f.verdict == "reproduces" and "follows from the density alone" in f.sentence
    for p in e["points"]:
        p["update_rank"] = 0.3
    assert table2.finding(_results(grpo=e), PRE).verdict == "does not reproduce at this scale"


def test_table6_states_the_bf16_spacing_control():
    e = _entry("grpo", "grpo", True, {0: [(0.5, 0.1)] * 3})
    for p in e["points"]:
        p["sparsity"] = {"0": 0.5, "1e-08": 0.5, "1e-07": 0.5, "1e-06": 0.5, "1e-05": 0.52, "1e-04": 0.6}
    r = _results(grpo=e)
    r["controls"] = {"spacing_share": {"0": 1.0, "1e-08": 1.0, "1e-07": 1.0, "1e-06": 0.995, "1e-05": 0.6, "1e-04": 0.1}}
    f = table6.finding(r, PRE)
    assert f.verdict == "reproduces" and "99.5% of base weights" in f.sentence and "1e-05: 60.0%" in f.control
    e["points"][0]["sparsity"]["1e-06"] = 0.6  # a rise of 10 points below 1e-6: fails
    assert table6.finding(r, PRE).verdict == "does not reproduce at this scale"


# Section 6 -----------------------------------------------------------------------------------

def _grpo(name, sparsity, beta, clip, clip_share, kl, schedule=None):
    trl = {"beta": beta, "max_grad_norm": clip, **({"lr_scheduler_type": schedule} if schedule else {})}
    e = _entry(name, "grpo", True, {0: [(sparsity, 0.1)] * 3}, group="kl_clip", trl=trl)
    for p in e["points"]:
        p["clip_active_share"] = clip_share if clip else None
        p["log_history"] = [{"step": 1, "loss": 1.0, "kl": kl}] if beta else [{"step": 1, "loss": 1.0}]
    return e


def test_kl_clip_needs_the_manipulations_to_act():
    acted = _results(grpo=_grpo("grpo", 0.5, 0.04, 1.0, 0.5, 1e-2), grpo_nokl_noclip=_grpo("g2", 0.51, 0.0, 0.0, None, 0))
    assert kl_clip.finding(acted, PRE).verdict == "reproduces"
    inert = _results(grpo=_grpo("grpo", 0.5, 0.04, 1.0, 0.0, 1e-2), grpo_nokl_noclip=_grpo("g2", 0.51, 0.0, 0.0, None, 0))
    f = kl_clip.finding(inert, PRE)
    assert f.verdict == "partly reproduces" and "barely acted" in f.sentence
    apart = _results(grpo=_grpo("grpo", 0.5, 0.04, 1.0, 0.5, 1e-2), grpo_nokl_noclip=_grpo("g2", 0.6, 0.0, 0.0, None, 0))
    assert kl_clip.finding(apart, PRE).verdict == "does not reproduce at this scale"


# Figure 5 ------------------------------------------------------------------------------------

def _trace(levels):
    return [{"step": 10 * i, "bf16": s, "fp32": 0.0} for i, s in enumerate(levels)]


FLAT_END = [1.0, 0.7, 0.6, 0.55, 0.53, 0.52, 0.515, 0.512, 0.511, 0.51]
STRAIGHT = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def _with_trace(name, schedule, levels):
    e = _grpo(name, 0.5, 0.04, 1.0, 0.5, 1e-2, schedule)
    for p in e["points"]:
        p["trace"] = _trace(levels)
    return e


def test_figure5_is_judged_under_a_constant_learning_rate():
    ok = _results(grpo=_with_trace("grpo", None, FLAT_END), grpo_constlr=_with_trace("grpo_constlr", "constant", FLAT_END))
    assert figure5.finding(ok, PRE).verdict == "reproduces"
    # flat only where the learning rate decays to 0: the leveling off is the schedule's
    sched = _results(grpo=_with_trace("grpo", None, FLAT_END),
                     grpo_constlr=_with_trace("grpo_constlr", "constant", STRAIGHT))
    assert figure5.finding(sched, PRE).verdict == "partly reproduces"
    none = _results(grpo=_with_trace("grpo", None, STRAIGHT))
    assert figure5.finding(none, PRE).verdict == "does not reproduce at this scale"


# Conjecture 1 and Figure 4 -------------------------------------------------------------------

def _conj(sub=0.61, rand=0.52, outside=0, reseeded=0.5, loss_sub=0.9):
    return {"recipe": "dpo_id", "learning_rate": 1e-5, "seed": 0, "steps": 10, "selection": "pre-registered",
            "mask_density": 0.2,
            "accuracy": {"full": {"add": 0.6}, "sub": {"add": sub}, "random_mask": {"add": rand},
                         "reseeded_full": {"add": 0.6}},
            "identical_share": {"0": 0.9, "1e-05": 0.95, "1e-04": 1.0},
            "identical_share_reseeded_full": {"0": 0.4, "1e-05": reseeded, "1e-04": 0.9},
            "loss": {"full": [{"step": s, "loss": 1.0 + 0.01 * (s % 2)} for s in range(1, 11)],
                     "sub": [{"step": s, "loss": loss_sub} for s in range(1, 11)],
                     "random_mask": [{"step": s, "loss": 1.0} for s in range(1, 11)]},
            "changed_outside_mask": outside}


def _conj_results(**kw):
    r = _results(dpo_id=_entry("dpo_id", "dpo", True, {0: [(0.5, 0.1)] * 3}))
    r["conjecture"] = {"dpo_id": _conj(**kw)}
    return r


def test_conjecture_passes_with_its_controls():
    f = conjecture.finding(_conj_results(), PRE)
    assert f.verdict == "reproduces" and f.selection == "pre-registered"


@pytest.mark.parametrize("kw, verdict", [
    ({"outside": 3}, "does not reproduce at this scale"),  # masking leaked: nothing was tested
    ({"reseeded": 0.94}, "does not reproduce at this scale"),  # two full runs are as identical anyway
    ({"sub": 0.5}, "does not reproduce at this scale"),  # the subnetwork does not recover the full run
    ({"rand": 0.6}, "partly reproduces"),  # a random mask of the same density does as well
])
def test_conjecture_fails_on_each_control(kw, verdict):
    assert conjecture.finding(_conj_results(**kw), PRE).verdict == verdict


def test_figure4_lower_training_loss_is_judged():
    f = conjecture.figure4(_conj_results(loss_sub=0.9), PRE)
    assert f.verdict == "reproduces"
    assert f.data["dpo_id"]["sub"]["mean_full_minus"] == pytest.approx(0.104)  # steps 6-10: mean full loss 1.004
    assert conjecture.figure4(_conj_results(loss_sub=1.02), PRE).verdict == "does not reproduce at this scale"


# Precision view ------------------------------------------------------------------------------

def test_precision_view_compares_net_drift_of_rl_and_sft():
    rl = _entry("grpo", "grpo", True, {0: [(0.5, 0.1)] * 3})
    sft = _entry("sft_id", "sft", False, {0: [(0.5, 0.1)] * 3})
    for e, d in ((rl, 0.9), (sft, 0.5)):
        for p in e["points"]:
            p["trace"] = _trace(FLAT_END)
            p["net_drift"] = {"net_over_path": d, "mean_ratio": d, "moved": 10}
    f = precision.finding(_results(grpo=rl, sft_id=sft), PRE)
    assert f.data["net_drift_by_lr"][1e-5] == {"rl": 0.9, "sft": 0.5}
    assert "RL more sign-consistent at 3/3" in f.sentence


# Scale trend ---------------------------------------------------------------------------------

def test_scale_trend_orders_runs_by_size_and_reads_the_matched_gain(tmp_path):
    import json

    from rlsparse.lab.verdicts.scale import render_trend, trend

    dirs = []
    for n, rl in ((2_000_000, 0.7), (500_000, 0.4)):
        r = _results(grpo=_entry("grpo", "grpo", True, {0: [(0.95, 0.0), (rl, 0.1), (0.1, 0.3)]}),
                     sft_id=_entry("sft_id", "sft", False, {0: [(0.9, 0.0), (0.3, 0.1), (0.1, 0.3)]}))
        r["run"]["base_metadata"] = {"num_parameters": n, "config": {"hidden_size": n // 10_000}}
        d = tmp_path / f"run-{n}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(d)
    f = trend(dirs)
    assert [(r["parameters"], r["rl"], r["sft"]) for r in f.data["rows"]] == [(500_000, 0.4, 0.3), (2_000_000, 0.7, 0.3)]
    assert "+10.0 to +40.0 points" in f.sentence
    md = render_trend(dirs, tmp_path / "scale")
    assert md.read_text().count("| 500000 |") == 1
    assert (tmp_path / "scale" / "figures" / "scale_trend.png").stat().st_size > 1000
    assert json.loads((tmp_path / "scale" / "scale.json").read_text())["schema_version"] == 1


# Table 4 -------------------------------------------------------------------------------------

def _overlap(o1, uniform, stratified):
    e = _entry("grpo", "grpo", True, {0: [(0.5, 0.1)] * 3, 1: [(0.6, 0.1)] * 3})
    e["seed_overlap"] = [{"learning_rate": 1e-5, "seeds": [0, 1], "o1": o1, "o1_random": uniform,
                          "o1_stratified": stratified}]
    return _results(grpo=e)


def test_table4_is_judged_against_the_stricter_null():
    from rlsparse.lab.verdicts import table4

    # above the stratified null, but seeds are one of the paper's three settings (data, algorithm not measured)
    seeds_only = table4.finding(_overlap(0.666, 0.466, 0.50), PRE)
    assert seeds_only.verdict == "partly reproduces" and "Not measured here: data, algorithm." in seeds_only.sentence
    # beats the uniform null by 20 points, the stratified one by less than the 2-point margin
    assert table4.finding(_overlap(0.666, 0.466, 0.655), PRE).verdict == "partly reproduces"
    assert table4.finding(_overlap(0.666, 0.466, None), PRE).verdict == "partly reproduces"
    # the runner's seed rows get the two cells' sparsities from their points
    assert seeds_only.data["rows"][0]["sparsity_a"] == 0.5 and seeds_only.data["rows"][0]["sparsity_b"] == 0.6
    assert table4.finding(_overlap(0.47, 0.466, 0.46), PRE).verdict == "does not reproduce at this scale"


def test_seeds_of_a_set_of_names_comes_out_sorted_whatever_the_hash_seed():
    """A finding's seed list used to follow set order, so report.md changed with PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    code = ("from rlsparse.lab.verdicts.common import seeds_of\n"
            "names = ['simpo', 'ppo', 'prime', 'grpo_nokl', 'dpo_id', 'dpo_ood', 'rloo', 'grpo', 'orpo', 'kto']\n"
            "res = {'recipes': {n: {'recipe': {'seed': 0}, 'points': [{'seed': 1}, {'seed': 0}]} for n in names}}\n"
            "print(list(seeds_of(res, set(names))), seeds_of(res, names)['kto'])")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)},
                           capture_output=True, text=True, check=True).stdout for h in (1, 2, 3)}
    assert len(outs) == 1
    names = ['dpo_id', 'dpo_ood', 'grpo', 'grpo_nokl', 'kto', 'orpo', 'ppo', 'prime', 'rloo', 'simpo']
    assert outs.pop().strip() == f"{names} [0, 1]"
