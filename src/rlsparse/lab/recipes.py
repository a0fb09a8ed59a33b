"""Recipes: one small, typed, versioned JSON config per experiment, run by ``runner.run_recipe``.

Recipe files live in ``rlsparse/lab/recipes/*.json``. A recipe names the algorithm (one of
``ALGORITHMS``: every algorithm of the paper's Table 1, plus SFT, RFT and RLOO), its data, a learning-rate sweep, the step count and the extra
TRL config fields (``trl``), plus a ``quick`` override for smoke runs and the paper's number
it is compared against.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from rlsparse.errors import UsageError
from rlsparse.lab.class_weights import check as check_class_weights

RECIPE_SCHEMA_VERSION = 1
ALGORITHMS = ("sft", "rft", "dpo", "grpo", "rloo", "kto", "orpo", "simpo", "ppo", "prime")
DATA_KINDS = ("ground_truth", "policy_samples", "constructed_pairs", "prompts", "random_rejected",
              "format_pairs")


@dataclass
class Recipe:
    """One experiment: algorithm, data, hyperparameters and what it is compared against.

    Attributes:
        name: Recipe name (file stem).
        algorithm: One of ``ALGORITHMS``; each trains through ``rlsparse.train.trainers`` (RFT is SFT).
        family: Task family of the training data ("add", "sub", "mul").
        data: How the data is made: "ground_truth" (SFT), "policy_samples" (RFT; DPO, ORPO and SimPO
            pairs; KTO labelled samples), "constructed_pairs" (preference pairs not written by the
            policy), "prompts" (GRPO, RLOO, PPO, PRIME: they sample their own completions).
        in_distribution: Whether the data is drawn from the policy's own distribution.
        learning_rates: The learning-rate sweep (one full run each).
        steps: Optimiser steps per run.
        batch_size: Sequences (SFT/DPO) or completions (GRPO, RLOO) per step; prompts per rollout
            (PPO, PRIME: each rollout samples ``trl.num_generations`` completions per prompt).
        seed: Seed for data order, sampling and the trainer.
        n_train: Training problems drawn from the family's train split.
        samples_per_prompt: Policy samples per prompt (RFT, DPO pairs).
        sample_temperature: Temperature of those policy samples (the on-policy recipes of the same
            suite sample at their ``trl.temperature``; use the same so "the policy's own
            distribution" means one thing across a suite).
        trl: Extra fields for the TRL config (e.g. beta, max_grad_norm, num_generations).
        quick: Field overrides for ``--quick`` runs.
        conjecture: Whether to run the Conjecture 1 subnetwork rerun for this recipe.
        conjecture_lr: The learning rate of the Conjecture 1 run, fixed before the sweep runs
            (pre-registration); None falls back to the post-hoc rule of ``choose_subnetwork_run``,
            which the report labels as a best-case selection.
        seeds: Seeds to run every learning rate with (default: ``[seed]``); the first one is the
            seed of the Conjecture 1 run, the second (if any) its reseeded full-run control.
        pre_sft: Optional ``{"learning_rate", "steps"}``: first SFT the base on the chosen answers
            of this recipe's data (the paper's way to make off-policy data in-distribution, Table 5);
            the recipe then starts from, and is diffed against, that SFT model.
        grid: Optional ``{"learning_rates": [...], "checkpoints": [steps...]}`` for ``lab run --grid``:
            one run per learning rate, trained to the largest step count (the schedule's length) and
            saved and measured at every listed step. Fixed in the recipe file before the grid runs.
        group: The finding this recipe feeds ("sft_vs_rl", "kl_clip").
        description: One line for the report.
        on_policy, kl, online: The algorithm's flags in the paper's Table 1 (None where not stated):
            trains on samples of the current policy; has a KL term to the reference; generates its
            data during training.
    """

    name: str
    algorithm: str
    family: str = "add"
    data: str = "ground_truth"
    in_distribution: bool = False
    learning_rates: list[float] = field(default_factory=lambda: [1e-5])
    steps: int = 100
    batch_size: int = 16
    seed: int = 0
    n_train: int = 2000
    samples_per_prompt: int = 8
    sample_temperature: float = 1.0
    trl: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    conjecture: bool = False
    conjecture_lr: float | None = None
    seeds: list[int] = field(default_factory=list)
    pre_sft: dict | None = None
    grid: dict | None = None
    group: str = "sft_vs_rl"
    description: str = ""
    on_policy: bool | None = None
    kl: bool | None = None
    online: bool | None = None
    schema_version: int = RECIPE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm {self.algorithm!r} (expected one of {', '.join(ALGORITHMS)})")
        if self.data not in DATA_KINDS:
            problems.append(f"data {self.data!r} (expected one of {', '.join(DATA_KINDS)})")
        if not self.learning_rates or any(float(lr) <= 0 for lr in self.learning_rates):
            problems.append(f"learning_rates {self.learning_rates!r} (expected a non-empty list of positive floats)")
        if not 0 < float(self.sample_temperature) <= 10:
            problems.append(f"sample_temperature {self.sample_temperature!r} (expected a float in (0, 10])")
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps={self.steps}, batch_size={self.batch_size} (expected >= 1)")
        if self.schema_version > RECIPE_SCHEMA_VERSION:
            problems.append(f"schema_version {self.schema_version} (this rlsparse reads up to "
                            f"{RECIPE_SCHEMA_VERSION}; upgrade rlsparse)")
        if self.pre_sft is not None and (set(self.pre_sft) != {"learning_rate", "steps"}
                                         or float(self.pre_sft["learning_rate"]) <= 0 or int(self.pre_sft["steps"]) < 1):
            problems.append(f"pre_sft {self.pre_sft!r} (expected {{'learning_rate': > 0, 'steps': >= 1}})")
        if self.grid is not None and not _valid_grid(self.grid):
            problems.append(f"grid {self.grid!r} (expected {{'learning_rates': [positive floats], "
                            "'checkpoints': [distinct steps >= 1]})")
        weights = check_class_weights(self)
        if weights:
            problems.append(weights)
        if problems:
            raise UsageError(f"recipe {self.name!r} has invalid " + "; ".join(problems) + "; fix the recipe file")
        self.learning_rates = [float(lr) for lr in self.learning_rates]
        self.seeds = [int(s) for s in self.seeds] or [int(self.seed)]
        if self.grid is not None:
            self.grid = {"learning_rates": [float(lr) for lr in self.grid["learning_rates"]],
                         "checkpoints": sorted(int(s) for s in self.grid["checkpoints"])}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"recipe {data.get('name')!r} has unknown fields {unknown}; expected only {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def quickened(self) -> "Recipe":
        """This recipe with its ``quick`` overrides applied (for smoke runs and the demo)."""
        return replace(self, **self.quick) if self.quick else self

    def to_dict(self) -> dict:
        return asdict(self)

    def cell_dict(self) -> dict:
        """What makes one cell of this recipe what it is: every field but the list of ``seeds``.

        A cell is one seed (``seed``) at one learning rate; which other seeds the run has does not
        change it, so a run extended with more seeds keeps its finished cells.
        """
        return cell_fields(asdict(self))


def cell_fields(recipe: dict) -> dict:
    """A recipe's fields (as ``Recipe.to_dict`` writes them) without those that do not make a cell:
    the list of ``seeds`` (see ``Recipe.cell_dict``)."""
    return {k: v for k, v in recipe.items() if k != "seeds"}


def _valid_grid(grid) -> bool:
    if not isinstance(grid, dict) or set(grid) != {"learning_rates", "checkpoints"}:
        return False
    lrs, steps = grid["learning_rates"], grid["checkpoints"]
    if not isinstance(lrs, list) or not isinstance(steps, list) or not lrs or not steps:
        return False
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lrs)
    whole = all(isinstance(x, int) and not isinstance(x, bool) for x in steps)
    return numbers and whole and all(lr > 0 for lr in lrs) and all(s >= 1 for s in steps) and len(set(steps)) == len(steps)


def recipe_dir() -> Path:
    """The folder of the built-in recipe files."""
    return Path(str(resources.files("rlsparse.lab") / "recipes"))


def recipe_names() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.stem for p in recipe_dir().glob("*.json"))


def load_recipe(name_or_path: str | os.PathLike, suite: str | None = None) -> Recipe:
    """Load a built-in recipe by name (the tiny base's, or a suite's), or any recipe JSON file by path.

    Example:
        >>> load_recipe("grpo").learning_rates
        >>> load_recipe("grpo", suite="real").steps
    """
    path = Path(name_or_path)
    folder = recipe_dir() / suite if suite else recipe_dir()
    if not path.suffix == ".json":
        path = folder / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.json") if p.stem != "suite")
        raise UsageError(f"recipe {str(name_or_path)!r} not found; expected a JSON file or one of: "
                         f"{', '.join(known)}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"recipe file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
    data.setdefault("name", path.stem)
    return Recipe.from_dict(data)


SUITE_SCHEMA_VERSION = 1


@dataclass
class Suite:
    """A pre-registered set of recipes on one base: tasks, test sets and verdict thresholds, fixed before running.

    Attributes:
        name: Suite name (its folder under ``recipes/``).
        base: The packaged real base (``smollm2-135m``).
        style: Prompt style of its tasks ("chat": through the base's chat template).
        eval_family: The task whose held-out accuracy is "the task".
        test_families: Held-out families measured after every run.
        n_test / quick_n_test: Held-out problems per family (full run / ``--quick``).
        max_new_tokens: Greedy evaluation and sampling budget (the answer is a short number).
        recipes / quick_recipes: Recipe names of the full run and of the ``--quick`` core.
        compute: Compute dtype for the suite ("float32" or "bfloat16"), chosen from measured step cost.
        threads: CPU threads: a number or "auto" (the cores this process may use; ``runner.resolve_threads``).
        eval_batch / sample_batch: Prompts per generation batch.
        rank_matrices: Update rank on this many matrices, evenly spaced (None: all 210 of the real base).
        preregistration: The suite's pre-registration file (in the suite folder, the format of
            ``lab/preregistration.json``): thresholds written before the sweep ran, copied with their
            sha256 into every run.json.
        description: One paragraph for the report.
        table4_pairs: Table 4's data and algorithm rows: pairs of this suite's recipes compared at every
            learning rate both ran, each ``{"a", "b", "factor", "why"}`` with ``factor`` one of
            ``TABLE4_FACTORS`` (``lab.overlaps`` measures them; the seed rows come from the seeds).
        table4_declared: When and how the pairs were chosen (shown in the report beside them).
    """

    name: str
    base: str
    style: str = "chat"
    eval_family: str = "add"
    test_families: list[str] = field(default_factory=lambda: ["add"])
    n_test: dict = field(default_factory=dict)
    quick_n_test: dict = field(default_factory=dict)
    max_new_tokens: int = 12
    recipes: list[str] = field(default_factory=list)
    quick_recipes: list[str] = field(default_factory=list)
    compute: str = "float32"
    threads: int | str = "auto"
    eval_batch: int = 64
    sample_batch: int = 8
    rank_matrices: int | None = None
    preregistration: str = "preregistration.json"
    description: str = ""
    table4_pairs: list[dict] = field(default_factory=list)
    table4_declared: str = ""
    schema_version: int = SUITE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = []
        for i, pair in enumerate(self.table4_pairs):
            if not isinstance(pair, dict) or not {"a", "b", "factor"} <= set(pair) or not set(pair) <= _PAIR_KEYS:
                problems.append(f"table4_pairs[{i}] = {pair!r} (expected {{'a', 'b', 'factor', 'why'}})")
                continue
            unknown = [n for n in (pair["a"], pair["b"]) if n not in self.recipes]
            if unknown or pair["a"] == pair["b"]:
                problems.append(f"table4_pairs[{i}] names {unknown or [pair['a']] * 2} (expected two different "
                                f"recipes of the suite: {', '.join(self.recipes)})")
            if pair["factor"] not in TABLE4_FACTORS:
                problems.append(f"table4_pairs[{i}] factor {pair['factor']!r} (expected one of "
                                f"{', '.join(TABLE4_FACTORS)})")
        if problems:
            raise UsageError(f"suite {self.name!r} has invalid " + "; ".join(problems) + "; fix its suite.json")


# What differs between the two cells of a Table 4 row (the paper's three settings): "seed" alone,
# the training "data" alone (same algorithm), or the "algorithm" (with the data each one trains on).
TABLE4_FACTORS = ("seed", "data", "algorithm")
_PAIR_KEYS = {"a", "b", "factor", "why"}


def load_suite(name: str) -> Suite:
    """Load a built-in suite (``real``) from ``recipes/<name>/suite.json``.

    Example:
        >>> load_suite("real").quick_recipes
    """
    path = recipe_dir() / name / "suite.json"
    if not path.is_file():
        raise UsageError(f"suite {name!r} not found; the built-in suite is 'real'")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(Suite)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"suite file {path} has unknown fields {unknown}; expected only {sorted(known)}")
    return Suite(**data)
