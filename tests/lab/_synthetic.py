"""A lab results.json built by hand, in the shape the runner writes: every demo recipe at three
learning rates, full layer x type grids, traces and two Conjecture 1 reruns. For report and
figure tests that need every section without training anything."""

from __future__ import annotations

import json
from pathlib import Path

TOLS = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")
TYPES = ("down", "gate", "k", "norm", "o", "q", "up", "v")  # alphabetical, as JSON keys come back
RECIPES = {"sft_ood": ("sft", False), "sft_id": ("sft", True), "rft": ("sft", True), "dpo_id": ("dpo", True),
           "dpo_ood": ("dpo", False), "grpo": ("grpo", True), "grpo_nokl": ("grpo", True),
           "grpo_noclip": ("grpo", True), "grpo_nokl_noclip": ("grpo", True)}
TRL = {"grpo": {"beta": 0.04, "max_grad_norm": 1.0}, "grpo_nokl": {"beta": 0.0, "max_grad_norm": 1.0},
       "grpo_noclip": {"beta": 0.04, "max_grad_norm": 0.0}, "grpo_nokl_noclip": {"beta": 0.0, "max_grad_norm": 0.0}}
LRS = (1e-6, 1e-5, 1e-4)


def _cell(sparsity: float, numel: int = 1000) -> dict:
    return {"numel": numel, "changed": {t: round(numel * (1 - min(1.0, sparsity + 0.01 * i))) for i, t in
                                        enumerate(TOLS)}}


def _point(k: int, lr_i: int, algo: str) -> dict:
    rl = algo != "sft"
    sparsity = (0.9 if rl else 0.7) - 0.25 * lr_i - 0.01 * k
    gain = 0.05 * lr_i + 0.01 * k
    grid = {f"{layer}|{t}": _cell(1.0 if t == "norm" else sparsity - 0.02 * layer) for layer in range(4) for t in TYPES}
    return {"learning_rate": LRS[lr_i], "checkpoint": f"runs/x/lr-{lr_i}",
            "sparsity": {t: min(1.0, sparsity + 0.01 * i) for i, t in enumerate(TOLS)},
            "accuracy": {"add": 0.5 + gain, "sub": 0.1}, "accuracy_gain": {"add": gain, "sub": 0.0},
            "update_rank": 0.99, "seconds": 1.0, "rows": 10,
            "trace": [{"step": s, "bf16": 1 - (1 - sparsity) * min(1.0, s / 4), "fp32": 0.5 - 0.1 * min(1.0, s / 4)}
                      for s in range(0, 12, 2)],
            "log_history": [{"step": s, "loss": 1.0 / s} for s in range(1, 6)],
            "by_layer": {str(layer): _cell(sparsity - 0.02 * layer) for layer in range(4)} | {"None": _cell(0.9)},
            "by_type": {t: _cell(1.0 if t == "norm" else sparsity) for t in TYPES}, "grid": grid}


def results() -> dict:
    run = {"schema_version": 1, "kind": "rlsparse-lab-run", "base": "cache/base-synthetic", "device": "cpu",
           "quick": True, "eval_family": "add", "threads": 1, "dataset": None, "n_test": 40,
           "precision": {"master_weights": "float32", "compute": "float32", "checkpoint": "bfloat16"},
           "base_metadata": None, "recipes": [], "seeds": {}}
    recipes = {}
    for k, (name, (algo, in_dist)) in enumerate(RECIPES.items()):
        recipe = {"name": name, "algorithm": algo, "in_distribution": in_dist, "seed": 0, "steps": 10,
                  "trl": TRL.get(name, {"beta": 0.1} if algo == "dpo" else {}), "description": name}
        recipes[name] = {"recipe": recipe, "rows": 10, "base_accuracy": {"add": 0.5, "sub": 0.1},
                         "points": [_point(k, i, algo) for i in range(len(LRS))]}
    conjecture = {name: {"recipe": name, "learning_rate": 1e-5, "seed": 0, "steps": 10, "mask_tolerance": "1e-05",
                         "mask_density": 0.4, "accuracy": {"full": {"add": 0.6}, "sub": {"add": 0.6}},
                         "identical_share": {"0": 0.9, "1e-05": 0.95, "1e-04": 1.0},
                         "loss": {"full": [{"step": s, "loss": 1.0 / s} for s in range(1, 6)],
                                  "sub": [{"step": s, "loss": 1.05 / s} for s in range(1, 6)]},
                         "changed_outside_mask": 0, "full_checkpoint": "runs/x", "sub_checkpoint": "conjecture/x"}
                  for name in ("dpo_id", "grpo")}
    return {"schema_version": 1, "run": run, "recipes": recipes, "conjecture": conjecture, "seconds": 1.0}


def write_run(folder: Path) -> Path:
    """A run folder holding only the synthetic results.json and run.json."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = results()
    (folder / "results.json").write_text(json.dumps(doc))
    (folder / "run.json").write_text(json.dumps(doc["run"]))
    return folder
