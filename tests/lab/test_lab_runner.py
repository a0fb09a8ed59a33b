"""The runner end to end on the tiny base: TRL's SFT, DPO and GRPO trainers for a few steps,
the Conjecture 1 masked rerun, checkpoints, JSON and the report."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsparse.errors import OutputError, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from _recipes import write_recipe  # noqa: E402


def _cli(argv):
    from rlsparse.cli import lab_cmd

    parser = argparse.ArgumentParser(prog="rlsparse")
    sub = parser.add_subparsers(dest="command")
    lab_cmd.add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_lab_run_and_report_through_the_cli(tiny_base, tmp_path, capsys):
    recipes = [
        write_recipe(tmp_path, "t_sft", algorithm="sft", family="sub", data="ground_truth"),
        write_recipe(tmp_path, "t_dpo", algorithm="dpo", family="sub", data="constructed_pairs", conjecture=True,
                trl={"beta": 0.1}, learning_rates=[1e-2]),
        write_recipe(tmp_path, "t_grpo", algorithm="grpo", family="add", data="prompts", in_distribution=True,
                conjecture=True, trl={"beta": 0.04, "num_generations": 4, "max_grad_norm": 0.0},
                learning_rates=[1e-2]),
    ]
    out = tmp_path / "run"
    assert _cli(["lab", "run", ",".join(recipes), "--out", str(out), "--model", str(tiny_base)]) == 0
    results = json.loads((out / "results.json").read_text())
    run = json.loads((out / "run.json").read_text())
    from rlsparse.lab.runner import _native_bf16

    assert run["precision"] == {"master_weights": "float32", "checkpoint": "bfloat16", "base_checkpoint": "bfloat16",
                                "compute": "bfloat16" if _native_bf16("cpu") else "float32"}
    assert run["seeds"] == {"t_sft": 1, "t_dpo": 1, "t_grpo": 1}
    assert run["recipes"][2]["trl"]["beta"] == 0.04
    for name in ("t_sft", "t_dpo", "t_grpo"):
        points = results["recipes"][name]["points"]
        assert [p["learning_rate"] for p in points] == ([1e-3, 1e-2] if name == "t_sft" else [1e-2])
        for p in points:
            ckpt = out / p["checkpoint"]
            assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
            assert {t.dtype for t in load_file(str(ckpt / "model.safetensors")).values()} == {torch.bfloat16}
            assert (ckpt / "metrics.json").is_file()
            assert 0 <= p["sparsity"]["1e-05"] <= 1 and p["log_history"]
        # a learning rate of 1e-2 for 2 Adam steps moves most bf16 weights, unless GRPO had no signal
        if name != "t_grpo":
            assert points[-1]["sparsity"]["0"] < 0.5
    for p in results["recipes"]["t_sft"]["points"]:
        trace = p["trace"]
        assert trace[0] == {"step": 0, "bf16": 1.0, "fp32": 1.0} and trace[-1]["step"] == 2
        # the live bf16 view at the last step is exactly what the saved bf16 checkpoint shows
        assert trace[-1]["bf16"] == pytest.approx(p["sparsity"]["1e-05"], abs=1e-12)
        assert trace[-1]["fp32"] <= trace[-1]["bf16"]
        # the checkpoint series: its final part is exactly the saved checkpoint's changed elements
        s = p["series"]
        assert s["final"] == p["changed"]["1e-05"] and s["never"] + s["cancelled"] + s["final"] == s["numel"]
        assert s["ever"] >= s["final"] and [d["step"] for d in s["per_step"]] == [1, 2]
        # step 1's share is the change from the start, i.e. the traced bf16 view at step 1
        assert s["per_step"][0]["share"] == pytest.approx(1 - trace[1]["bf16"], abs=1e-12)
    grpo = results["recipes"]["t_grpo"]["points"][0]
    assert grpo["trainer"] == "GRPOTrainer"
    assert grpo["trl_config"]["beta"] == 0.04 and grpo["trl_config"]["max_grad_norm"] == 0.0
    assert grpo["trl_config"]["learning_rate"] == 1e-2 and grpo["trl_config"]["max_steps"] == 2
    conj = results["conjecture"]
    assert set(conj) == {"t_dpo", "t_grpo"}
    assert "skipped" not in conj["t_dpo"]
    for c in conj.values():
        if c.get("skipped"):  # GRPO on a tiny base that is never right gets no reward signal
            assert c["mask_density"] == 0.0
            continue
        # the masked rerun inside TRL's trainer never moved a weight outside the subnetwork
        assert c["changed_outside_mask"] == 0
        assert (out / c["sub_checkpoint"] / "model.safetensors").is_file()
        assert set(c["identical_share"]) == {"0", "1e-05", "1e-04"}
        assert c["loss"]["full"] and c["loss"]["sub"]
        # the controls: a random mask of the same per-tensor density (also confined), a reseeded full run
        assert c["changed_outside_random_mask"] == 0
        assert set(c["identical_share_random_mask"]) == set(c["identical_share_reseeded_full"]) == {"0", "1e-05", "1e-04"}
        assert (out / c["reseeded_checkpoint"] / "model.safetensors").is_file()
        assert c["selection"].startswith("best case")  # no conjecture_lr in these recipes
    sft = results["recipes"]["t_sft"]
    assert set(sft["data_nll"]) == {"completion"} and sft["data_nll"]["completion"] > 0
    for p in sft["points"]:
        assert p["probe_kl"] > 0 and p["delta_norm"] > 0 and p["seed"] == 1 and p["start"] == "base"
        assert 0 < p["net_drift"]["net_over_path"] <= 1 and 0 <= p["update_rank_random_control"] <= 1
        # the cell's runtime by phase, measured (training is the trainer's own clock)
        assert set(p["phase_seconds"]) == {"training", "training_setup", "evaluation", "evaluation_load", "sparsity",
                                           "update_rank", "rank_control", "load_models", "probe_base", "probe_kl",
                                           "delta_norm"}
        assert p["phase_seconds"]["training"] == p["seconds"] and p["phase_seconds"]["evaluation"] == p["eval_seconds"]
        assert all(v >= 0 for v in p["phase_seconds"].values())
    assert results["recipes"]["t_grpo"]["points"][0]["clip_active_share"] is None  # max_grad_norm 0: no clipping
    assert set(results["controls"]["spacing_share"]) == {"0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04"}
    assert len(run["preregistration"]["sha256"]) == 64
    report = json.loads((out / "report.json").read_text())
    series = next(f for f in report["findings"] if f["key"] == "series")
    assert series["verdict"] != "not measured" and set(series["data"]["runs"]) >= {"t_dpo lr 0.01 seed 1"}
    for f in ("report.html", "report.md", "report.json", "figures/sparsity_vs_lr.png", "figures/conjecture_loss.png",
              "figures/checkpoint_series.png"):
        assert (out / f).is_file(), f
    capsys.readouterr()
    assert _cli(["lab", "report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_seeds_pre_sft_and_a_preregistered_conjecture_run(tiny_base, tmp_path, monkeypatch):
    from rlsparse.lab import runner

    # the tiny test base is never right, so give it samples with a correct/incorrect mix
    monkeypatch.setattr(runner._Run, "policy_samples",
                        lambda self, r, probs: [[p.answer, str(int(p.answer) + 1)] for p in probs])
    recipe = write_recipe(tmp_path, "t_fmt", algorithm="dpo", data="format_pairs", in_distribution=True, seeds=[1, 2],
                     learning_rates=[1e-2], pre_sft={"learning_rate": 1e-2, "steps": 2}, conjecture=True,
                     conjecture_lr=1e-2, trl={"beta": 0.1})
    out = tmp_path / "run"
    runner.run_lab([recipe], runner.LabOptions(out=out, model=str(tiny_base), report=False), log=lambda m: None)
    results = json.loads((out / "results.json").read_text())
    entry = results["recipes"]["t_fmt"]
    assert [(p["seed"], p["checkpoint"], p["start"]) for p in entry["points"]] == [
        (1, "runs/t_fmt/lr-1e-2", "runs/t_fmt/pre-sft-seed1"), (2, "runs/t_fmt/lr-1e-2-seed2", "runs/t_fmt/pre-sft-seed2")]
    # sparsity is measured against the recipe's own start, the pre-SFT model
    from rlsparse.lab import measure

    again = measure.sparsity(out / "runs/t_fmt/pre-sft-seed1", out / "runs/t_fmt/lr-1e-2")
    assert again["changed"] == entry["points"][0]["changed"]
    assert set(entry["data_nll"]) == {"chosen", "rejected"}
    c = results["conjecture"]["t_fmt"]
    assert c["selection"].startswith("pre-registered") and c["learning_rate"] == 1e-2
    assert c["reseeded_checkpoint"] == "runs/t_fmt/lr-1e-2-seed2"  # the seed-2 sweep point, not a new run
    assert c["changed_outside_mask"] == 0 and c["changed_outside_random_mask"] == 0


def test_fp32_checkpoints_and_jsonl_dataset(tiny_base, tmp_path):
    data = tmp_path / "real.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 60)))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, "t_sft", algorithm="sft", data="ground_truth", learning_rates=[1e-3])
    _cli(["lab", "run", recipe, "--out", str(out), "--model", str(tiny_base), "--dataset", str(data),
          "--fp32-checkpoints", "--no-conjecture"])
    results = json.loads((out / "results.json").read_text())
    point = results["recipes"]["t_sft"]["points"][0]
    assert set(point["accuracy"]) == {"jsonl"}
    assert results["run"]["precision"]["checkpoint"] == "float32"
    assert {t.dtype for t in load_file(str(out / point["checkpoint"] / "model.safetensors")).values()} == {torch.float32}


def test_policy_sample_data_uses_the_base_samples(tiny_base, tmp_path, monkeypatch):
    from rlsparse.lab import runner
    from rlsparse.lab.recipes import Recipe

    run = runner._Run(runner.LabOptions(out=tmp_path), log=lambda m: None)
    run.base_path = tiny_base
    recipe = Recipe(name="x", algorithm="dpo", data="policy_samples", n_train=6, samples_per_prompt=2)
    train = run.problems("add")[0][:6]
    monkeypatch.setattr(run, "policy_samples",
                        lambda r, probs: [[p.answer, p.answer + "1"] for p in probs])
    rows = runner.build_rows(run, recipe)
    assert [r["chosen"] for r in rows] == [p.answer for p in train]
    assert all(r["rejected"] == r["chosen"] + "1" for r in rows)
    monkeypatch.setattr(run, "policy_samples", lambda r, probs: [["x", "y"] for _ in probs])
    with pytest.raises(UsageError, match="no usable samples"):
        runner.build_rows(run, recipe)


def test_bad_options_fail_before_any_output(tmp_path):
    from rlsparse.lab.runner import LabOptions, run_lab

    with pytest.raises(UsageError, match="not found"):
        run_lab(["no_such_recipe"], LabOptions(out=tmp_path / "a", model="x"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(OutputError, match="not an rlsparse lab run folder"):
        run_lab(["grpo"], LabOptions(out=tmp_path / "busy", model="x"))
    with pytest.raises(UsageError, match="--device"):
        run_lab(["grpo"], LabOptions(out=tmp_path / "b", device="tpu"))


def test_a_bad_trl_field_is_a_usage_error(tmp_path):
    from rlsparse.lab.recipes import Recipe
    from rlsparse.lab.runner import _trl_config

    with pytest.raises(UsageError, match="not GRPOConfig fields"):
        _trl_config(Recipe(name="x", algorithm="grpo", trl={"betta": 0.1}), 1e-5, str(tmp_path), "cpu")


def test_the_conjecture_uses_the_sparsest_run_that_learned():
    from rlsparse.lab.runner import choose_subnetwork_run

    pts = [{"learning_rate": lr, "sparsity": {"1e-05": s}, "accuracy_gain": {"add": g}}
           for lr, s, g in ((1e-6, 0.9, 0.01), (1e-5, 0.5, 0.07), (1e-4, 0.1, 0.3))]
    assert choose_subnetwork_run(pts, "add")["learning_rate"] == 1e-5
    for p in pts:
        p["accuracy_gain"]["add"] = -0.1
    pts[2]["accuracy_gain"]["add"] = 0.0
    assert choose_subnetwork_run(pts, "add")["learning_rate"] == 1e-4


def test_precision_options_resolve_and_are_checked(tmp_path):
    from rlsparse.errors import UsageError
    from rlsparse.lab.runner import LabOptions, resolve_precision, run_lab

    fp32 = resolve_precision(LabOptions(out=tmp_path, compute="float32"))
    assert fp32 == {"master_weights": "float32", "compute": "float32", "checkpoint": "bfloat16"}
    pure = resolve_precision(LabOptions(out=tmp_path, weights="bfloat16", compute="float32"))
    assert pure["master_weights"] == "bfloat16" and pure["compute"] == "bfloat16"
    with pytest.raises(UsageError, match="compute"):
        run_lab(["grpo"], LabOptions(out=tmp_path / "x", compute="fp8"))


def test_policy_samples_use_the_recipe_temperature_and_cache_per_temperature(tiny_base, tmp_path, monkeypatch):
    from rlsparse.lab import data as labdata
    from rlsparse.lab import runner
    from rlsparse.lab.recipes import Recipe

    run = runner._Run(runner.LabOptions(out=tmp_path), log=lambda m: None)
    run.base_path = tiny_base
    seen = []
    real_sample = labdata.sample

    def recording(*args, **kwargs):
        seen.append(kwargs["temperature"])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(labdata, "sample", recording)
    probs = run.problems("add")[0][:3]
    hot = Recipe(name="a", algorithm="rft", data="policy_samples", samples_per_prompt=2)
    cool = Recipe(name="b", algorithm="rft", data="policy_samples", samples_per_prompt=2, sample_temperature=0.7)
    run.policy_samples(hot, probs)
    run.policy_samples(cool, probs)
    run.policy_samples(cool, probs)  # served from memory, not sampled again
    assert seen == [1.0, 0.7]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["add-3-2-seed0-t0.7.json", "add-3-2-seed0.json"]
    with pytest.raises(UsageError, match="sample_temperature"):
        Recipe(name="c", algorithm="rft", sample_temperature=0)
