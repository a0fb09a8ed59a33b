"""Figure 5: sparsity along training levels off. Judged under a constant learning rate too: with a
linear decay to 0 the last steps move the weights less by construction, so "levels off" would be
automatic. The level is reported beside the paper's, not only the shape."""

from __future__ import annotations

from rlsparse.lab.verdicts.common import Finding, is_rl, not_measured, pct, recipe, seeds_of

TITLE = "Figure 5: sparsity along training (RL runs), with a constant-learning-rate control"
PAPER = "PRIME: sparsity decays slowly with steps and levels off near 80%"


def _thirds(trace: list[dict]) -> tuple[float, float]:
    """bf16-sparsity drop over the first and the last third of training (after step 0)."""
    third = max(1, (len(trace) - 1) // 3)
    first = trace[1]["bf16"] - trace[1 + third]["bf16"] if len(trace) > 1 + third else 0.0
    last = trace[-1 - third]["bf16"] - trace[-1]["bf16"]
    return first, last


def _schedule(results: dict, name: str) -> str:
    return recipe(results, name).get("trl", {}).get("lr_scheduler_type", "linear")


def finding(results: dict, prereg) -> Finding:
    ratio = prereg["figure5"]["thirds_ratio"]
    rule = (f"A run levels off when its bf16 sparsity drops by less than {ratio:g}x as much in the last third of "
            "training as in the first (a straight decline does not level off). Reproduces when every constant-learning-rate RL run that changed weights levels off; "
            "partly when only runs with a decaying schedule do (or no constant-rate control was run); otherwise does "
            "not reproduce. The final level is reported beside the paper's ~80%.")
    control = "grpo_constlr: GRPO with a constant learning rate, so a decay to 0 cannot make the curve flat."
    runs = {}
    for name, e in results["recipes"].items():
        if not is_rl(results, name):
            continue
        for p in e["points"]:
            tr = p.get("trace")
            if tr and len(tr) > 3 and tr[-1]["bf16"] < 1.0:
                first, last = _thirds(tr)
                runs[f"{name} lr {p['learning_rate']:g}" + (f" seed {p['seed']}" if "seed" in p else "")] = {
                    "recipe": name, "constant": _schedule(results, name) == "constant", "first": first, "last": last,
                    "levels_off": last < ratio * first - 1e-9, "final": tr[-1]["bf16"], "trace": tr}
    if not runs:
        return not_measured("dynamics", TITLE, PAPER, "No RL run recorded a trace that changed weights.", rule, control)
    const = [r for r in runs.values() if r["constant"]]
    decay = [r for r in runs.values() if not r["constant"]]
    if const and all(r["levels_off"] for r in const):
        verdict = "reproduces"
    elif (decay and all(r["levels_off"] for r in decay)) or (const and any(r["levels_off"] for r in const)):
        verdict = "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    share = lambda rs: f"{sum(r['levels_off'] for r in rs)}/{len(rs)}"  # noqa: E731
    finals = [r["final"] for r in runs.values()]
    sentence = (f"levels off in {share(const)} constant-learning-rate runs and {share(decay)} runs with a decaying "
                f"schedule; final bf16 sparsity {pct(min(finals))} to {pct(max(finals))} (paper: levels off near 80%)"
                + ("" if const else "; no constant-learning-rate control was run, so the flat end may be the schedule's")
                + ".")
    # The figure: one run per recipe (first seed, the lr whose run changed the most weights but kept > 0 sparsity).
    curves = {}
    for key, r in runs.items():
        if r["recipe"] not in {k.split(" ")[0] for k in curves} and (" seed" not in key or key.endswith(" seed 0")):
            curves[key] = r["trace"]
    return Finding("dynamics", TITLE, PAPER, verdict, sentence,
                   {"curves": curves, "runs": {k: {x: v for x, v in r.items() if x != "trace"} for k, r in runs.items()}},
                   "sparsity_vs_steps.png", seeds_of(results, {r["recipe"] for r in runs.values()}), rule, control)
