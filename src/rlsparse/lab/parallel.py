"""Lab cells in worker processes: plan a run's units of work, then run them on a process pool.

A lab run is mostly independent trainings: every recipe x learning rate x seed cell, and each of
Conjecture 1's three models (the subnetwork rerun, the random-mask control, the reseeded full
run). ``plan`` lists the ones not yet on disk as tasks with their dependencies: the base's
held-out accuracy and each set of policy samples (shared by several recipes, so produced once,
by one task, before the cells that read them); Conjecture 1's masked reruns after the full run
they take their mask from. ``run_tasks`` runs them on ``jobs`` spawned worker processes, the
longest chain of remaining work first. Every task lands on disk the way a sequential run
writes it (a cell's ``metrics.json`` last; trained and evaluated records beside each
checkpoint), so the runner's ordinary pass then assembles ``results.json`` from disk exactly as
``--resume`` does, without training anything again. A ``--grid`` run's units are each recipe's
learning rates (one training, measured at each of its checkpoints).

Each worker runs torch with ``threads // jobs`` threads. With one thread per worker every
checkpoint is bit-identical to a one-process, one-thread run (the tests check it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlsparse.errors import RlsparseError, WorkerError

# On-policy trainers generate their own completions every step: about twice an offline step here.
_ON_POLICY = ("grpo", "rloo", "ppo", "prime")
# jobs="auto" uses at most this many workers: each holds a model, its optimizer state and a
# reference/value copy, and past a few workers the cells run out before the workers do.
MAX_AUTO_JOBS = 4
# jobs="auto" also leaves each worker this much memory per parameter of the model it trains.
# Measured on the real base (SmolLM2-135M, 134.5M parameters, fp32 master weights, one torch
# thread, runs/rq6): two workers together held at most 21.6 GB resident (sampled every 20 s; on-policy
# cells: policy, reference, optimizer state, sparsity trace, generation), ~80 bytes a parameter
# each; one worker alone peaked at 12.2 GB. On a 23 GB machine two workers fit, with ~1 GB to spare.
WORKER_BYTES_PER_PARAMETER = 80


@dataclass
class Task:
    """One unit of a lab run's work.

    Attributes:
        label: Names the unit in logs and errors ("grpo lr=1e-05 seed 0").
        kind: "base_accuracy", "samples", "cell", "grid" (learning rates of a recipe's grid) or "conjecture".
        args: What the worker needs besides the run (recipe, seed, learning rates, part).
        cost: Relative cost, to run the longest chain of work first.
        deps: Labels of the tasks that must finish first.
    """

    label: str
    kind: str
    args: dict
    cost: float
    deps: set[str] = field(default_factory=set)


def plan(run, recipes: list, conjecture: list, grid: bool = False) -> list[Task]:
    """The tasks of a run not yet finished on disk (``conjecture``: the recipes to run Conjecture 1 for;
    ``grid``: plan each recipe's learning-rate x steps grid, one task per learning rate, instead of its sweep)."""
    from rlsparse.lab import runner

    tasks: dict[str, Task] = {}
    samples: dict[Path, str] = {}

    def samples_task(recipe) -> set[str]:
        if recipe.data in runner.SAMPLE_FREE_DATA:
            return set()
        _, path = run.samples_file(recipe, runner.training_problems(run, recipe))
        if path.is_file():
            return set()
        if path not in samples:
            label = f"samples {path.stem}"
            samples[path] = label
            tasks[label] = Task(label, "samples", {"recipe": recipe}, 1.0)
        return {samples[path]}

    families = sorted({f for r in recipes for f in run.test_sets(r)})
    cached = run.opts.out / "base_accuracy.json"
    base_acc = set()
    if not cached.is_file() or any(f not in _read_json(cached) for f in families):
        base_acc = {"base accuracy"}
        tasks["base accuracy"] = Task("base accuracy", "base_accuracy", {"recipes": recipes}, 0.3)
    for recipe in recipes if grid else []:
        from rlsparse.lab.grid import grid_recipe

        trained_as = grid_recipe(replace(recipe, seed=recipe.seeds[0]))  # what run_grid trains: its rows, its samples
        tasks.update(_grid_tasks(run, recipe, base_acc | samples_task(trained_as)))
    for recipe in recipes if not grid else []:
        weight = 2.0 if recipe.algorithm in _ON_POLICY else 1.0
        entry_due = not runner._cached_entry(run, recipe)
        for seed in recipe.seeds:
            seeded = replace(recipe, seed=seed)
            todo = [lr for lr in recipe.learning_rates
                    if runner._finished(runner.cell_folder(run, recipe, lr, seed)) is None]
            # A recipe that first SFTs the base trains every cell of a seed from that one pre-SFT model:
            # its cells stay one task, so the pre-SFT model is trained once and never by two workers.
            groups = [todo] if recipe.pre_sft and todo else [[lr] for lr in todo]
            for lrs in groups:
                label = f"{recipe.name} lr={'/'.join(f'{lr:g}' for lr in lrs)} seed {seed}"
                tasks[label] = Task(label, "cell", {"recipe": recipe, "seed": seed, "lrs": lrs, "entry": entry_due},
                                    weight * len(lrs), base_acc | samples_task(seeded))
                entry_due = False  # one task per recipe writes its data summary
    for recipe in conjecture:
        root = run.opts.out / "conjecture" / recipe.name
        if (root / "result.json").is_file():
            continue
        weight = 2.0 if recipe.algorithm in _ON_POLICY else 1.0
        first = recipe.seeds[0]
        lrs = [recipe.conjecture_lr] if recipe.conjecture_lr is not None else recipe.learning_rates
        full = {t.label for t in tasks.values() if t.kind == "cell" and t.args["recipe"].name == recipe.name
                and t.args["seed"] == first and any(runner.same_lr(a, b) for a in t.args["lrs"] for b in lrs)}
        parts = ["sub", "random"]
        other_seed = any(runner.same_lr(lr, recipe.conjecture_lr) for lr in recipe.learning_rates) and len(recipe.seeds) > 1
        if recipe.conjecture_lr is None or not other_seed:
            parts.append("reseeded")  # (with a best-case selection the worker checks again, once it is known)
        for part in parts:
            if (root / part / "evaluated.json").is_file():
                continue
            label = f"conjecture 1 {part} on {recipe.name}"
            deps = set(full) | base_acc
            if part == "reseeded":
                deps = (full if recipe.conjecture_lr is None else set()) | base_acc | samples_task(
                    replace(recipe, seed=first + 1))
            else:
                deps |= samples_task(replace(recipe, seed=first))
            tasks[label] = Task(label, "conjecture", {"recipe": recipe, "part": part}, weight, deps)
    return list(tasks.values())


def _grid_tasks(run, recipe, deps: set[str]) -> dict[str, Task]:
    """One task per learning rate of a recipe's grid with a checkpoint not yet measured (a recipe that
    first SFTs the base: one task, so its pre-SFT model is trained once)."""
    from rlsparse.lab import grid, runner

    steps = recipe.grid["checkpoints"]
    todo = [lr for lr in sorted(recipe.grid["learning_rates"], reverse=True)
            if grid.selected(lr, run.opts.grid_learning_rates)
            and any(runner._finished(grid._folder(run.opts.out, recipe.name, lr, s)) is None for s in steps)]
    weight = (2.0 if recipe.algorithm in _ON_POLICY else 1.0) * max(steps)
    groups = [todo] if recipe.pre_sft and todo else [[lr] for lr in todo]
    labels = [f"{recipe.name} grid lr={'/'.join(f'{lr:g}' for lr in lrs)}" for lrs in groups]
    return {label: Task(label, "grid", {"recipe": recipe, "lrs": lrs}, weight * len(lrs), set(deps))
            for label, lrs in zip(labels, groups)}


def resolve_jobs(jobs, device: str, runnable: int, parameters: int | None = None,
                 available: int | None = None) -> int:
    """Worker processes for a run: a count, or "auto" (1 on CUDA; else the cores this process may use,
    at most ``MAX_AUTO_JOBS``, at most the tasks that can run, and at most the workers the
    available memory (``available`` bytes, else read now) holds at ``WORKER_BYTES_PER_PARAMETER``
    for a model of ``parameters``)."""
    if jobs is None:
        return 1
    if jobs == "auto":
        if device == "cuda":
            return 1  # one device: workers would queue on it
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        fit = memory_jobs(parameters, available)
        return max(1, min(cores, MAX_AUTO_JOBS, runnable, fit if fit is not None else cores))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise RlsparseError(f"jobs {jobs!r}: expected a positive integer or 'auto'")
    return jobs


def memory_jobs(parameters: int | None, available: int | None = None) -> int | None:
    """How many workers training a model of ``parameters`` the available memory (``available``
    bytes, else read now) holds (at least 1), or None where either is unknown (then memory does not
    limit "auto")."""
    if not parameters:
        return None
    available = available_memory() if available is None else available
    if available is None:
        return None
    return max(1, available // (parameters * WORKER_BYTES_PER_PARAMETER))


def available_memory() -> int | None:
    """Memory the kernel can give new work without swapping (``MemAvailable``), in bytes; None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_tasks(run, tasks: list[Task], jobs: int, threads: int, log) -> None:
    """Run ``tasks`` on ``jobs`` spawned worker processes with ``threads`` torch threads each.

    Ready tasks start longest remaining chain first. The parent prints ``[k/n] label: time;
    elapsed, ETA`` as each finishes (the ETA spreads the remaining work over the workers). A task
    that raises stops the run once the running ones have finished (their cells land whole): the
    error names the task, with the worker's own message.

    Raises:
        RlsparseError: a task failed (the worker's error type, prefixed with the task's label).
        WorkerError: a worker process died or a task failed with an unexpected error.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from rlsparse.lab.runner import _clock

    priority = _chain_costs(tasks)
    pending = {t.label: t for t in tasks}
    done: set[str] = set()
    total_cost = sum(t.cost for t in tasks)
    spent_cost, spent_seconds, started = 0.0, 0.0, time.time()
    failure: tuple[Task, BaseException] | None = None
    context = multiprocessing.get_context("spawn")
    state = (run.opts, run.base_path, run.n_test, run.preregistration, threads)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=state) as pool:
        running: dict = {}
        while pending or running:
            ready = sorted((t for t in pending.values() if t.deps <= done),
                           key=lambda t: -priority[t.label]) if failure is None else []
            for task in ready[:jobs - len(running)]:
                del pending[task.label]
                running[pool.submit(_work, task)] = (task, time.time())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task, begun = running.pop(future)
                try:
                    future.result()
                except BaseException as exc:  # noqa: BLE001 (reported below, once the running tasks end)
                    if failure is None:
                        failure = (task, exc)
                        if running:
                            log(f"{task.label} failed; waiting for {len(running)} running task(s) to finish")
                    continue
                seconds = time.time() - begun
                done.add(task.label)
                spent_cost += task.cost
                spent_seconds += seconds
                left = total_cost - sum(t.cost for t in tasks if t.label in done)
                eta = left * spent_seconds / spent_cost / jobs if spent_cost else 0.0
                log(f"[{len(done)}/{len(tasks)}] {task.label}: {_clock(seconds)}; elapsed "
                    f"{_clock(time.time() - started)}, ETA {_clock(eta)}")
    if pending and failure is None:
        raise WorkerError(f"lab tasks {sorted(pending)} wait on each other; this is a bug in lab.parallel's plan")
    if failure is not None:
        task, exc = failure
        if isinstance(exc, RlsparseError):
            raise type(exc)(f"{task.label}: {exc}") from None
        if isinstance(exc, BrokenProcessPool):
            raise WorkerError(f"{task.label}: its worker process died (killed, or out of memory); "
                              "finished cells are kept: rerun with --resume, or fewer --jobs") from None
        raise WorkerError(f"{task.label} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                          "finished cells are kept: fix the cause and rerun with --resume") from None


def _chain_costs(tasks: list[Task]) -> dict[str, float]:
    """Each task's cost plus the longest chain of tasks waiting on it (the critical path from it)."""
    after: dict[str, list[str]] = {t.label: [] for t in tasks}
    for t in tasks:
        for d in t.deps:
            if d in after:
                after[d].append(t.label)
    by_label = {t.label: t for t in tasks}
    memo: dict[str, float] = {}

    def chain(label: str) -> float:
        if label not in memo:
            memo[label] = by_label[label].cost + max((chain(n) for n in after[label]), default=0.0)
        return memo[label]

    for t in tasks:
        t.deps &= set(by_label)  # a dependency finished before this session is no dependency
    return {t.label: chain(t.label) for t in tasks}


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


# The worker process's run (built once by ``_init_worker``) and the label of the task it runs now.
_WORKER: dict = {}


def _init_worker(opts, base_path, n_test, preregistration, threads: int) -> None:
    import torch

    from rlsparse.lab import runner

    torch.set_num_threads(threads)
    runner._quiet()
    run = runner._Run(opts, lambda line: print(f"[{_WORKER.get('label', 'worker')}] {line}", flush=True))
    run.base_path, run.n_test, run.preregistration = base_path, n_test, preregistration
    _WORKER["run"] = run


def _work(task: Task) -> None:
    from rlsparse.lab import runner

    run = _WORKER["run"]
    _WORKER["label"] = task.label
    args = task.args
    if task.kind == "base_accuracy":
        for recipe in args["recipes"]:
            run.base_accuracy(recipe)
    elif task.kind == "samples":
        run.policy_samples(args["recipe"], runner.training_problems(run, args["recipe"]))
    elif task.kind == "grid":
        from rlsparse.lab import grid

        grid.train_learning_rates(run, args["recipe"], args["lrs"])
    elif task.kind == "cell":
        recipe, state, entry = args["recipe"], {}, None if args["entry"] else {}
        for lr in args["lrs"]:
            _, entry = runner.run_cell(run, recipe, args["seed"], lr, entry, state, with_entry=args["entry"])
    else:
        recipe = args["recipe"]
        points = [runner._finished(runner.cell_folder(run, recipe, lr, seed))
                  for seed in recipe.seeds for lr in recipe.learning_rates]
        runner.conjecture_part(run, recipe, [p for p in points if p is not None], args["part"])
