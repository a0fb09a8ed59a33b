"""The prediction experiment: how early can the subnetwork be known, and what does training only
the prediction cost? A recipe over the library (``rlsparse.predict``, ``rlsparse.train``).

Its design is data: ``lab/experiments/predict_tiny.json`` fixes the recipes, k, the predictors,
their thresholds and the runs to score before anything is scored. For each recipe:

1. the full run, with Trainer checkpoints (weights and AdamW state) every few steps up to the
   largest k, saved in bf16 at the end; its subnetwork (changed at the tolerance) is the truth;
2. the cheaper runs: a short run (a quarter of the steps, its own schedule), another seed, and
   the other recipe's full run;
3. at each k, every predictor scored at its natural threshold and at the final mask's density
   (with the precision-recall curve and the random baselines);
4. at each k, the run resumed from its step-k checkpoint training only a predicted subnetwork (at
   the final density) with ``MaskCallback``, plus a plain resume (``full``) as the control.

Every cell lands on disk as it finishes (``cells/*.json``); a finished cell is never rerun.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from rlsparse.errors import UsageError
from rlsparse.io.atomic import write_json

EXPERIMENT_SCHEMA_VERSION = 1


@dataclass
class PredictExperiment:
    """The pre-registered design (see the module docstring and the JSON file)."""

    name: str
    recipes: list[str]
    learning_rate: float
    steps: int
    k_fractions: list[float]
    checkpoint_every: int
    tolerance: str = "1e-05"
    predictors: list[str] = field(default_factory=list)
    train_predictors: list[str] = field(default_factory=list)
    train_density: str = "final"
    cheaper: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    n_test: int = 1000
    n_train: int | None = None
    description: str = ""
    registered: str = ""
    quick: dict = field(default_factory=dict)
    schema_version: int = EXPERIMENT_SCHEMA_VERSION

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PredictExperiment":
        """The built-in design (``predict_tiny``) or a JSON file with the same fields."""
        p = Path(path) if path else Path(str(resources.files("rlsparse.lab") / "experiments" / "predict_tiny.json"))
        if not p.is_file():
            raise UsageError(f"{p}: no such experiment file; pass a JSON file like lab/experiments/predict_tiny.json")
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UsageError(f"{p}: unknown fields {unknown}; expected only {sorted(known)}")
        return cls(**doc)

    def quickened(self) -> "PredictExperiment":
        return replace(self, **self.quick) if self.quick else self

    def k_steps(self) -> list[int]:
        """The step of each k (rounded to a checkpoint step)."""
        every = self.checkpoint_every
        return [max(every, int(round(f * self.steps / every)) * every) for f in self.k_fractions]


def run_predict_lab(out: str | Path, *, experiment: str | Path | None = None, quick: bool = False,
                    cache_dir: str | None = None, base=None, log=print) -> Path:
    """Run the prediction experiment into ``out`` (resumable) and write its report.

    Args:
        out: The run folder.
        experiment: The design file (default: the built-in ``predict_tiny.json``).
        quick: Apply the design's ``quick`` overrides (a smoke run).
        cache_dir: Where the tiny base is cached.
        base: A ``BaseConfig`` for the tiny base (default: the lab's).
        log: Progress printer.

    Example:
        >>> run_predict_lab("runs/predict", quick=True)
    """
    import torch

    from rlsparse.lab.base import BaseConfig, ensure_base
    from rlsparse.lab.runner import LabOptions, _quiet, _Run

    design = PredictExperiment.load(experiment)
    if quick:
        design = design.quickened()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    torch.set_num_threads(1)
    opts = LabOptions(out=out, cache_dir=cache_dir, n_test=design.n_test, trace=False, conjecture=False,
                      report=False, base=base or BaseConfig())
    run = _Run(opts, log)
    run.base_path = ensure_base(opts.base, cache_dir)
    write_json(out / "experiment.json", {**asdict(design), "quick": quick, "base": str(run.base_path)})
    lab = _PredictLab(run, design, out, log)
    started = time.time()
    for name in design.recipes:
        lab.full_run(name)
    for name in design.recipes:
        lab.cheaper_runs(name)
    for name in design.recipes:
        for k in design.k_steps():
            lab.score_predictors(name, k)
    cells = [(n, k, p) for n in design.recipes for k in design.k_steps() for p in design.train_predictors]
    todo = [c for c in cells if lab.done(c[0], f"k{c[1]}", f"train_{c[2]}") is None]
    train_started = time.time()
    for i, (name, k, predictor) in enumerate(todo):
        if i:
            rate = (time.time() - train_started) / i
            log(f"[train {i + 1}/{len(todo)}] {rate:.0f} s per run, about {rate * (len(todo) - i) / 60:.0f} min left")
        lab.train_from_k(name, k, predictor)
    from rlsparse.lab.predict_report import render

    md = render(out)
    log(f"predict lab: done in {time.time() - started:.0f} s; report {md}")
    return out


class _PredictLab:
    def __init__(self, run, design: PredictExperiment, out: Path, log):
        self.run, self.design, self.out, self.log = run, design, out, log

    # helpers ------------------------------------------------------------------------------------
    def recipe(self, name: str, **changes):
        from rlsparse.lab.recipes import load_recipe

        r = load_recipe(name)
        fields = {"learning_rates": [self.design.learning_rate], "steps": self.design.steps, **changes}
        if self.design.n_train:
            fields["n_train"] = self.design.n_train
        return replace(r, **fields)

    def cell(self, *parts: str) -> Path:
        return self.out / "cells" / ("__".join(parts) + ".json")

    def done(self, *parts: str) -> dict | None:
        p = self.cell(*parts)
        return json.loads(p.read_text()) if p.is_file() else None

    def save_cell(self, doc: dict, *parts: str) -> None:
        p = self.cell(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json(p, doc)

    def final_mask_path(self, name: str) -> Path:
        return self.out / "masks" / name / "final.mask.safetensors"

    def eval(self, recipe, folder: Path) -> float:
        from rlsparse.lab.base import accuracy, load_model

        model, tok = load_model(folder)
        tests = self.run.test_sets(recipe)[self.run.eval_key(recipe)]
        return accuracy(model, tok, tests, max_new_tokens=self.run.opts.max_new_tokens)

    # 1. the full run ----------------------------------------------------------------------------
    def full_run(self, name: str) -> dict:
        if (doc := self.done(name, "full")) is not None:
            return doc
        from rlsparse.lab import measure
        from rlsparse.lab.runner import build_rows

        recipe = self.recipe(name)
        folder = self.out / "runs" / name / "full"
        save_at = sorted({s for s in range(self.design.checkpoint_every, max(self.design.k_steps()) + 1,
                                           self.design.checkpoint_every)})
        self.log(f"{name}: full run, {recipe.steps} steps at lr {self.design.learning_rate:g}, "
                 f"checkpoints at {len(save_at)} steps up to {save_at[-1]}")
        rows = build_rows(self.run, recipe)
        seconds = _train(self.run, recipe, rows, folder / "final", trainer_dir=folder / "trainer", save_at=save_at)
        mask = measure.subnetwork_mask(self.run.base_path, folder / "final", self.final_mask_path(name),
                                       self.design.tolerance)
        base_acc = self.run.base_accuracy(recipe)[self.run.eval_key(recipe)]
        doc = {"recipe": name, "seconds": seconds, "accuracy": self.eval(recipe, folder / "final"),
               "base_accuracy": base_acc, "final_density": mask.density, "numel": mask.numel,
               "checkpoints": save_at}
        self.log(f"  accuracy {doc['accuracy']:.1%} (base {base_acc:.1%}), final density {mask.density:.2%}")
        self.save_cell(doc, name, "full")
        return doc

    # 2. cheaper runs ----------------------------------------------------------------------------
    def cheaper_runs(self, name: str) -> None:
        from rlsparse.lab.runner import build_rows

        c = self.design.cheaper
        variants = {"run_short": {"steps": max(1, int(round(c.get("short_fraction", 0.25) * self.design.steps)))},
                    "run_seed": {"seed": int(c.get("seed", 1))}}
        for label, changes in variants.items():
            if label not in self.design.predictors or self.done(name, label) is not None:
                continue
            recipe = self.recipe(name, **changes)
            folder = self.out / "runs" / name / label
            self.log(f"{name}: cheaper run {label} ({changes})")
            seconds = _train(self.run, recipe, build_rows(self.run, recipe), folder)
            self.save_cell({"recipe": name, "variant": label, "changes": changes, "seconds": seconds,
                            "accuracy": self.eval(recipe, folder)}, name, label)

    def cheaper_folder(self, name: str, label: str) -> Path | None:
        if label == "run_other":
            other = self.design.cheaper.get("other", {}).get(name)
            return self.out / "runs" / other / "full" / "final" if other else None
        return self.out / "runs" / name / label

    # 3. score every predictor at k --------------------------------------------------------------
    def predictions(self, name: str, k: int) -> dict:
        from rlsparse.masks import Mask
        from rlsparse.predict import from_checkpoints, from_optimizer, from_precision, run_checkpoints, uniform

        base = self.run.base_path
        tol = float(self.design.tolerance)
        trainer = self.out / "runs" / name / "full" / "trainer"
        upto = [p for s, p in run_checkpoints(trainer).items() if s <= k]
        final = Mask.load(self.final_mask_path(name))
        preds = {}
        for p in self.design.predictors:
            if p in ("checkpoint", "union", "vote"):
                preds[p] = from_checkpoints(base, upto, method=p, tolerance=tol)
            elif p in ("adam_ratio", "adam_drift"):
                preds[p] = from_optimizer(base, upto[-1], score=p, horizon=self.design.steps)
            elif p == "precision":
                preds[p] = from_precision(base, lr=self.design.learning_rate, steps=self.design.steps)
            elif p.startswith("run_"):
                folder = self.cheaper_folder(name, p)
                if folder is not None:
                    preds[p] = from_checkpoints(base, [folder], tolerance=tol, predictor=p)
            elif p == "random":
                preds[p] = uniform({n: final.shape(n) for n in final.names})
            else:
                raise UsageError(f"experiment predictor {p!r} is unknown; fix the experiment file")
        return preds

    def score_predictors(self, name: str, k: int) -> None:
        if self.done(name, f"k{k}", "scores") is not None:
            return
        from rlsparse.masks import Mask
        from rlsparse.predict import score
        from rlsparse.predict.plots import pr_curves
        from rlsparse.train.sparse_adamw import planned_state_bytes

        self.log(f"{name}: scoring predictors at step {k}")
        final = Mask.load(self.final_mask_path(name))
        mask_dir = self.out / "masks" / name / f"k{k}"
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows, curves = {}, {}
        for label, pred in self.predictions(name, k).items():
            at_final = pred.mask(density=final.density)
            at_final.save(mask_dir / f"{label}.mask.safetensors")
            s = score(at_final, final, prediction=pred, base=self.run.base_path)
            row = {"predictor": label, "params": pred.params, "at_final_density": _brief(s),
                   "sparse_adamw_state_bytes": planned_state_bytes(at_final), "dense_adamw_state_bytes":
                   8 * final.numel + 4 * len(final.names), "curve": s.curve.points()}
            if pred.threshold is not None:
                natural = pred.mask()
                if natural.ones:
                    row["natural"] = _brief(score(natural, final, base=self.run.base_path))
                else:
                    row["natural"] = {"density": 0.0, "note": "the natural threshold selects nothing"}
            rows[label] = row
            curves[label] = s.curve
            self.log(f"  {label:11s} recall@final {_fmt(row['at_final_density']['recall'])} "
                     f"(random {_fmt(row['at_final_density']['random']['recall'])})")
        (self.out / "figures").mkdir(exist_ok=True)
        pr_curves(curves, self.out / "figures" / f"pr_{name}_k{k}.png",
                  title=f"{name}: predictors at step {k} of {self.design.steps} vs the final subnetwork",
                  final_density=final.density)
        self.save_cell({"recipe": name, "k": k, "final_density": final.density, "predictors": rows},
                       name, f"k{k}", "scores")

    # 4. train only the prediction from step k ---------------------------------------------------
    def train_from_k(self, name: str, k: int, predictor: str) -> None:
        if self.done(name, f"k{k}", f"train_{predictor}") is not None:
            return
        from rlsparse.lab.runner import build_rows
        from rlsparse.masks import Mask
        from rlsparse.predict import checkpoint_at
        from rlsparse.train.sparse_adamw import planned_state_bytes

        recipe = self.recipe(name)
        start = checkpoint_at(self.out / "runs" / name / "full" / "trainer", k)
        mask = None if predictor == "full" else Mask.load(self.out / "masks" / name / f"k{k}" /
                                                           f"{predictor}.mask.safetensors")
        folder = self.out / "runs" / name / f"k{k}" / predictor
        self.log(f"{name}: resume at step {k}, training only {predictor}"
                 + (f" (density {mask.density:.2%})" if mask is not None else " (no mask: control)"))
        seconds = _train(self.run, recipe, build_rows(self.run, recipe), folder, resume=start, mask=mask)
        full = self.out / "runs" / name / "full" / "final"
        same = _identity(full, folder)
        doc = {"recipe": name, "k": k, "predictor": predictor, "seconds": seconds,
               "accuracy": self.eval(recipe, folder), "full_accuracy": self.done(name, "full")["accuracy"],
               "identical_to_full": same, "mask_density": None if mask is None else mask.density}
        if mask is not None:
            doc["changed_outside_mask_since_k"] = _changed_outside(start, folder, mask)
            doc["sparse_adamw_state_bytes"] = planned_state_bytes(mask)
            doc["dense_adamw_state_bytes"] = 8 * mask.numel + 4 * len(mask.names)
        self.log(f"  accuracy {doc['accuracy']:.1%} (full {doc['full_accuracy']:.1%}), identical to full "
                 f"{same['0']:.1%} at 0")
        self.save_cell(doc, name, f"k{k}", f"train_{predictor}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _brief(s) -> dict:
    return {"density": s.predicted_ones / s.numel, "precision": s.precision, "recall": s.recall, "f1": s.f1,
            "jaccard": s.overlap["jaccard"], "random": s.random, "stratified": s.stratified,
            "intersection": s.hits, "predicted": s.predicted_ones, "final": s.final_ones}


def _identity(full: Path, other: Path) -> dict:
    """Share of elements bit-identical (t=0) and within 1e-5 between two bf16 checkpoints."""
    from rlsparse.lab import measure

    sp = measure.sparsity(full, other, tolerances=("0", "1e-05"))
    return {"0": sp["sparsity"]["0"], "1e-05": sp["sparsity"]["1e-05"]}


def _changed_outside(start: Path, trained: Path, mask) -> int:
    """Elements outside ``mask`` whose bf16 value differs from the step-k checkpoint's (bf16 view)."""
    import numpy as np

    from rlsparse.predict.weights import paired_values

    moved = 0
    for name, after, before, _ in paired_values(trained, start):
        outside = ~mask.get(name).numpy()
        moved += int(np.count_nonzero((after.view(np.uint32) != before.view(np.uint32)) & outside))
    return moved


def _save_at(steps: set[int]):
    """A Trainer callback that saves checkpoints (weights + optimizer state) at exactly these steps.

    It runs after the Trainer's own flow callback, so its decision wins.
    """
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step in steps
            return control

    return SaveAt()


def _train(run, recipe, rows: list[dict], out: Path, *, trainer_dir: Path | None = None, save_at=None,
           resume: Path | None = None, mask=None) -> float:
    """Train ``recipe`` (optionally resumed from a Trainer checkpoint, optionally masked) and save bf16."""
    import warnings

    import trl
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from rlsparse.lab.base import load_model, save_model
    from rlsparse.lab.runner import _set_seed, _trl_config
    from rlsparse.lab.tasks import reward
    from rlsparse.train import MaskCallback

    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    _set_seed(recipe.seed)
    model, tok = load_model(run.base_path, run.opts.device)
    callbacks = [MaskCallback(mask, verify=True)] if mask is not None else []
    with tempfile.TemporaryDirectory(prefix="rlsparse-predict-") as tmp:
        workdir = str(trainer_dir) if trainer_dir is not None else tmp
        args = _trl_config(recipe, recipe.learning_rates[0], workdir, run.opts.device)
        if save_at:
            args.save_strategy = "steps"
            args.save_steps = 1
            callbacks.append(_save_at(set(save_at)))
        dataset = Dataset.from_list(rows)
        if recipe.algorithm in ("sft", "rft"):
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                     callbacks=callbacks)
        elif recipe.algorithm == "dpo":
            trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                     callbacks=callbacks)
        else:
            trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                      processing_class=tok, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        started = time.time()
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        seconds = round(time.time() - started, 2)
        save_model(trainer.model, tok, out, dtype=run.opts.checkpoint_dtype,
                   meta={"recipe": recipe.name, "learning_rate": recipe.learning_rates[0], "steps": recipe.steps,
                         "seed": recipe.seed, "resumed_from": str(resume) if resume else None,
                         "mask_density": None if mask is None else mask.density})
    return seconds
