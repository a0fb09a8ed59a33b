"""The learning-rate x steps grid (``rlsparse lab run NAMES --grid``): sparsity at matched steps,
learning rate, gain and KL, instead of one point per algorithm.

For each learning rate of a recipe's ``grid``, one run is trained to the largest listed step count
(the length its learning-rate schedule is set for) and saved at every listed step; each saved
checkpoint is then measured exactly as a sweep cell is (``runner._measure_point``: sparsity at
every tolerance of the bf16 checkpoint, rank, KL(start || finetuned) on the probe set, ||Δθ||, and
held-out accuracy as saved). A checkpoint at step s is the state of that run at step s, not an
s-step run with its own schedule (the same under a constant schedule).

Layout: ``RUN_DIR/grid/<recipe>/lr-<lr>/step-<s>/`` holds the checkpoint, its ``trained.json``
and, written last, ``metrics.json``. A resumed run keeps every measured checkpoint, measures
saved ones whose ``trained.json`` matches, and trains a learning rate again only up to the largest
step still missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from rlsparse.errors import UsageError
from rlsparse.lab import runner
from rlsparse.lab import trained as trained_record
from rlsparse.lab.recipes import Recipe


def selected(lr: float, chosen: list[float] | None) -> bool:
    """Whether a grid's learning rate is one this session trains (``LabOptions.grid_learning_rates``;
    None: all of them), matched by ``runner.same_lr``."""
    return chosen is None or any(runner.same_lr(lr, c) for c in chosen)


def grid_recipe(recipe: Recipe) -> Recipe:
    """The recipe a grid trains: its grid's learning rates, and as many steps as the largest checkpoint."""
    if recipe.grid is None:
        raise UsageError(f"recipe {recipe.name} has no 'grid' (learning rates x checkpoint steps); add one to its "
                         "file or run it without --grid")
    return replace(recipe, learning_rates=list(recipe.grid["learning_rates"]), steps=max(recipe.grid["checkpoints"]))


def cells(recipe: Recipe, chosen: list[float] | None = None) -> int:
    """Planned progress units of a recipe's grid this session: one per learning rate (a training and
    its checkpoints), of those ``chosen`` (None: all)."""
    return sum(selected(lr, chosen) for lr in recipe.grid["learning_rates"]) if recipe.grid else 0


def _folder(out: Path, name: str, lr: float, step: int) -> Path:
    return out / "grid" / name / f"lr-{runner._lr_label(lr)}" / f"step-{step}"


def entry_on_disk(out: Path, recipe: dict) -> dict | None:
    """A recipe's grid entry read back from its finished checkpoints under ``out/grid/``, or None if none finished.

    A grid takes hours on a CPU and its results entry is written when the whole grid is done; this
    is what a run stopped earlier (or still running) has measured so far, so a report can show it.
    ``complete`` says whether every (learning rate, step) checkpoint is there.

    Args:
        out: The run folder.
        recipe: The recipe's record as ``run.json`` holds it (with its ``grid``).
    """
    lrs, steps = recipe["grid"]["learning_rates"], recipe["grid"]["checkpoints"]
    points = []
    for lr in lrs:
        for s in steps:
            done = runner._finished(_folder(out, recipe["name"], lr, s))
            if done is not None:
                points.append(done)
    if not points:
        return None
    summary = out / "grid" / recipe["name"] / "entry.json"
    return {"recipe": recipe, **(json.loads(summary.read_text()) if summary.is_file() else {}), "points": points,
            "complete": len(points) == len(lrs) * len(steps)}


def with_unfinished(out: Path, results: dict) -> dict:
    """``results["grid"]`` with every grid the run folder holds checkpoints of, finished or not.

    A recipe whose grid stopped part way (or is still training) has no results entry yet; its
    finished checkpoints are read back from disk and marked ``complete: False``.
    """
    grids = dict(results.get("grid") or {})
    for recipe in results["run"].get("recipes", []):
        if recipe.get("grid") and recipe["name"] not in grids and (out / "grid" / recipe["name"]).is_dir():
            found = entry_on_disk(out, recipe)
            if found is not None:
                grids[recipe["name"]] = found
    return grids


def _prepared(run, trained_as: Recipe, shared: dict) -> dict:
    """The grid's training rows, start model and start accuracy, built once per recipe and process;
    the first build writes the recipe's data summary (``grid/<recipe>/entry.json``)."""
    if not shared:
        rows = runner.build_rows(run, trained_as)
        start = runner._pre_sft(run, trained_as, rows) if trained_as.pre_sft else run.base_path
        shared.update(rows=rows, start=start, start_acc=run.start_accuracy(trained_as, start))
        runner._write_json(run.opts.out / "grid" / trained_as.name / "entry.json",
                           {"rows": len(rows), "base_accuracy": shared["start_acc"]})
    return shared


def train_learning_rate(run, trained_as: Recipe, lr: float, shared: dict) -> tuple[dict[int, dict], bool]:
    """Train one learning rate of a grid to its last checkpoint and measure every checkpoint not yet
    on disk (a checkpoint saved but unmeasured is measured, not retrained); returns them by step,
    and whether any was measured now (False: all were on disk already).

    Args:
        run: The lab run.
        trained_as: ``grid_recipe`` of the recipe, with its seed.
        lr: The learning rate.
        shared: Per-recipe state reused across learning rates (empty at first: ``_prepared`` fills it).
    """
    steps = trained_as.grid["checkpoints"]
    folders = {s: _folder(run.opts.out, trained_as.name, lr, s) for s in steps}
    done = {s: runner._finished(f) for s, f in folders.items()}
    if all(d is not None for d in done.values()):
        return done, False
    prep = _prepared(run, trained_as, shared)
    rows, start = prep["rows"], prep["start"]
    cell = runner.train_cell(run, trained_as, lr, rows, start=start)
    todo = [s for s in steps if done[s] is None]
    logs = {s: trained_record.load(folders[s], {**cell, "step": s}) for s in todo}
    missing = [s for s in todo if logs[s] is None]
    if missing:
        run.log(f"  {trained_as.name} grid: lr={lr:g}, training to step {max(missing)} of {trained_as.steps} on "
                f"{len(rows)} rows, saving steps {missing}")
        logs.update(runner.train_checkpoints(run, trained_as, lr, rows, {s: folders[s] for s in missing}, cell,
                                             start=start))
    for s in todo:
        measured = {**logs[s], **runner.evaluate_checkpoint(run, trained_as, folders[s])}
        done[s] = runner._measure_point(run, start, folders[s], measured, prep["start_acc"])
        done[s].update(learning_rate=lr, step=s, seed=trained_as.seed, start=runner._relative(run, start))
        runner._write_json(folders[s] / "metrics.json", done[s])
    fam = run.eval_key(trained_as)
    run.log(f"    {trained_as.name} lr={lr:g}: " + ", ".join(
        f"step {s} sparsity {done[s]['sparsity']['1e-05']:.1%} gain {100 * done[s]['accuracy_gain'][fam]:+.1f}"
        for s in steps))
    return done, True


def train_learning_rates(run, recipe: Recipe, lrs: list[float]) -> None:
    """A worker's share of a grid (``lab.parallel``): these learning rates of ``recipe``, measured to disk."""
    trained_as, shared = grid_recipe(replace(recipe, seed=recipe.seeds[0])), {}
    for lr in lrs:
        train_learning_rate(run, trained_as, lr, shared)


def run_grid(run, recipe: Recipe, progress=None) -> dict:
    """Train and measure one recipe's grid (first seed); returns its results entry with one point per checkpoint.

    Checkpoints already on disk (a resumed run, or worker processes of ``lab.parallel``) are read back.
    With ``grid_learning_rates`` only those are trained, and the entry is what the disk holds
    (``entry_on_disk``: ``complete`` False while learning rates are missing; None if nothing is there).

    Example:
        >>> entry = run_grid(run, load_recipe("grpo"))
        >>> [(p["learning_rate"], p["step"], p["sparsity"]["1e-05"]) for p in entry["points"]]
    """
    trained_as = grid_recipe(replace(recipe, seed=recipe.seeds[0]))
    steps, shared = trained_as.grid["checkpoints"], {}
    by_lr: dict[float, dict[int, dict]] = {}
    chosen = run.opts.grid_learning_rates
    # Largest learning rate first: it is the one most likely to reach the matched gain, so a grid
    # stopped early (hours on a CPU) already holds its most telling run. Points keep the grid's order.
    for lr in sorted(trained_as.learning_rates, reverse=True):
        if not selected(lr, chosen):
            continue
        label = f"{recipe.name} grid lr={lr:g} ({len(steps)} checkpoints to step {max(steps)})"
        begun = time.time()
        by_lr[lr], fresh = train_learning_rate(run, trained_as, lr, shared)
        if progress and fresh:
            progress.finish(label, time.time() - begun)
        elif progress:
            progress.skip(label)
    if len(by_lr) < len(trained_as.learning_rates):  # part of the grid this session (--grid-lrs)
        return entry_on_disk(run.opts.out, recipe.to_dict())
    points = [by_lr[lr][s] for lr in trained_as.learning_rates for s in steps]
    summary = run.opts.out / "grid" / recipe.name / "entry.json"
    return {"recipe": recipe.to_dict(), **json.loads(summary.read_text()), "points": points, "complete": True}
