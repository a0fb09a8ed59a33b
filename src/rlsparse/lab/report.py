"""The lab report: per finding, our figure beside the paper's number and one sentence on agreement.

``render(run_dir)`` reads ``results.json`` only, computes the findings (``findings()``, the data
behind every figure and sentence), draws PNGs with matplotlib and writes ``report.html``,
``report.md`` and ``report.json`` atomically.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.lab.recipes import LEARNED_GAIN

REPORT_SCHEMA_VERSION = 1
TOL = "1e-05"
RL = ("dpo", "grpo")
SFT = ("sft",)  # conventional SFT on data the policy did not write; RFT is compared separately
MATCHED_GAIN = 0.10  # accuracy gain at which algorithms are also compared


@dataclass
class Finding:
    """One reproduced claim: the paper's number, our data, a verdict and one sentence."""

    key: str
    title: str
    paper: str
    verdict: str  # "reproduces", "partly reproduces", "does not reproduce", "not measured"
    sentence: str
    data: dict = field(default_factory=dict)
    figure: str | None = None
    seeds: dict = field(default_factory=dict)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _points(results: dict, algos) -> dict[str, list[dict]]:
    return {name: e["points"] for name, e in results["recipes"].items() if e["recipe"]["algorithm"] in algos}


def _eval_family(results: dict) -> str:
    return "jsonl" if results["run"].get("dataset") else results["run"].get("eval_family", "add")


def _sparsity_finding(results: dict) -> Finding:
    # The paper's contrast: RL on in-distribution data (on-policy, or off-policy after SFT) against
    # conventional SFT on data the policy did not write. The controls (RFT, DPO on out-of-distribution
    # pairs) enter only the in- vs out-of-distribution comparison.
    in_dist = {name: e["recipe"]["in_distribution"] for name, e in results["recipes"].items()}
    rl = {n: p for n, p in _points(results, RL).items() if in_dist[n]}
    sft = {n: p for n, p in _points(results, SFT).items() if not in_dist[n]}
    controls = {n: p for n, p in _points(results, RL + ("rft",)).items() if n not in rl}
    fam = _eval_family(results)
    curves = {name: [{"lr": p["learning_rate"], "sparsity": p["sparsity"][TOL], "gain": p["accuracy_gain"].get(fam)}
                     for p in pts] for name, pts in {**rl, **sft, **controls}.items()}
    rl_by_lr, sft_by_lr = _by_lr(rl), _by_lr(sft)
    matched = sorted(set(rl_by_lr) & set(sft_by_lr))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    wins = [lr for lr in matched if mean(rl_by_lr[lr]) > mean(sft_by_lr[lr])]
    pairs = [("rft", "sft_ood"), ("dpo_id", "dpo_ood"), ("rft", "sft_id")]
    id_ood = {}
    for a, b in pairs:
        if a in curves and b in curves:
            common = {p["lr"]: p["sparsity"] for p in curves[a]}
            both = [(p["lr"], common[p["lr"]], p["sparsity"]) for p in curves[b] if p["lr"] in common]
            id_ood[f"{a} vs {b}"] = {"sparser": sum(x > y for _, x, y in both), "matched": len(both)}
    learned = [(name, p) for name, pts in rl.items() for p in pts
               if (p["accuracy_gain"].get(fam) or 0) >= LEARNED_GAIN]
    best = max(learned, key=lambda t: t[1]["sparsity"][TOL], default=None)
    parts = []
    if not matched:
        verdict, parts = "not measured", ["no learning rate was run for both an RL and an SFT recipe"]
    else:
        direction = len(wins) == len(matched)
        parts.append(f"RL (mean of {', '.join(rl)}) sparser than SFT (mean of {', '.join(sft)}) at "
                     f"{len(wins)}/{len(matched)} matched learning rates")
        if best is not None:
            low = min(p["sparsity"][TOL] for _, p in learned)
            parts.append(f"RL runs that gained at least {100 * LEARNED_GAIN:.0f} points of held-out accuracy are "
                         f"{_pct(low)} to {_pct(best[1]['sparsity'][TOL])} sparse (sparsest: {best[0]}, lr "
                         f"{best[1]['learning_rate']:g}, +{100 * best[1]['accuracy_gain'][fam]:.1f} pts) vs the "
                         "paper's 68.5-96%")
            magnitude = best[1]["sparsity"][TOL] >= 0.685
        else:
            parts.append(f"no RL run gained {100 * LEARNED_GAIN:.0f} points of held-out accuracy, so the sparsity "
                         "of a useful RL update is unmeasured")
            magnitude = False
        for k, v in id_ood.items():
            parts.append(f"{k}: in-distribution sparser at {v['sparser']}/{v['matched']} learning rates")
        at_gain = {n: _sparsity_at_gain(pts, fam, MATCHED_GAIN) for n, pts in {**rl, **sft, **controls}.items()}
        reached = {n: v for n, v in at_gain.items() if v is not None}
        if reached:
            parts.append(f"at a matched held-out gain of +{100 * MATCHED_GAIN:.0f} points (interpolated along each "
                         "learning-rate curve): " + ", ".join(f"{n} {_pct(v)}" for n, v in reached.items()))
        verdict = ("reproduces" if direction and magnitude else
                   "partly reproduces" if direction else "does not reproduce at this scale")
    return Finding("sparsity_sft_vs_rl", "Figure 1 / Table 5: update sparsity of SFT vs RL, in- vs out-of-distribution",
                   "RL 68.5-96.0% sparse (Table 1); SFT 6-15% (Figure 1); RFT 91.2%, DPO out-of-distribution 6.8-7.7%, "
                   "DPO in-distribution 81.4% (Table 5)", verdict, "; ".join(parts) + ".",
                   {"curves": curves, "in_distribution": in_dist, "rl": sorted(rl), "sft": sorted(sft), "matched_lrs": matched, "rl_sparser_at": wins,
                    "in_vs_out": id_ood,
                    "sparsity_at_matched_gain": {n: _sparsity_at_gain(p, fam, MATCHED_GAIN)
                                                 for n, p in {**rl, **sft, **controls}.items()}},
                   "sparsity_vs_lr.png", _seeds(results, {**rl, **sft, **controls}))


def _sparsity_at_gain(points: list[dict], family: str, target: float) -> float | None:
    """Sparsity where the learning-rate curve first reaches an accuracy gain of ``target``.

    Linear in gain between the two sweep points that bracket it; None if the curve never gets there.
    """
    pts = sorted(points, key=lambda p: p["learning_rate"])
    gains = [p["accuracy_gain"].get(family) for p in pts]
    for i, (p, g) in enumerate(zip(pts, gains)):
        if g is None or g < target:
            continue
        if i == 0 or gains[i - 1] is None:
            return p["sparsity"][TOL]
        g0, s0, s1 = gains[i - 1], pts[i - 1]["sparsity"][TOL], p["sparsity"][TOL]
        return s0 + (s1 - s0) * (target - g0) / (g - g0)
    return None


def _by_lr(points: dict[str, list[dict]]) -> dict[float, list[float]]:
    out: dict[float, list[float]] = {}
    for pts in points.values():
        for p in pts:
            out.setdefault(p["learning_rate"], []).append(p["sparsity"][TOL])
    return out


def _seeds(results: dict, names) -> dict:
    return {n: results["recipes"][n]["recipe"]["seed"] for n in names if n in results["recipes"]}


def _tolerance_finding(results: dict) -> Finding:
    rows = {}
    for name, e in results["recipes"].items():
        for p in e["points"]:
            rows[f"{name} lr {p['learning_rate']:g}"] = p["sparsity"]
    if not rows:
        return Finding("tolerance", "Table 6: sparsity under tolerances", "", "not measured", "No runs.")
    labels = sorted(next(iter(rows.values())).keys(), key=float)
    monotone = all(all(s[a] <= s[b] + 1e-12 for a, b in zip(labels, labels[1:])) for s in rows.values())
    low = max(s.get("1e-06", 0) - s.get("1e-08", 0) for s in rows.values())
    rises = [s.get(TOL, 0) - s.get("1e-08", 0) for s in rows.values()]
    # Paper, Table 6: from 1e-8 to 1e-6 sparsity rises by at most 1.4 points; to 1e-5 by 0.4 to 28.5.
    flat_below = low <= 0.014
    jump_in_range = 0.004 <= max(rises) <= 0.285
    sentence = (f"From 1e-8 to 1e-6 sparsity rises by at most {100 * low:.1f} points (paper: at most 1.4); from 1e-8 "
                f"to 1e-5 by {100 * min(rises):.1f} to {100 * max(rises):.1f} points (paper: 0.4 to 28.5)"
                + ("." if monotone else "; some run is not monotone in the tolerance, which indicates a bug."))
    verdict = ("reproduces" if flat_below and jump_in_range and monotone else
               "partly reproduces" if flat_below and monotone else "does not reproduce at this scale")
    return Finding("tolerance", "Table 6: sparsity (%) under tolerances 0 to 1e-4",
                   "e.g. Tulu-3-8B DPO 76.04 / 76.04 / 76.14 / 81.38 at 1e-8 / 1e-7 / 1e-6 / 1e-5; over 12 "
                   "checkpoints at most +1.4 points from 1e-8 to 1e-6 and +0.4 to +28.5 to 1e-5", verdict, sentence,
                   {"labels": labels, "rows": rows, "monotone": monotone, "rise_1e-8_to_1e-6": low},
                   "tolerance_sweep.png", _seeds(results, results["recipes"]))


def _rank_finding(results: dict) -> Finding:
    ranks = {f"{n} lr {p['learning_rate']:g}": p["update_rank"] for n, pts in _points(results, RL).items()
             for p in pts if p["sparsity"]["0"] < 1.0}
    if not ranks:
        return Finding("rank", "Table 2: update rank", "99.2-99.8% of full rank", "not measured",
                       "No RL run changed any weight.")
    mean = sum(ranks.values()) / len(ranks)
    verdict = "reproduces" if min(ranks.values()) >= 0.9 else "partly reproduces" if mean >= 0.9 else \
        "does not reproduce at this scale"
    return Finding("rank", "Table 2: mean rank of RL update matrices (% of full rank)",
                   "99.2-99.8% (Tulu 8B DPO, Eurus 7B PRIME, Llama-3 8B KTO, DeepSeek Math 7B GRPO)", verdict,
                   f"RL updates have mean rank {_pct(mean)} of full rank (lowest run {_pct(min(ranks.values()))}), "
                   "sparse but not low-rank." if verdict == "reproduces" else
                   f"RL updates have mean rank {_pct(mean)} of full rank (lowest run {_pct(min(ranks.values()))}).",
                   {"ranks": ranks}, "update_rank.png", _seeds(results, _points(results, RL)))


def _chosen(results: dict, name: str) -> dict | None:
    """The run shown in per-run figures: the Conjecture 1 run if any, else chosen by the same rule."""
    if name not in results["recipes"]:
        return None
    pts = results["recipes"][name]["points"]
    conj = results.get("conjecture", {}).get(name)
    if conj:
        return next(p for p in pts if p["learning_rate"] == conj["learning_rate"])
    learned = [p for p in pts if p["accuracy_gain"].get(_eval_family(results), float("-inf")) >= LEARNED_GAIN]
    if learned:
        return max(learned, key=lambda p: p["sparsity"][TOL])
    return max(pts, key=lambda p: p["accuracy_gain"].get(_eval_family(results), float("-inf")))


def _layer_finding(results: dict) -> Finding:
    grids, spreads, norms = {}, {}, {}
    for name in [n for n in ("dpo_id", "grpo") if n in results["recipes"]] or list(_points(results, RL)):
        p = _chosen(results, name)
        if p is None:
            continue
        cells = {k: 1 - v["changed"][TOL] / v["numel"] for k, v in p["grid"].items()}
        grids[f"{name} lr {p['learning_rate']:g}"] = cells
        layers = {k: 1 - v["changed"][TOL] / v["numel"] for k, v in p["by_layer"].items() if k != "None"}
        vals = list(layers.values())
        spreads[name] = (max(vals) - min(vals)) if vals else float("nan")
        typ = {k: 1 - v["changed"][TOL] / v["numel"] for k, v in p["by_type"].items()}
        norm = [v for k, v in typ.items() if "norm" in k]
        mats = [v for k, v in typ.items() if "norm" not in k]
        norms[name] = {"norm": sum(norm) / len(norm) if norm else None, "matrices": sum(mats) / len(mats) if mats else None}
    if not grids:
        return Finding("layers", "Figure 3: layer x matrix sparsity", "", "not measured", "No RL run.")
    even = all(s <= 0.2 for s in spreads.values())
    norm_sparser = all(v["norm"] is not None and v["norm"] >= v["matrices"] for v in norms.values())
    verdict = "reproduces" if even and norm_sparser else "partly reproduces" if even or norm_sparser else \
        "does not reproduce at this scale"
    sentence = ("; ".join(f"{n}: layer sparsities span {100 * spreads[n]:.1f} points, norm layers "
                          f"{_pct(norms[n]['norm'])} vs matrices {_pct(norms[n]['matrices'])} sparse" for n in spreads)
                + " (paper: all layers similarly sparse, layer norms almost never updated).")
    return Finding("layers", "Figure 3: update sparsity per layer and parameter matrix",
                   "all layers similarly sparse; layer normalization receives little to no update (DPO, PRIME)",
                   verdict, sentence, {"grids": grids, "layer_spread": spreads, "norm_vs_matrices": norms},
                   "layer_matrix.png", _seeds(results, spreads))


def _kl_clip_finding(results: dict) -> Finding:
    variants = {}
    for name, e in results["recipes"].items():
        r = e["recipe"]
        if r["algorithm"] != "grpo":
            continue
        kl = float(r["trl"].get("beta", 0.0)) > 0
        clip = float(r["trl"].get("max_grad_norm", 1.0)) > 0
        variants[name] = {"kl": kl, "clip": clip,
                          "curve": [{"lr": p["learning_rate"], "sparsity": p["sparsity"][TOL]} for p in e["points"]]}
    if len(variants) < 2:
        return Finding("kl_clip", "Section 6: GRPO with/without KL and clipping",
                       "with KL 69.8% vs without 68.8% sparse", "not measured",
                       "Run grpo, grpo_nokl, grpo_noclip and grpo_nokl_noclip to measure this finding.",
                       {"variants": variants}, None)
    by_lr: dict[float, list[float]] = {}
    for v in variants.values():
        for c in v["curve"]:
            by_lr.setdefault(c["lr"], []).append(c["sparsity"])
    gaps = {lr: max(s) - min(s) for lr, s in by_lr.items() if len(s) > 1}
    worst = max(gaps.values()) if gaps else float("nan")
    verdict = "reproduces" if worst <= 0.05 else "does not reproduce at this scale"
    sentence = (f"Across {len(variants)} GRPO variants (KL on/off, clipping on/off) at matched learning rates, "
                f"sparsity differs by at most {100 * worst:.1f} points (paper: 1.0 point between KL and no KL); "
                + ("KL and clipping have limited impact." if verdict == "reproduces" else
                   "here they change the sparsity by more than 5 points."))
    return Finding("kl_clip", "Section 6: GRPO with and without the KL term and gradient clipping",
                   "with KL 69.8% vs without KL 68.8% sparse (Qwen-2.5-7B-Instruct)", verdict, sentence,
                   {"variants": variants, "max_gap_by_lr": gaps}, "kl_clip.png", _seeds(results, variants))


def _conjecture_finding(results: dict) -> Finding:
    conj = results.get("conjecture") or {}
    fam = _eval_family(results)
    if not conj:
        return Finding("conjecture", "Table 3 / Figure 4: Conjecture 1", "", "not measured", "No rerun was made.")
    parts, ok = [], []
    skipped = {n: c for n, c in conj.items() if c.get("skipped")}
    conj = {n: c for n, c in conj.items() if not c.get("skipped")}
    parts += [f"{n}: not rerun ({c['skipped']})" for n, c in skipped.items()]
    ok += [False] * len(skipped)
    for name, c in conj.items():
        base = results["recipes"][name]["base_accuracy"].get(fam)
        full, sub = c["accuracy"]["full"].get(fam), c["accuracy"]["sub"].get(fam)
        same5, same4 = c["identical_share"]["1e-05"], c["identical_share"]["1e-04"]
        improved = full is not None and base is not None and full > base
        matches = sub is not None and full is not None and sub >= full - 0.02
        ok.append(improved and matches and same4 >= 0.99)
        parts.append(f"{name} (lr {c['learning_rate']:g}, subnetwork {_pct(c['mask_density'])} of parameters): "
                     f"held-out accuracy base {_pct(base)}, full {_pct(full)}, subnetwork-only {_pct(sub)}; "
                     f"{_pct(same5)} of parameters identical at 1e-5, {_pct(same4)} at 1e-4"
                     + ("" if improved else " (the full run did not improve the task, so this test says little)"))
    verdict = "reproduces" if all(ok) else "partly reproduces" if any(ok) else "does not reproduce at this scale"
    return Finding("conjecture", "Table 3 / Figure 4: Conjecture 1, retraining only the subnetwork",
                   "DPO: 94.0% identical at 1e-5, 100% at 1e-4, sub +1.6 pts avg; PRIME: 90.5% / 100%, +2.4 pts",
                   verdict, "; ".join(parts) + ".",
                   {**{n: {k: c[k] for k in ("learning_rate", "mask_density", "accuracy", "identical_share",
                                             "changed_outside_mask", "seed", "steps")} for n, c in conj.items()},
                    **{n: {"skipped": c["skipped"]} for n, c in skipped.items()}},
                   "conjecture_loss.png" if conj else None, {n: c["seed"] for n, c in {**conj, **skipped}.items()})


def _precision_finding(results: dict) -> Finding:
    rows = {}
    for name, e in results["recipes"].items():
        for p in e["points"]:
            if p.get("trace"):
                end = p["trace"][-1]
                rows.setdefault(name, []).append({"lr": p["learning_rate"], "bf16": end["bf16"], "fp32": end["fp32"]})
    title = "Precision view: bf16 checkpoints vs the fp32 master weights"
    paper = "all models compared in bfloat16 at tolerance 1e-5 (Section 2.2); no fp32 view reported"
    if not rows:
        return Finding("precision", title, paper, "not measured", "No run recorded a trace.")
    gaps = [(n, r) for n, rs in rows.items() for r in rs]
    n, r = max(gaps, key=lambda t: t[1]["bf16"] - t[1]["fp32"])
    sentence = (f"The optimiser leaves {_pct(min(x['fp32'] for _, x in gaps))} to {_pct(max(x['fp32'] for _, x in gaps))} "
                f"of fp32 master weights untouched, while the bf16 checkpoints read {_pct(min(x['bf16'] for _, x in gaps))} "
                f"to {_pct(max(x['bf16'] for _, x in gaps))} sparse; the largest gap ({n}, lr {r['lr']:g}: bf16 "
                f"{_pct(r['bf16'])} vs fp32 {_pct(r['fp32'])}) is sparsity made by bf16 rounding, not by the optimiser.")
    return Finding("precision", title, paper, "context (not a paper claim)", sentence, {"rows": rows},
                   "precision_view.png", _seeds(results, rows))


def _dynamics_finding(results: dict) -> Finding:
    curves = {}
    for name in _points(results, RL):
        p = _chosen(results, name)
        if p and p.get("trace") and len(p["trace"]) > 3:
            curves[f"{name} lr {p['learning_rate']:g}"] = p["trace"]
    title = "Figure 5: sparsity along training (RL runs)"
    paper = "PRIME: sparsity decays slowly with steps and levels off near 80%"
    if not curves:
        return Finding("dynamics", title, paper, "not measured", "No RL run recorded a trace.")
    parts, slowing = [], []
    for k, tr in curves.items():
        third = max(1, (len(tr) - 1) // 3)
        first = tr[1]["bf16"] - tr[1 + third]["bf16"] if len(tr) > 1 + third else 0.0
        last = tr[-1 - third]["bf16"] - tr[-1]["bf16"]
        slowing.append(last <= first)
        parts.append(f"{k}: {_pct(tr[1]['bf16'])} after step {tr[1]['step']}, {_pct(tr[-1]['bf16'])} at step "
                     f"{tr[-1]['step']} (drop {100 * first:.1f} points in the first third, {100 * last:.1f} in the last)")
    verdict = "reproduces" if all(slowing) else "partly reproduces" if any(slowing) else \
        "does not reproduce at this scale"
    return Finding("dynamics", title, paper, verdict, "; ".join(parts) + ".", {"curves": curves},
                   "sparsity_vs_steps.png", _seeds(results, [k.split(" ")[0] for k in curves]))


def findings(results: dict) -> list[Finding]:
    """Every finding computed from a run's ``results.json`` data (no plotting)."""
    return [_sparsity_finding(results), _tolerance_finding(results), _rank_finding(results),
            _layer_finding(results), _kl_clip_finding(results), _conjecture_finding(results),
            _dynamics_finding(results), _precision_finding(results)]


class _FigureFactory:
    """``subplots`` as pyplot spells it, on a standalone ``matplotlib.figure.Figure`` (Agg canvas)."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)


def _plot(f: Finding, results: dict, figdir: Path) -> None:
    plt = _FigureFactory()  # Figure objects, no pyplot: no global backend switch, nothing to close

    if f.figure is None:
        return
    path = figdir / f.figure
    if f.key == "sparsity_sft_vs_rl":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, pts in f.data["curves"].items():
            algo = results["recipes"][name]["recipe"]["algorithm"]
            style = "-" if algo in RL else "--"
            marker = "o" if f.data["in_distribution"].get(name) else "x"
            lrs = [p["lr"] for p in pts]
            axes[0].plot(lrs, [100 * p["sparsity"] for p in pts], style, marker=marker, label=name)
            axes[1].plot(lrs, [100 * (p["gain"] or 0) for p in pts], style, marker=marker, label=name)
        for ax, ylabel in zip(axes, ("update sparsity at 1e-5 (%)", "held-out accuracy gain (points)")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
        axes[0].axhspan(68.5, 96.0, color="tab:green", alpha=0.12, label="paper RL range")
        axes[0].axhspan(6, 15, color="tab:red", alpha=0.12, label="paper SFT range")
        axes[0].legend(fontsize=7)
    elif f.key == "tolerance":
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = f.data["labels"]
        for name, s in f.data["rows"].items():
            ax.plot(labels, [100 * s[t] for t in labels], marker="o", label=name)
        ax.set_xlabel("tolerance")
        ax.set_ylabel("sparsity (%)")
        ax.legend(fontsize=6)
    elif f.key == "rank":
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(f.data["ranks"])
        ax.barh(names, [100 * f.data["ranks"][n] for n in names])
        ax.axvline(99.2, color="k", ls=":", label="paper 99.2-99.8%")
        ax.set_xlabel("mean update rank (% of full)")
        ax.legend(fontsize=7)
    elif f.key == "layers":
        grids = f.data["grids"]
        fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 4), squeeze=False)
        for ax, (name, cells) in zip(axes[0], grids.items()):
            layers = sorted({k.split("|")[0] for k in cells if k.split("|")[0] != "None"}, key=int)
            types = sorted({k.split("|")[1] for k in cells if k.split("|")[0] != "None"})
            grid = [[100 * cells.get(f"{l}|{t}", float("nan")) for t in types] for l in layers]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(types)), types, rotation=60, fontsize=7)
            ax.set_yticks(range(len(layers)), layers)
            ax.set_ylabel("layer")
            ax.set_title(name, fontsize=9)
            fig.colorbar(im, ax=ax, label="sparsity at 1e-5 (%)")
    elif f.key == "kl_clip":
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, v in f.data["variants"].items():
            ax.plot([c["lr"] for c in v["curve"]], [100 * c["sparsity"] for c in v["curve"]], marker="o",
                    label=f"{name} (KL {'on' if v['kl'] else 'off'}, clip {'on' if v['clip'] else 'off'})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("sparsity at 1e-5 (%)")
        ax.legend(fontsize=7)
    elif f.key == "conjecture":
        conj = {n: c for n, c in results["conjecture"].items() if not c.get("skipped")}
        fig, axes = plt.subplots(1, len(conj), figsize=(5 * len(conj), 3.5), squeeze=False)
        for ax, (name, c) in zip(axes[0], conj.items()):
            for which, style in (("full", "-"), ("sub", "--")):
                pts = c["loss"][which]
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], style, label=f"theta_{which}")
            ax.set_title(f"{name} lr {c['learning_rate']:g}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
    elif f.key == "dynamics":
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, tr) in enumerate(f.data["curves"].items()):
            color = f"C{i % 10}"
            ax.plot([t["step"] for t in tr], [100 * t["bf16"] for t in tr], "-o", color=color, label=name)
            ax.plot([t["step"] for t in tr], [100 * t["fp32"] for t in tr], ":", color=color)
        ax.set_xlabel("step")
        ax.set_ylabel("sparsity (%): bf16 solid, fp32 dotted")
        ax.legend(fontsize=7)
    elif f.key == "precision":
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, rs) in enumerate(f.data["rows"].items()):
            color = f"C{i % 10}"
            ax.plot([r["lr"] for r in rs], [100 * r["bf16"] for r in rs], "-o", color=color, label=f"{name} bf16")
            ax.plot([r["lr"] for r in rs], [100 * r["fp32"] for r in rs], ":x", color=color)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("sparsity (%): bf16 solid, fp32 dotted")
        ax.legend(fontsize=6)
    else:  # pragma: no cover
        return
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def _precision_text(run: dict) -> str:
    """How the run trained; run.json files from before the compute option say only "training"."""
    pr = run.get("precision") or {}
    if "master_weights" in pr:
        how = (f"pure {pr['master_weights']} weights" if pr["master_weights"] == "bfloat16" else
               f"{pr['master_weights']} master weights, {pr['compute']} compute")
    else:
        how = f"trained in {pr.get('training', '?')}"
    return f"{how}, checkpoints in {pr.get('checkpoint', '?')}"


def _markdown(results: dict, items: list[Finding]) -> str:
    run = results["run"]
    base = run.get("base_metadata") or {}
    lines = ["# rlsparse lab report", "",
             f"Base: `{run['base']}` ({base.get('num_parameters', '?')} parameters, held-out accuracy "
             f"{', '.join(f'{k} {_pct(v)}' for k, v in (base.get('test_accuracy') or {}).items()) or 'n/a'}). "
             f"Precision: {_precision_text(run)}; "
             f"sparsity compares the checkpoints as stored, at tolerance {TOL} unless stated. "
             f"Device: {run['device']}. Quick: {run['quick']}. Nothing here is tuned to match the paper.", ""]
    for f in items:
        lines += [f"## {f.title}", "", f"**Verdict: {f.verdict}.** {f.sentence}", "", f"Paper: {f.paper}", "",
                  f"Seeds: {', '.join(f'{k}={v}' for k, v in f.seeds.items()) or 'n/a'}", ""]
        if f.figure:
            lines += [f"![{f.key}](figures/{f.figure})", ""]
    lines += ["## Runs", "", "| recipe | lr | steps | sparsity 0 | sparsity 1e-5 | accuracy | gain |", "|---|---|---|---|---|---|---|"]
    fam = _eval_family(results)
    for name, e in results["recipes"].items():
        for p in e["points"]:
            lines.append(f"| {name} | {p['learning_rate']:g} | {e['recipe']['steps']} | {_pct(p['sparsity']['0'])} | "
                         f"{_pct(p['sparsity'][TOL])} | {_pct(p['accuracy'].get(fam))} | "
                         f"{100 * p['accuracy_gain'].get(fam, float('nan')):+.1f} |")
    return "\n".join(lines) + "\n"


def _html(md_items: list[Finding], results: dict) -> str:
    run = results["run"]
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>rlsparse lab report</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}.f{display:flex;gap:1.5em;"
             "border-top:1px solid #ccc;padding:1em 0}.f img{max-width:620px}.v{font-weight:bold}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style>"
             "</head><body><h1>rlsparse lab report</h1>",
             f"<p>Base <code>{e(run['base'])}</code>; {e(_precision_text(run))}; tolerance {TOL} unless stated; device {e(run['device'])}; "
             f"quick {run['quick']}. Nothing here is tuned to match the paper.</p>"]
    for f in md_items:
        img = f"<img src='figures/{e(f.figure)}' alt='{e(f.key)}'>" if f.figure else ""
        parts.append(f"<div class='f'><div>{img}</div><div><h2>{e(f.title)}</h2><p class='v'>{e(f.verdict)}</p>"
                     f"<p>{e(f.sentence)}</p><p><i>Paper:</i> {e(f.paper)}</p>"
                     f"<p><i>Seeds:</i> {e(', '.join(f'{k}={v}' for k, v in f.seeds.items()))}</p></div></div>")
    fam = _eval_family(results)
    parts.append("<h2>Runs</h2><table><tr><th>recipe</th><th>lr</th><th>steps</th><th>sparsity 0</th>"
                 "<th>sparsity 1e-5</th><th>accuracy</th><th>gain</th><th>rank</th></tr>")
    for name, en in results["recipes"].items():
        for p in en["points"]:
            parts.append(f"<tr><td>{e(name)}</td><td>{p['learning_rate']:g}</td><td>{en['recipe']['steps']}</td>"
                         f"<td>{_pct(p['sparsity']['0'])}</td><td>{_pct(p['sparsity'][TOL])}</td>"
                         f"<td>{_pct(p['accuracy'].get(fam))}</td>"
                         f"<td>{100 * p['accuracy_gain'].get(fam, float('nan')):+.1f}</td>"
                         f"<td>{_pct(p['update_rank'])}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Render ``report.html``, ``report.md``, ``report.json`` and ``figures/`` for a lab run folder.

    Args:
        run_dir: A folder written by ``rlsparse lab run``.

    Returns:
        (html path, markdown path).

    Example:
        >>> html, md = render("runs/lab")
    """
    run_dir = Path(run_dir)
    src = run_dir / "results.json"
    if not src.is_file():
        raise CheckpointError(f"{run_dir} has no results.json; expected a folder written by `rlsparse lab run`")
    results = json.loads(src.read_text())
    if results.get("schema_version", 1) > REPORT_SCHEMA_VERSION:
        raise CheckpointError(f"{src} has schema_version {results['schema_version']}, newer than this rlsparse "
                              f"reads ({REPORT_SCHEMA_VERSION}); upgrade rlsparse")
    items = findings(results)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    for f in items:
        _plot(f, results, figdir)
    _write(run_dir / "report.json", json.dumps({"schema_version": REPORT_SCHEMA_VERSION,
                                                "findings": [asdict(f) for f in items]}, indent=1, default=float))
    md, page = run_dir / "report.md", run_dir / "report.html"
    _write(md, _markdown(results, items))
    _write(page, _html(items, results))
    return page, md
