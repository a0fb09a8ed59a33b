"""Table 6: sparsity under tolerances, beside the share of weights whose bf16 spacing already exceeds
each tolerance (there, the tolerance cannot hide any change: the flat part of the curve is the format's)."""

from __future__ import annotations

from rlsparse.lab.verdicts.common import TOL, Finding, not_measured, pct, seeds_of

TITLE = "Table 6: sparsity (%) under tolerances 0 to 1e-4"
PAPER = ("e.g. Tulu-3-8B DPO 76.04 / 76.04 / 76.14 / 81.38 at 1e-8 / 1e-7 / 1e-6 / 1e-5; over 12 checkpoints at "
         "most +1.4 points from 1e-8 to 1e-6 and +0.4 to +28.5 to 1e-5")


def finding(results: dict, prereg) -> Finding:
    t6 = prereg["table6"]
    rule = (f"Reproduces when, for every run, sparsity rises by at most {100 * t6['flat_1e-8_to_1e-6']:.1f} points from "
            f"1e-8 to 1e-6, the largest rise to 1e-5 lies in {100 * t6['jump_low']:.1f}-{100 * t6['jump_high']:.1f} "
            "points and sparsity never falls as the tolerance grows; partly when only the flat part and monotonicity hold.")
    spacing = (results.get("controls") or {}).get("spacing_share")
    control = ("The share of base weights whose bf16 spacing exceeds each tolerance: "
               + (", ".join(f"{t}: {pct(v)}" for t, v in spacing.items()) if spacing else "not measured")
               + ". Where the spacing exceeds t, any change exceeds t, so only the other weights can make sparsity "
               "rise with t; a flat curve below that spacing is guaranteed by the number format.")
    rows = {}
    for name, e in results["recipes"].items():
        for p in e["points"]:
            rows[f"{name} lr {p['learning_rate']:g}" + (f" seed {p['seed']}" if "seed" in p else "")] = p["sparsity"]
    if not rows:
        return not_measured("tolerance", TITLE, PAPER, "No runs.", rule, control)
    labels = sorted(next(iter(rows.values())).keys(), key=float)
    monotone = all(all(s[a] <= s[b] + 1e-12 for a, b in zip(labels, labels[1:])) for s in rows.values())
    low = max(s.get("1e-06", 0) - s.get("1e-08", 0) for s in rows.values())
    rises = [s.get(TOL, 0) - s.get("1e-08", 0) for s in rows.values()]
    flat_below = low <= t6["flat_1e-8_to_1e-6"] + 1e-12
    jump = t6["jump_low"] - 1e-12 <= max(rises) <= t6["jump_high"] + 1e-12
    verdict = ("reproduces" if flat_below and jump and monotone else
               "partly reproduces" if flat_below and monotone else "does not reproduce at this scale")
    automatic = spacing is not None and spacing.get("1e-06", 0) >= 0.99
    sentence = (f"From 1e-8 to 1e-6 sparsity rises by at most {100 * low:.1f} points (paper: at most 1.4); from 1e-8 "
                f"to 1e-5 by {100 * min(rises):.1f} to {100 * max(rises):.1f} points (paper: 0.4 to 28.5)"
                + (f"; {pct(spacing.get('1e-06'))} of base weights have a bf16 spacing above 1e-6, so the flat part is "
                   "the number format's" if automatic else "")
                + ("." if monotone else "; some run is not monotone in the tolerance, which indicates a bug."))
    return Finding("tolerance", TITLE, PAPER, verdict, sentence,
                   {"labels": labels, "rows": rows, "monotone": monotone, "rise_1e-8_to_1e-6": low,
                    "spacing_share": spacing},
                   "tolerance_sweep.png", seeds_of(results, results["recipes"]), rule, control)
