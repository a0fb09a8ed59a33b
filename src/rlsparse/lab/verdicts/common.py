"""The ``Finding`` type and accessors shared by the verdict modules.

Results written before seeds, groups and the new measurements existed still load: a point with no
``seed`` is its recipe's seed, a recipe with no ``group`` feeds Figure 1, one with no ``family``
trained on addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TOL = "1e-05"
# Algorithms the paper counts as RL (Table 1); RFT and SFT are supervised.
RL_ALGORITHMS = ("dpo", "grpo", "ppo", "prime", "rloo", "kto", "orpo", "simpo")
VERDICTS = ("reproduces", "partly reproduces", "does not reproduce at this scale", "not measured",
            "context (not a paper claim)")


@dataclass
class Finding:
    """One reproduced claim: the paper's number, ours, a verdict, its rule and its control.

    Attributes:
        key: Stable identifier (JSON key, figure name stem).
        title: The paper's item ("Table 2: ...").
        paper: The paper's number, in words.
        verdict: One of ``VERDICTS``.
        sentence: Our numbers, in words, computed from the data.
        data: The data behind the sentence and the figure.
        figure: PNG file name under ``figures/``, or None.
        seeds: Seeds behind the finding, by recipe.
        rule: The verdict rule, with its pre-registered thresholds.
        control: What would make the verdict fail, and what it measured.
        selection: "pre-registered", or a label saying the data shown is a best-case selection.
    """

    key: str
    title: str
    paper: str
    verdict: str
    sentence: str
    data: dict = field(default_factory=dict)
    figure: str | None = None
    seeds: dict = field(default_factory=dict)
    rule: str = ""
    control: str = ""
    selection: str = ""


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def pts(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f} pts"


def eval_family(results: dict) -> str:
    return "jsonl" if results["run"].get("dataset") else results["run"].get("eval_family", "add")


def train_family(results: dict, name: str) -> str:
    """The task a recipe trained on, whose held-out accuracy is its gain (the eval task for JSONL data)."""
    if results["run"].get("dataset"):
        return "jsonl"
    return results["recipes"][name]["recipe"].get("family", "add")


def recipe(results: dict, name: str) -> dict:
    return results["recipes"][name]["recipe"]


def group(results: dict, name: str) -> str:
    return recipe(results, name).get("group", "sft_vs_rl")


def is_rl(results: dict, name: str) -> bool:
    return recipe(results, name)["algorithm"] in RL_ALGORITHMS


def seed_of(results: dict, name: str, point: dict) -> int:
    return point.get("seed", recipe(results, name).get("seed", 0))


def by_seed(results: dict, name: str) -> dict[int, list[dict]]:
    """A recipe's points per seed, each list ordered by learning rate."""
    out: dict[int, list[dict]] = {}
    for p in results["recipes"][name]["points"]:
        out.setdefault(seed_of(results, name, p), []).append(p)
    return {s: sorted(v, key=lambda p: p["learning_rate"]) for s, v in sorted(out.items())}


def by_lr(results: dict, name: str, value) -> dict[float, list[float]]:
    """``value(point)`` per learning rate, one entry per seed."""
    out: dict[float, list[float]] = {}
    for p in results["recipes"][name]["points"]:
        v = value(p)
        if v is not None:
            out.setdefault(p["learning_rate"], []).append(v)
    return dict(sorted(out.items()))


def gain(point: dict, family: str):
    g = point.get("accuracy_gain", {}).get(family)
    return g if isinstance(g, (int, float)) and math.isfinite(g) else None


def seeds_of(results: dict, names) -> dict:
    """Seeds behind a finding, by recipe. Names given as a set come out sorted, so the report's
    text does not depend on the string hash seed (report.md is byte-stable across processes)."""
    order = sorted(names) if isinstance(names, (set, frozenset)) else names
    return {n: sorted({seed_of(results, n, p) for p in results["recipes"][n]["points"]})
            for n in order if n in results["recipes"]}


def not_measured(key: str, title: str, paper: str, why: str, rule: str = "", control: str = "") -> Finding:
    return Finding(key, title, paper, "not measured", why, rule=rule, control=control)
