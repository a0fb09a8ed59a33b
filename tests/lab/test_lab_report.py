import json

import pytest

from rlsparse.errors import CheckpointError
from rlsparse.lab.report import findings, render

TOLS = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")


def _point(lr, sparsity, gain, rank=1.0):
    bump = {"0": 0.0, "1e-08": 0.0, "1e-07": 0.0, "1e-06": 0.001, "1e-05": 0.02, "1e-04": 0.05}
    s = {t: min(1.0, sparsity + bump[t]) for t in TOLS}
    cell = lambda sp: {"numel": 100, "changed": {t: round(100 * (1 - sp)) for t in TOLS}}  # noqa: E731
    return {"learning_rate": lr, "sparsity": s, "accuracy": {"add": 0.5 + gain}, "accuracy_gain": {"add": gain},
            "update_rank": rank, "trace": [{"step": i, "bf16": 1 - (1 - sparsity) * min(1, i / 3),
                                            "fp32": 0.5 - 0.5 * min(1, i / 3)} for i in range(10)],
            "log_history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}],
            "by_layer": {"0": cell(sparsity), "1": cell(sparsity), "None": cell(1.0)},
            "by_type": {"q_proj": cell(sparsity), "input_layernorm": cell(1.0)},
            "grid": {"0|q_proj": cell(sparsity), "1|q_proj": cell(sparsity), "0|input_layernorm": cell(1.0)}}


def _recipe(name, algo, in_dist, trl=None):
    return {"name": name, "algorithm": algo, "in_distribution": in_dist, "seed": 7, "steps": 10, "trl": trl or {}}


def _results(rl_sparsity, sft_sparsity, conj_sub=0.62, kl_gap=0.01):
    lrs = (1e-6, 1e-5)
    rec = {
        "sft_ood": (_recipe("sft_ood", "sft", False), [_point(lr, sft_sparsity, 0.2) for lr in lrs]),
        "dpo_id": (_recipe("dpo_id", "dpo", True, {"beta": 0.1}), [_point(lr, rl_sparsity, 0.1) for lr in lrs]),
        "grpo": (_recipe("grpo", "grpo", True, {"beta": 0.04, "max_grad_norm": 1.0}),
                 [_point(lr, rl_sparsity, 0.2) for lr in lrs]),
        "grpo_nokl": (_recipe("grpo_nokl", "grpo", True, {"beta": 0.0, "max_grad_norm": 1.0}),
                      [_point(lr, rl_sparsity - kl_gap, 0.2) for lr in lrs]),
    }
    results = {"schema_version": 1, "run": {"base": "b", "device": "cpu", "quick": True, "eval_family": "add",
                                            "precision": {"training": "float32", "checkpoint": "bfloat16"},
                                            "base_metadata": None},
               "recipes": {n: {"recipe": r, "points": p, "base_accuracy": {"add": 0.5}} for n, (r, p) in rec.items()},
               "conjecture": {"dpo_id": {"recipe": "dpo_id", "learning_rate": 1e-5, "seed": 7, "steps": 10,
                                         "mask_density": 0.2, "accuracy": {"full": {"add": 0.6}, "sub": {"add": conj_sub}},
                                         "identical_share": {"0": 0.9, "1e-05": 0.94, "1e-04": 1.0},
                                         "loss": {"full": [{"step": 1, "loss": 1.0}], "sub": [{"step": 1, "loss": 0.9}]},
                                         "changed_outside_mask": 0}}}
    return results


def _by_key(results):
    return {f.key: f for f in findings(results)}


def test_verdicts_follow_the_data():
    good = _by_key(_results(rl_sparsity=0.8, sft_sparsity=0.1))
    assert good["sparsity_sft_vs_rl"].verdict == "reproduces"
    # sparsity at 1e-5 is the point's sparsity + 0.02 (see _point); every curve reaches +10 points at its first point
    assert good["sparsity_sft_vs_rl"].data["sparsity_at_matched_gain"] == pytest.approx(
        {"dpo_id": 0.82, "grpo": 0.82, "grpo_nokl": 0.81, "sft_ood": 0.12})
    # the manipulations were not shown to act (no clip share, no logged KL): at most partly
    assert good["kl_clip"].verdict == "partly reproduces"
    assert good["tolerance"].verdict == "reproduces"
    assert good["rank"].verdict == "reproduces"
    assert good["layers"].data["norm_vs_matrices"]["grpo"]["norm"] == 1.0
    assert good["sparsity_sft_vs_rl"].seeds == {"dpo_id": [7], "grpo": [7], "grpo_nokl": [7], "sft_ood": [7]}
    assert all(f.rule for f in good.values() if f.verdict != "not measured" and f.key != "layers")

    direction_only = _by_key(_results(rl_sparsity=0.3, sft_sparsity=0.1))
    assert direction_only["sparsity_sft_vs_rl"].verdict == "partly reproduces"
    assert "dpo_id 32.0%" in direction_only["sparsity_sft_vs_rl"].sentence

    bad = _by_key(_results(rl_sparsity=0.1, sft_sparsity=0.5, conj_sub=0.3, kl_gap=0.2))
    assert bad["sparsity_sft_vs_rl"].verdict.startswith("does not reproduce")
    assert bad["kl_clip"].verdict.startswith("does not reproduce")
    assert "20.0 points" in bad["kl_clip"].sentence
    assert bad["conjecture"].verdict.startswith("does not reproduce")


def test_render_writes_html_markdown_json_and_figures(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results(0.8, 0.1)))
    page, md = render(tmp_path)
    text = md.read_text()
    assert "Verdict: reproduces" in text and "Paper:" in text and "Seeds:" in text
    assert "<img src='figures/sparsity_vs_lr.png'" in page.read_text()
    for png in ("sparsity_vs_lr", "sparsity_vs_gain", "tolerance_sweep", "update_rank", "layer_matrix", "kl_clip",
                "conjecture_loss"):
        assert (tmp_path / "figures" / f"{png}.png").stat().st_size > 1000
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["key"] for f in report["findings"]][0] == "sparsity_sft_vs_rl"
    assert not list(tmp_path.glob(".*tmp*"))


def test_render_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="no results.json"):
        render(tmp_path)


def test_a_skipped_conjecture_rerun_is_reported_not_plotted(tmp_path):
    results = _results(0.8, 0.1)
    results["conjecture"]["grpo"] = {"recipe": "grpo", "learning_rate": 1e-5, "seed": 7, "steps": 10,
                                     "mask_density": 0.0, "skipped": "the full run changed no parameter"}
    f = _by_key(results)["conjecture"]
    assert f.verdict.startswith("does not reproduce") and "grpo: not rerun" in f.sentence
    (tmp_path / "results.json").write_text(json.dumps(results))
    render(tmp_path)
    assert (tmp_path / "figures" / "conjecture_loss.png").is_file()


def test_dynamics_and_precision_findings():
    f = _by_key(_results(0.8, 0.1))
    dyn, prec = f["dynamics"], f["precision"]
    # the synthetic trace falls early and then stays flat, but no constant-learning-rate control was run
    assert dyn.verdict == "partly reproduces" and "no constant-learning-rate control" in dyn.sentence
    assert {k.split(" ")[0] for k in dyn.data["curves"]} == {"dpo_id", "grpo", "grpo_nokl"}
    assert prec.data["rows"]["grpo"][0] == {"lr": 1e-6, "bf16": pytest.approx(0.8), "fp32": 0.0, "net_drift": None,
                                            "seed": None}
    assert f["tolerance"].data["rise_1e-8_to_1e-6"] == pytest.approx(0.001)
    assert "made by bf16 rounding" in prec.sentence
