"""The number format separated from the optimisation: the bf16 checkpoint view beside the fp32
master-weight view for every run, and the per-weight net-drift ratio |sum_t Δ_t| / sum_t |Δ_t|
(sign consistency over steps) of RL against SFT at matched learning rates."""

from __future__ import annotations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import Finding, by_lr, is_rl, not_measured, pct, recipe, seeds_of

TITLE = "Precision view: bf16 checkpoints vs fp32 master weights, and the net drift of each weight"
PAPER = "all models compared in bfloat16 at tolerance 1e-5 (Section 2.2); no fp32 view or drift reported"


def _drift(p: dict):
    d = p.get("net_drift") or {}
    v = d.get("net_over_path")
    return v if isinstance(v, (int, float)) and v == v else None


def finding(results: dict, prereg) -> Finding:
    margin = prereg["precision_view"]["net_drift_margin"]
    rule = (f"Context, not a paper claim. RL's steps are called more sign-consistent than SFT's when its mean net-drift "
            f"ratio (sum_i |net_i| / sum_i path_i) exceeds SFT's by more than {margin:g} at a majority of matched "
            "learning rates.")
    control = ("The fp32 master weights: a weight the optimiser moved but bf16 rounding hid is counted as unchanged "
               "in the bf16 view only. Pure bf16 training (--pure-bf16) has no master copy: there the two views coincide.")
    rows, rl_d, sft_d = {}, {}, {}
    for name, e in results["recipes"].items():
        for p in e["points"]:
            if p.get("trace"):
                end = p["trace"][-1]
                rows.setdefault(name, []).append({"lr": p["learning_rate"], "bf16": end["bf16"], "fp32": end["fp32"],
                                                  "net_drift": _drift(p), "seed": p.get("seed")})
        algo = recipe(results, name)["algorithm"]
        target = rl_d if is_rl(results, name) else sft_d if algo in ("sft", "rft") else None
        if target is not None:
            for lr, v in by_lr(results, name, _drift).items():
                target.setdefault(lr, []).extend(v)
    if not rows:
        return not_measured("precision", TITLE, PAPER, "No run recorded a trace.", rule, control)
    flat = [r for rs in rows.values() for r in rs]
    n, r = max(((n, r) for n, rs in rows.items() for r in rs), key=lambda t: t[1]["bf16"] - t[1]["fp32"])
    pure = (results["run"].get("precision") or {}).get("master_weights") == "bfloat16"
    if pure:
        sentence = (f"Pure bf16 training (no fp32 master copy): every step's update below half the bf16 spacing is "
                    f"lost, so {pct(min(x['fp32'] for x in flat))} to {pct(max(x['fp32'] for x in flat))} of weights "
                    f"never move at all, and the checkpoints read {pct(min(x['bf16'] for x in flat))} to "
                    f"{pct(max(x['bf16'] for x in flat))} sparse at 1e-5")
    else:
        sentence = (f"The optimiser leaves {pct(min(x['fp32'] for x in flat))} to {pct(max(x['fp32'] for x in flat))} "
                    f"of fp32 master weights untouched, while the bf16 checkpoints read "
                    f"{pct(min(x['bf16'] for x in flat))} to {pct(max(x['bf16'] for x in flat))} sparse; the largest gap "
                    f"({n}, lr {r['lr']:g}: bf16 {pct(r['bf16'])} vs fp32 {pct(r['fp32'])}) is sparsity made by bf16 "
                    "rounding, not by the optimiser")
    lrs = sorted(set(rl_d) & set(sft_d))
    drift = {lr: {"rl": stats.mean(rl_d[lr]), "sft": stats.mean(sft_d[lr])} for lr in lrs}
    if lrs:
        more = sum(d["rl"] > d["sft"] + margin for d in drift.values())
        sentence += ("; net-drift ratio RL vs SFT at matched learning rates: "
                     + ", ".join(f"{lr:g} {d['rl']:.2f} vs {d['sft']:.2f}" for lr, d in drift.items())
                     + f" (RL more sign-consistent at {more}/{len(lrs)})")
    return Finding("precision", TITLE, PAPER, "context (not a paper claim)", sentence + ".",
                   {"rows": rows, "net_drift_by_lr": drift, "pure_bf16": pure}, "precision_view.png",
                   seeds_of(results, rows), rule, control)
