"""Table 4: do two seeds of the same recipe update overlapping subnetworks? Judged against the
Appendix E uniform null and, where measured, the magnitude-stratified null (random within each
tensor x bf16-exponent cell): the uniform null ignores that small-magnitude weights change more
easily in bf16, and so overstates how consistent the subnetworks are."""

from __future__ import annotations

from rlsparse.lab.verdicts.common import Finding, not_measured, pct

TITLE = "Table 4: subnetwork overlap across seeds, against uniform and magnitude-stratified nulls"
PAPER = "o1 60.5-77.6% vs random 36.7-58.7% across seeds, data and algorithms (Table 4, Appendix E)"


def finding(results: dict, prereg) -> Finding:
    margin = prereg["noise_margin"]
    rule = (f"Reproduces when, at every learning rate where two seeds changed weights, o1 exceeds the stricter of the "
            f"available nulls (stratified if measured, else uniform) by more than {100 * margin:.0f} points; partly when "
            "it beats only the uniform null; otherwise does not reproduce.")
    control = ("The magnitude-stratified null: subnetworks drawn at random within each tensor x bf16-exponent cell. "
               "Beating only the uniform null says the overlap could come from which weights bf16 lets move.")
    rows = {f"{n} lr {o['learning_rate']:g}": o for n, e in results["recipes"].items() for o in e.get("seed_overlap", [])
            if o.get("o1") is not None and o.get("o1_random")}
    if not rows:
        return not_measured("table4", TITLE, PAPER, "No recipe ran two seeds that changed weights.", rule, control)
    beats_uniform = [o["o1"] > o["o1_random"] + margin for o in rows.values()]
    strat = [o for o in rows.values() if o.get("o1_stratified") is not None]
    beats_strat = [o["o1"] > o["o1_stratified"] + margin for o in strat]
    if strat and len(strat) == len(rows) and all(beats_strat):
        verdict = "reproduces"
    elif not strat and all(beats_uniform):
        verdict = "partly reproduces"  # the stricter null was not measured
    elif any(beats_uniform):
        verdict = "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    sentence = "; ".join(f"{k}: o1 {pct(o['o1'])}, uniform null {pct(o['o1_random'])}, stratified null "
                         f"{pct(o.get('o1_stratified'))}" for k, o in rows.items())
    if not strat:
        sentence += " (the magnitude-stratified null was not available in this build)"
    return Finding("table4", TITLE, PAPER, verdict, sentence + ".", {"rows": rows}, None,
                   {k.split(" ")[0]: o.get("seeds") for k, o in rows.items()}, rule, control)
