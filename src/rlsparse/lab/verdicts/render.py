"""Report text for what the verdict modules add: the pre-registration statement, each verdict's
rule, control and selection label, and the per-run measurements the verdicts match on."""

from __future__ import annotations

import html

from rlsparse.lab.preregistration import for_run
from rlsparse.lab.verdicts.common import TOL, Finding, pct


def preregistration_statement(results: dict) -> str:
    """One paragraph: where the thresholds come from and whether they were recorded with the run."""
    run = results["run"]
    pre = for_run(run)
    recorded = "preregistration" in run
    conj = {n: e["recipe"].get("conjecture_lr") for n, e in results["recipes"].items() if e["recipe"].get("conjecture")}
    return (f"Verdict thresholds: pre-registered in `preregistration.json` (sha256 {pre.sha256[:12]}, registered "
            f"{pre['registered'] if 'registered' in pre.values else '?'}), "
            + ("recorded in this run's run.json before any training started" if recorded else
               "NOT recorded with this run (an older run): judged with the current file")
            + f"; matched gain +{100 * pre['matched_gain']:.0f} points, 'learned' = gain of at least "
            f"+{100 * pre['learned_gain']:.0f} points, noise margin {100 * pre['noise_margin']:.0f} points of sparsity, "
            f"{100 * pre['bootstrap']['level']:.0f}% bootstrap intervals over seeds ({pre['bootstrap']['resamples']} "
            "resamples). Conjecture 1 runs: "
            + (", ".join(f"{n} at lr {lr:g} (fixed in the recipe)" if lr else f"{n} (chosen after the sweep: best case)"
                         for n, lr in conj.items()) or "none")
            + ". Numbers are never tuned to match the paper.")


def finding_markdown(f: Finding) -> list[str]:
    lines = [f"![{name}](figures/{name})" for name in f.data.get("extra_figures", [])]
    lines += [""] if lines else []
    if f.rule:
        lines += [f"Rule: {f.rule}", ""]
    if f.control:
        lines += [f"Control: {f.control}", ""]
    if f.selection:
        lines += [f"Selection: {f.selection}", ""]
    return lines


def finding_html(f: Finding) -> str:
    e = html.escape
    out = "".join(f"<img src='figures/{e(n)}' alt='{e(n)}'>" for n in f.data.get("extra_figures", []))
    if f.rule:
        out += f"<p><i>Rule:</i> {e(f.rule)}</p>"
    if f.control:
        out += f"<p><i>Control:</i> {e(f.control)}</p>"
    if f.selection:
        out += f"<p><i>Selection:</i> {e(f.selection)}</p>"
    return out


def run_columns(point: dict) -> list[str]:
    """Seed, KL(start || finetuned), ||Δθ||, net-drift ratio and clip share of one run, as table cells."""
    drift = (point.get("net_drift") or {}).get("net_over_path")
    clip = point.get("clip_active_share")
    kl = point.get("probe_kl")
    norm = point.get("delta_norm")
    return [str(point.get("seed", "")), "n/a" if kl is None else f"{kl:.2e}", "n/a" if norm is None else f"{norm:.3g}",
            "n/a" if drift is None else f"{drift:.2f}", "n/a" if clip is None else pct(clip),
            pct(point.get("update_rank_random_control"))]


RUN_HEADERS = ["seed", "probe KL", "L2 of Δθ", "net drift", "clip active", "rank (random control)"]
__all__ = ["preregistration_statement", "finding_markdown", "finding_html", "run_columns", "RUN_HEADERS", "TOL"]
