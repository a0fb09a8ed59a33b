"""The prediction experiment's report: Markdown tables, a summary PNG and one JSON, from the
cells ``predict_lab`` wrote (nothing is recomputed here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlsparse.io.atomic import atomic_path, write_json

REPORT_SCHEMA_VERSION = 1


def collect(out: str | Path) -> dict:
    """Every finished cell of a prediction run folder, grouped by recipe."""
    out = Path(out)
    design = json.loads((out / "experiment.json").read_text())
    recipes: dict[str, dict] = {}
    for p in sorted((out / "cells").glob("*.json")):
        doc = json.loads(p.read_text())
        parts = p.stem.split("__")
        r = recipes.setdefault(parts[0], {"full": None, "cheaper": {}, "scores": {}, "train": {}})
        if parts[1] == "full":
            r["full"] = doc
        elif parts[1].startswith("run_"):
            r["cheaper"][parts[1]] = doc
        elif parts[-1] == "scores":
            r["scores"][int(parts[1][1:])] = doc
        else:
            r["train"].setdefault(int(parts[1][1:]), {})[parts[2][len("train_"):]] = doc
    return {"schema_version": REPORT_SCHEMA_VERSION, "kind": "predict-lab", "design": design, "recipes": recipes}


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def render(out: str | Path) -> Path:
    """Write ``report.md``, ``results.json`` and ``figures/recall_vs_k.png``; return the Markdown path."""
    out = Path(out)
    data = collect(out)
    design = data["design"]
    steps = design["steps"]
    lines = [f"# How early can we know the subnetwork? ({design['name']})", "",
             f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{out}`. Design fixed before "
             f"scoring ({design.get('registered', '')}): recipes {', '.join(design['recipes'])}, learning rate "
             f"{design['learning_rate']:g}, {steps} steps, k = {', '.join(str(k) for k in _k_steps(design))} steps "
             f"({', '.join(f'{f:.0%}' for f in design['k_fractions'])}), tolerance {design['tolerance']}, "
             f"held-out problems {design['n_test']}. Every predictor is reported, including those that lose to "
             "random.", "",
             "Reading the numbers: one seed per cell. An accuracy on 1000 problems has a standard error of about "
             "1.5 points, so gaps within about 2-3 points are noise. Cutting every prediction to the final mask's "
             "size uses one fact from the end of the run (its density, not which elements); the natural-threshold "
             "table uses none. The stratified baseline redraws the prediction at random inside each tensor x bf16 "
             "exponent cell, keeping its count per cell: beating it means knowing more than the magnitudes.", ""]
    for name, r in data["recipes"].items():
        full = r["full"]
        if full is None:
            continue
        lines += [f"## {name}", "",
                  f"Full run: held-out accuracy {_pct(full['accuracy'])}% (base {_pct(full['base_accuracy'])}%), "
                  f"final subnetwork density {_pct(full['final_density'], 2)}% of {full['numel']:,} elements.", ""]
        if r["scores"]:
            ks = sorted(r["scores"])
            lines += ["Recall at the final density (%), each predictor's mask cut to the final mask's size; random "
                      "= uniform baseline, strat = magnitude-stratified baseline (random within tensor x bf16 "
                      "exponent). Precision equals recall at this density.", "",
                      "| predictor | " + " | ".join(f"k={k} recall | strat" for k in ks) + " |",
                      "|---|" + "---|---|" * len(ks)]
            preds = list(r["scores"][ks[0]]["predictors"])
            for p in preds:
                cells = []
                for k in ks:
                    row = r["scores"][k]["predictors"].get(p)
                    a = row["at_final_density"] if row else None
                    cells += [_pct(a["recall"]) if a else "-",
                              _pct((a.get("stratified") or {}).get("recall")) if a else "-"]
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            rnd = r["scores"][ks[0]]["predictors"].get("random", {}).get("at_final_density", {}).get("random", {})
            lines += ["", f"Uniform random recall at this density: {_pct(rnd.get('recall'))}% (exact expectation).",
                      "", "At each predictor's natural threshold (density / precision / recall, %):", "",
                      "| predictor | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for p in preds:
                cells = []
                for k in ks:
                    nat = r["scores"][k]["predictors"].get(p, {}).get("natural")
                    if not nat:
                        cells.append("-")
                    elif "precision" not in nat:
                        cells.append("0 (empty)")
                    else:
                        cells.append(f"{_pct(nat['density'])} / {_pct(nat['precision'])} / {_pct(nat['recall'])}")
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            lines += ["", "Precision-recall curves: " + ", ".join(
                f"[k={k}](figures/pr_{name}_k{k}.png)" for k in ks), ""]
        if r["train"]:
            lines += ["Training only the predicted subnetwork from step k (mask at the final density; `full` = "
                      "plain resume, no mask, the control). Accuracy gap vs the full run in points; identical = "
                      "share of elements bit-identical to the full run's final bf16 checkpoint; outside = elements "
                      "outside the mask that moved after step k (must be 0); state = SparseAdamW optimizer state "
                      "on the mask vs dense AdamW.", "",
                      "| k | predictor | density % | accuracy % | gap (pts) | identical % | outside | state saved |",
                      "|---|---|---|---|---|---|---|---|"]
            for k in sorted(r["train"]):
                for p, t in r["train"][k].items():
                    gap = 100 * (t["accuracy"] - t["full_accuracy"])
                    saved = ("-" if "sparse_adamw_state_bytes" not in t else
                             f"{1 - t['sparse_adamw_state_bytes'] / t['dense_adamw_state_bytes']:.1%} "
                             f"({t['sparse_adamw_state_bytes'] / 2**20:.2f} of "
                             f"{t['dense_adamw_state_bytes'] / 2**20:.2f} MiB)")
                    lines.append(f"| {k} | {p} | {_pct(t['mask_density'])} | {_pct(t['accuracy'])} | {gap:+.1f} | "
                                 f"{_pct(t['identical_to_full']['0'])} | {t.get('changed_outside_mask_since_k', '-')} "
                                 f"| {saved} |")
            lines.append("")
    figure = out / "figures" / "recall_vs_k.png"
    if any(r["scores"] for r in data["recipes"].values()):
        _recall_plot(data, figure)
        lines += ["![recall at the final density vs k](figures/recall_vs_k.png)", ""]
    write_json(out / "results.json", data)
    md = out / "report.md"
    with atomic_path(md, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return md


def _k_steps(design: dict) -> list[int]:
    every = design["checkpoint_every"]
    return [max(every, int(round(f * design["steps"] / every)) * every) for f in design["k_fractions"]]


def _recall_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = {n: r for n, r in data["recipes"].items() if r["scores"]}
    fig, axes = plt.subplots(1, len(recipes), figsize=(5.2 * len(recipes), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], recipes.items()):
        ks = sorted(r["scores"])
        for p in r["scores"][ks[0]]["predictors"]:
            ys = [r["scores"][k]["predictors"][p]["at_final_density"]["recall"] for k in ks]
            ax.plot(ks, ys, marker="o", lw=1.3, label=p, ls="--" if p == "random" else "-")
        ax.set_title(f"{name}: recall at the final density")
        ax.set_xlabel("k (step of the evidence)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
