"""Figures 2, 6 and 7(b): what every step of an RL run does to the subnetwork, read in the bf16 view
after every optimiser step (``lab.trace``: as if a checkpoint were saved each step; the paper
saved intermediate checkpoints of PRIME).

- Figure 2: each element is never updated, updated and cancelled back, or in the final subnetwork
  (paper, PRIME: 72% / 8% / 20%);
- Figure 6: the share of all elements changed at a step but outside the final subnetwork (paper:
  rises early, then declines; ~8.5% of the ever-updated elements end outside);
- Figure 7(b): the share of elements one step changes (paper: ~7% per step on average, against
  a final subnetwork of ~20-30%).

The rule uses no tuned number: the three comparisons are between parts of the same run.
"""

from __future__ import annotations

import html

from rlsparse.lab.verdicts.common import Finding, is_rl, not_measured, pct, seeds_of

TITLE = "Figures 2, 6 and 7(b): never updated, cancelled and final; updates outside the final subnetwork; per-step share"
PAPER = ("PRIME: 72% of parameters never updated, 8% updated but cancelled, 20% the final subnetwork (Figure 2); "
         "about 8.5% of ever-updated parameters end outside the final subnetwork, a share that rises early and then "
         "declines (Figure 6); each step updates ~7% of the weights on average (Figure 7(b))")
PAPER_SPLIT = {"never": 0.72, "cancelled": 0.08, "final": 0.20}
PAPER_PER_STEP = 0.07


def runs(results: dict) -> dict[str, dict]:
    """Every RL cell that recorded its checkpoint series, by label, with the shares computed."""
    out = {}
    for name, entry in results["recipes"].items():
        if not is_rl(results, name):
            continue
        for p in entry["points"]:
            s = p.get("series")
            if not s or not s.get("numel") or not s.get("per_step"):
                continue
            n = s["numel"]
            steps = [d["share"] for d in s["per_step"]]
            outside = s.get("outside_final") or []
            peak = max(outside, key=lambda d: d["share"]) if outside else None
            label = f"{name} lr {p['learning_rate']:g}" + (f" seed {p['seed']}" if "seed" in p else "")
            out[label] = {"recipe": name, "never": s["never"] / n, "cancelled": s["cancelled"] / n,
                          "final": s["final"] / n, "cancelled_of_ever": s["cancelled"] / s["ever"] if s["ever"] else 0.0,
                          "per_step_mean": sum(steps) / len(steps), "per_step_max": max(steps),
                          "per_step": s["per_step"], "outside_final": outside,
                          "outside_peak_step": peak["step"] if peak else None,
                          "last_step": s["per_step"][-1]["step"]}
    return out


def _checks(r: dict) -> dict[str, bool]:
    return {"never_largest": r["never"] > max(r["cancelled"], r["final"]),
            "cancelled_below_final": r["cancelled"] < r["final"],
            "step_below_final": r["per_step_mean"] < r["final"]}


def finding(results: dict, prereg) -> Finding:
    rule = ("Per RL run, three comparisons between parts of the same run (no tuned threshold): the never-updated "
            "share is the largest of the three parts; fewer elements are cancelled than end in the final subnetwork; "
            "one step changes, on average, fewer elements than the final subnetwork holds. Reproduces when all three "
            "hold in every run; partly when each holds in at least one run; otherwise does not reproduce. Figure 6's "
            "shape (the step where the outside share peaks) is reported, not judged: a few dozen steps are too few "
            "to call a rise and a decline.")
    control = ("Read at every optimiser step, not at a few saved checkpoints: a checkpoint series with gaps counts "
               "an element that moved and came back between two checkpoints as never updated, so it can only "
               "understate the cancelled part.")
    found = runs(results)
    if not found:
        return not_measured("series", TITLE, PAPER, "No RL run recorded its checkpoint series (runs made before the "
                            "lab's trace counted them, or with --no-trace).", rule, control)
    checks = {k: _checks(r) for k, r in found.items()}
    every = all(all(c.values()) for c in checks.values())
    each = all(any(c[key] for c in checks.values()) for key in ("never_largest", "cancelled_below_final",
                                                               "step_below_final"))
    verdict = "reproduces" if every else "partly reproduces" if each else "does not reproduce at this scale"
    mean = lambda key: sum(r[key] for r in found.values()) / len(found)  # noqa: E731
    held = {key: sum(c[key] for c in checks.values()) for key in ("never_largest", "cancelled_below_final",
                                                                   "step_below_final")}
    sentence = (f"over {len(found)} RL run{'s' if len(found) > 1 else ''}: never updated {pct(mean('never'))}, "
                f"cancelled {pct(mean('cancelled'))}, final {pct(mean('final'))} (paper 72% / 8% / 20%); "
                f"{pct(mean('cancelled_of_ever'))} of the ever-updated elements end outside the final subnetwork "
                f"(paper ~8.5%); one step changes {pct(mean('per_step_mean'))} of the elements on average (paper ~7%). "
                f"Never-updated largest in {held['never_largest']}/{len(found)} runs, cancelled below final in "
                f"{held['cancelled_below_final']}/{len(found)}, per step below final in "
                f"{held['step_below_final']}/{len(found)}.")
    data = {"runs": found, "checks": checks, "paper": {"split": PAPER_SPLIT, "per_step": PAPER_PER_STEP}}
    return Finding("series", TITLE, PAPER, verdict, sentence, data, "checkpoint_series.png",
                   seeds_of(results, {r["recipe"] for r in found.values()}), rule, control)


HEADERS = ["run", "never updated", "cancelled", "final subnetwork", "cancelled / ever updated",
           "per step: mean (max)", "outside-final share peaks at step (of)"]


def table(f: Finding) -> list[list[str]]:
    out = [["paper: PRIME", pct(PAPER_SPLIT["never"]), pct(PAPER_SPLIT["cancelled"]), pct(PAPER_SPLIT["final"]),
            "~8.5%", f"~{pct(PAPER_PER_STEP)}", "early, then declines"]]
    for label, r in f.data.get("runs", {}).items():
        out.append([label, pct(r["never"]), pct(r["cancelled"]), pct(r["final"]), pct(r["cancelled_of_ever"]),
                    f"{pct(r['per_step_mean'])} ({pct(r['per_step_max'])})",
                    f"{r['outside_peak_step']} ({r['last_step']})" if r["outside_peak_step"] is not None else "n/a"])
    return out


def markdown(f: Finding) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return lines + ["| " + " | ".join(row) + " |" for row in table(f)] + [""]


def html_table(f: Finding) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table(f))
    return f"<table><tr>{head}</tr>{body}</table>"


def plot(f: Finding, path) -> None:
    """Left: the three parts per run (and the paper's PRIME); right: per-step share (solid) and the
    outside-final share at traced steps (dotted) along training."""
    from matplotlib.figure import Figure

    from rlsparse.report.plots import save_figure

    found = f.data["runs"]
    labels = ["paper PRIME", *found]
    parts = [PAPER_SPLIT, *found.values()]
    fig = Figure(figsize=(6.9, max(3.0, 0.3 * len(labels) + 1.6)), layout="constrained")
    left, right = fig.subplots(1, 2)
    lefts = [0.0] * len(labels)
    for key, colour in (("never", "C7"), ("cancelled", "C1"), ("final", "C0")):
        widths = [100 * p[key] for p in parts]
        left.barh(range(len(labels)), widths, left=lefts, color=colour, label=key)
        lefts = [a + b for a, b in zip(lefts, widths)]
    left.set_yticks(range(len(labels)), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlim(0, 100)
    left.set_xlabel("share of all elements (%)")
    left.set_title("Figure 2: never / cancelled / final", fontsize=8)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    for i, (label, r) in enumerate(found.items()):
        colour = f"C{i % 10}"
        right.plot([d["step"] for d in r["per_step"]], [100 * d["share"] for d in r["per_step"]], "-", color=colour,
                   label=label)
        right.plot([d["step"] for d in r["outside_final"]], [100 * d["share"] for d in r["outside_final"]], ":o",
                   ms=2, color=colour)
    right.axhline(100 * PAPER_PER_STEP, color="k", ls="--", lw=1, label="paper: ~7% per step")
    right.set_xlabel("step")
    right.set_ylabel("% of all elements")
    right.set_title("per step (solid); outside final (dotted)", fontsize=8)
    right.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    save_figure(fig, path)
