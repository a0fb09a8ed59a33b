"""Section 6: GRPO with and without the KL term and gradient clipping, beside how much each
manipulation actually acted: the share of steps where clipping changed the gradient, and the KL's
magnitude (the trainer's logged KL and KL(start || finetuned) on the probe set)."""

from __future__ import annotations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import TOL, Finding, by_lr, not_measured, pct, recipe, seeds_of

TITLE = "Section 6: GRPO with and without the KL term and gradient clipping"
PAPER = "with KL 69.8% vs without KL 68.8% sparse (Qwen-2.5-7B-Instruct)"


def _logged_kl(points: list[dict]) -> float | None:
    kls = [h["kl"] for p in points for h in p.get("log_history", []) if isinstance(h.get("kl"), (int, float))]
    return stats.mean(kls) if kls else None


def finding(results: dict, prereg) -> Finding:
    kc = prereg["kl_clip"]
    rule = (f"Reproduces when sparsity differs by at most {100 * kc['max_gap']:.0f} points across the variants at every "
            f"matched learning rate (seed means) and both manipulations acted: clipping active in at least "
            f"{pct(kc['clip_active_min'])} of steps, and a logged KL of at least {kc['kl_min']:g}; partly when the gap "
            "is small but a manipulation was inert; otherwise does not reproduce.")
    control = "How often clipping acted and how large the KL was: a manipulation that never acts cannot change sparsity."
    variants = {}
    for name, e in results["recipes"].items():
        r = recipe(results, name)
        if r["algorithm"] != "grpo" or r.get("group", "sft_vs_rl") not in ("sft_vs_rl", "kl_clip"):
            continue
        trl = r.get("trl", {})
        clip_shares = [p["clip_active_share"] for p in e["points"] if p.get("clip_active_share") is not None]
        sp = by_lr(results, name, lambda p: p["sparsity"][TOL])
        variants[name] = {"kl": float(trl.get("beta", 0.0)) > 0, "clip": float(trl.get("max_grad_norm", 1.0)) > 0,
                          "curve": [{"lr": lr, "sparsity": stats.mean(v)} for lr, v in sp.items()],
                          "clip_active_share": stats.mean(clip_shares) if clip_shares else None,
                          "logged_kl": _logged_kl(e["points"]),
                          "probe_kl": stats.mean([p.get("probe_kl") for p in e["points"] if p.get("probe_kl") is not None])}
    if len(variants) < 2:
        return not_measured("kl_clip", TITLE, PAPER, "Run grpo, grpo_nokl, grpo_noclip and grpo_nokl_noclip to measure "
                            "this finding.", rule, control)
    by: dict[float, list[float]] = {}
    for v in variants.values():
        for c in v["curve"]:
            by.setdefault(c["lr"], []).append(c["sparsity"])
    gaps = {lr: max(s) - min(s) for lr, s in by.items() if len(s) > 1}
    worst = max(gaps.values()) if gaps else float("nan")
    clip_on = [v["clip_active_share"] for v in variants.values() if v["clip"] and v["clip_active_share"] is not None]
    kl_on = [v["logged_kl"] for v in variants.values() if v["kl"] and v["logged_kl"] is not None]
    clip_acted = bool(clip_on) and stats.at_least(max(clip_on), kc["clip_active_min"])
    kl_acted = bool(kl_on) and stats.at_least(max(kl_on), kc["kl_min"])
    small = worst <= kc["max_gap"] + 1e-12
    verdict = ("reproduces" if small and clip_acted and kl_acted else "partly reproduces" if small
               else "does not reproduce at this scale")
    sentence = (f"Across {len(variants)} GRPO variants at matched learning rates sparsity differs by at most "
                f"{100 * worst:.1f} points (paper: 1.0 point between KL and no KL); clipping acted in "
                + (", ".join(f"{n} {pct(v['clip_active_share'])}" for n, v in variants.items() if v["clip"]) or "no run")
                + " of steps; logged KL "
                + (", ".join(f"{n} {v['logged_kl']:.2e}" for n, v in variants.items() if v["kl"] and v["logged_kl"] is not None)
                   or "not logged")
                + "; probe KL(start || finetuned) "
                + ", ".join(f"{n} {v['probe_kl']:.2e}" for n, v in variants.items() if v["probe_kl"] == v["probe_kl"])
                + ("" if clip_acted and kl_acted else
                   " (a manipulation barely acted, so 'limited impact' is partly untested)") + ".")
    return Finding("kl_clip", TITLE, PAPER, verdict, sentence, {"variants": variants, "max_gap_by_lr": gaps},
                   "kl_clip.png", seeds_of(results, variants), rule, control)
