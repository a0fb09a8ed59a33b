"""Table 3 / Figure 4: Conjecture 1 (training only the subnetwork recovers the full run), with its
controls, and Figure 4's "lower training loss" judged rather than only plotted.

Controls: a random mask of the same per-tensor density (is *this* subnetwork special, or would any
subset of that size do?), and the full run reseeded (how identical are two full runs anyway?).
``changed_outside_mask == 0`` is part of the verdict: a masked run that moved other weights tests
nothing.
"""

from __future__ import annotations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import Finding, not_measured, pct, train_family

TITLE = "Table 3 / Conjecture 1: retraining only the subnetwork, with a random-mask and a reseeded control"
PAPER = "DPO: 94.0% identical at 1e-5, 100% at 1e-4, sub +1.6 pts avg; PRIME: 90.5% / 100%, +2.4 pts"
TITLE4 = "Figure 4: theta_sub reaches a lower training loss than theta_full"
PAPER4 = "the subnetwork-only run's training loss is lower than the full run's (DPO, PRIME)"


def finding(results: dict, prereg) -> Finding:
    cj, learned, margin = prereg["conjecture"], prereg["learned_gain"], prereg["noise_margin"]
    rule = (f"Per recipe: the full run gained at least +{100 * learned:.0f} points, the subnetwork-only run's held-out "
            f"accuracy is within {100 * cj['accuracy_margin']:.0f} points of it (or above), at least "
            f"{pct(cj['identical_1e-4'])} of parameters are identical at 1e-4, no weight moved outside the mask, and "
            f"theta_sub is closer to theta_full than a reseeded full run is (identical share at 1e-5 higher by more than "
            f"{100 * margin:.0f} points). Reproduces when every rerun passes and the random mask does worse than the "
            "subnetwork (by more than the accuracy margin); partly when they pass but a random mask does as well, or "
            "some rerun passes; otherwise does not reproduce.")
    control = ("A random mask with the same per-tensor density (same data, seed, steps) and the full run reseeded: "
               "if a random subset trains as well, or a reseeded full run is as identical, the subnetwork is not special.")
    conj = results.get("conjecture") or {}
    if not conj:
        return not_measured("conjecture", TITLE, PAPER, "No rerun was made.", rule, control)
    parts, passed, special, rows = [], [], [], {}
    selections = sorted({c.get("selection", "best case (chosen after the sweep; older run)") for c in conj.values()})
    for name, c in conj.items():
        if c.get("skipped"):
            parts.append(f"{name}: not rerun ({c['skipped']})")
            passed.append(False)
            continue
        fam = train_family(results, name) if name in results["recipes"] else "add"
        base = results["recipes"][name]["base_accuracy"].get(fam)
        acc = c["accuracy"]
        full, sub = acc["full"].get(fam), acc["sub"].get(fam)
        rand = (acc.get("random_mask") or {}).get(fam)
        gained = full is not None and base is not None and stats.at_least(full - base, learned)
        matches = sub is not None and full is not None and stats.at_least(sub, full - cj["accuracy_margin"])
        same4, same5 = c["identical_share"]["1e-04"], c["identical_share"]["1e-05"]
        reseeded = (c.get("identical_share_reseeded_full") or {}).get("1e-05")
        closer = reseeded is not None and same5 > reseeded + margin
        outside = c.get("changed_outside_mask")
        ok = gained and matches and stats.at_least(same4, cj["identical_1e-4"]) and outside == 0 and closer
        passed.append(ok)
        rand_worse = rand is not None and sub is not None and sub > rand + cj["accuracy_margin"]
        special.append(rand_worse)
        rows[name] = {"learning_rate": c["learning_rate"], "selection": c.get("selection"), "mask_density": c["mask_density"],
                      "base": base, "full": full, "sub": sub, "random_mask": rand,
                      "reseeded_full": (acc.get("reseeded_full") or {}).get(fam), "identical_1e-5": same5,
                      "identical_1e-4": same4, "identical_1e-5_reseeded": reseeded,
                      "identical_1e-5_random_mask": (c.get("identical_share_random_mask") or {}).get("1e-05"),
                      "changed_outside_mask": outside, "changed_outside_random_mask": c.get("changed_outside_random_mask"),
                      "passed": ok, "random_mask_worse": rand_worse, "seed": c.get("seed"), "steps": c.get("steps")}
        parts.append(f"{name} (lr {c['learning_rate']:g}, subnetwork {pct(c['mask_density'])} of parameters): held-out "
                     f"accuracy base {pct(base)}, full {pct(full)}, subnetwork-only {pct(sub)}, random mask of the same "
                     f"density {pct(rand)}; identical to the full run at 1e-5: subnetwork-only {pct(same5)}, reseeded "
                     f"full run {pct(reseeded)}; {pct(same4)} identical at 1e-4; {outside} weights moved outside the mask"
                     + ("" if gained else " (the full run did not learn, so this test says little)"))
    if passed and all(passed) and all(special):
        verdict = "reproduces"
    elif any(passed):
        verdict = "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    return Finding("conjecture", TITLE, PAPER, verdict, "; ".join(parts) + ".", rows,
                   "conjecture_loss.png" if rows else None, {n: c.get("seed") for n, c in conj.items()}, rule, control,
                   "; ".join(selections))


def _tail(history: list[dict], share: float) -> dict[int, float]:
    steps = {h["step"]: h["loss"] for h in history if isinstance(h.get("loss"), (int, float))}
    if not steps:
        return {}
    cut = max(steps) * (1 - share)
    return {s: v for s, v in steps.items() if s > cut}


def figure4(results: dict, prereg) -> Finding:
    share, boot = prereg["figure4"]["tail_share"], prereg["bootstrap"]
    rule = (f"Per rerun, the step-paired difference full minus subnetwork-only training loss over the last "
            f"{100 * share:.0f}% of steps; 'lower' when its {100 * boot['level']:.0f}% bootstrap interval lies above 0. "
            "Reproduces when every rerun is lower; partly when some are; otherwise does not reproduce.")
    control = ("The same comparison for the random-mask control: if it is 'lower' too, a lower loss is what "
               "restricting the update does, not what the subnetwork does.")
    conj = {n: c for n, c in (results.get("conjecture") or {}).items() if not c.get("skipped") and c.get("loss")}
    if not conj:
        return not_measured("figure4", TITLE4, PAPER4, "No rerun with loss curves.", rule, control)
    rows, parts, lower = {}, [], []
    for name, c in conj.items():
        full = _tail(c["loss"]["full"], share)
        row = {}
        for which in ("sub", "random_mask"):
            other = _tail(c["loss"].get(which) or [], share)
            common = sorted(set(full) & set(other))
            if not common:
                continue
            diffs = [full[s] - other[s] for s in common]
            m, lo, hi = stats.bootstrap([diffs], lambda a: float(a[0].mean()), resamples=boot["resamples"],
                                        level=boot["level"], seed=boot["seed"])
            row[which] = {"mean_full_minus": m, "interval": [lo, hi], "steps": len(common), "lower": lo > 0}
        if "sub" in row:
            lower.append(row["sub"]["lower"])
            rows[name] = row
            r = row["sub"]
            parts.append(f"{name}: full minus subnetwork-only loss {r['mean_full_minus']:+.4f} over the last "
                         f"{r['steps']} steps (interval {r['interval'][0]:+.4f} to {r['interval'][1]:+.4f})"
                         + (f"; random mask {row['random_mask']['mean_full_minus']:+.4f}" if "random_mask" in row else ""))
    if not rows:
        return not_measured("figure4", TITLE4, PAPER4, "No rerun logged a loss on the same steps as its full run.",
                            rule, control)
    verdict = ("reproduces" if all(lower) else "partly reproduces" if any(lower) else "does not reproduce at this scale")
    return Finding("figure4", TITLE4, PAPER4, verdict, "; ".join(parts) + ".", rows, "conjecture_loss.png",
                   {n: c.get("seed") for n, c in conj.items()}, rule, control)
