"""Table 2: RL updates are sparse but nearly full rank, beside the rank of the same update with
its entries at random positions (same values, same density, no structure)."""

from __future__ import annotations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import Finding, is_rl, not_measured, pct, seeds_of

TITLE = "Table 2: mean rank of RL update matrices (% of full rank)"
PAPER = "99.2-99.8% (Tulu 8B DPO, Eurus 7B PRIME, Llama-3 8B KTO, DeepSeek Math 7B GRPO)"


def finding(results: dict, prereg) -> Finding:
    full = prereg["table2"]["full_rank"]
    rule = (f"Reproduces when every RL run that changed weights has mean update rank of at least {pct(full)}; partly "
            "when the mean over runs does; otherwise does not reproduce.")
    control = ("A random sparse update of the same density is full rank too: the control permutes each update's "
               "entries to random positions. If it is as full rank, 'sparse but full rank' is what any unstructured "
               "sparse update would be, not a property of RL.")
    ranks, controls = {}, {}
    for name, e in results["recipes"].items():
        if not is_rl(results, name):
            continue
        for p in e["points"]:
            if p["sparsity"]["0"] < 1.0 and p.get("update_rank") == p.get("update_rank"):
                key = f"{name} lr {p['learning_rate']:g}" + (f" seed {p['seed']}" if "seed" in p else "")
                ranks[key] = p["update_rank"]
                if p.get("update_rank_random_control") is not None:
                    controls[key] = p["update_rank_random_control"]
    if not ranks:
        return not_measured("rank", TITLE, PAPER, "No RL run changed any weight.", rule, control)
    mean = stats.mean(list(ranks.values()))
    low = min(ranks.values())
    verdict = ("reproduces" if stats.at_least(low, full) else "partly reproduces" if stats.at_least(mean, full)
               else "does not reproduce at this scale")
    ctrl = stats.mean(list(controls.values())) if controls else None
    sentence = (f"RL updates have mean rank {pct(mean)} of full rank (lowest run {pct(low)}); the same entries at "
                f"random positions: {pct(ctrl)}"
                + (" (as full rank: full rank follows from the density alone)." if ctrl is not None and
                   stats.at_least(ctrl, mean - prereg["table2"]["control_margin"]) else "."))
    return Finding("rank", TITLE, PAPER, verdict, sentence, {"ranks": ranks, "random_control": controls},
                   "update_rank.png", seeds_of(results, {k.split(" ")[0] for k in ranks}), rule, control)
