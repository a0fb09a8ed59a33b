"""The prediction experiment end to end on the test's tiny base: every cell lands on disk, the
plain resume reproduces the full run bit for bit, masked training moves nothing outside its mask."""

from __future__ import annotations

import json

from rlsparse.lab.predict_lab import PredictExperiment, run_predict_lab


def test_predict_lab_tiny(tmp_path, tiny_config, tiny_base):
    design = {"name": "t", "recipes": ["sft_id"], "learning_rate": 1e-3, "steps": 4, "n_test": 20, "n_train": 16,
              "k_fractions": [0.5], "checkpoint_every": 1, "tolerance": "1e-05",
              "predictors": ["checkpoint", "union", "vote", "adam_ratio", "adam_drift", "precision", "random"],
              "train_predictors": ["union", "full"]}
    path = tmp_path / "design.json"
    path.write_text(json.dumps(design))
    assert PredictExperiment.load(path).k_steps() == [2]
    out = run_predict_lab(tmp_path / "run", experiment=path, cache_dir=str(tiny_base.parent), base=tiny_config,
                          log=lambda s: None)
    results = json.loads((out / "results.json").read_text())["recipes"]["sft_id"]
    scores = results["scores"]["2"]["predictors"]
    assert set(scores) == set(design["predictors"])
    final = results["full"]
    for row in scores.values():
        a = row["at_final_density"]
        assert a["predicted"] == round(final["final_density"] * final["numel"])
        assert a["random"]["recall"] == a["predicted"] / final["numel"]
    full, union = results["train"]["2"]["full"], results["train"]["2"]["union"]
    assert full["identical_to_full"]["0"] == 1.0  # resuming without a mask is the full run, bit for bit
    assert union["changed_outside_mask_since_k"] == 0
    assert union["sparse_adamw_state_bytes"] < union["dense_adamw_state_bytes"]
    assert (out / "report.md").read_text().count("| union |") >= 2
    assert (out / "figures" / "pr_sft_id_k2.png").is_file() and (out / "figures" / "recall_vs_k.png").is_file()
