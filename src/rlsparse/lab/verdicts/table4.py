"""Table 4: do subnetworks overlap across seeds, training data and algorithms? Each row is judged
against the Appendix E uniform null and the magnitude-stratified null (random within each tensor x
bf16-exponent cell): the uniform null ignores that small-magnitude weights change more easily in
bf16, and so overstates how consistent the subnetworks are.

Rows: every recipe's ``seed_overlap`` (two seeds of a sweep) and the rows of ``lab.overlaps``
(``results["table4"]``: reseeded Conjecture 1 runs, the suite's declared data and algorithm pairs).
"""

from __future__ import annotations

import html

from rlsparse.lab.verdicts.common import RL_ALGORITHMS, TOL, Finding, not_measured, pct

TITLE = "Table 4: subnetwork overlap across seeds, data and algorithms, against uniform and magnitude-stratified nulls"
PAPER = ("seed 42 vs 123: o1 60.5% / o2 60.6% (random 36.7% / 36.7%); data (Tulu vs PRIME): o1 26.7% / o2 67.1% "
         "(random 14.6% / 36.7%); seed + data + algorithm (DPO vs PRIME): o1 59.1% / o2 33.2% (random 23.0% / 12.9%) "
         "(Table 4, Appendix E; no stratified null in the paper)")
# The paper's Table 4, per factor: observed and its uniform random baseline, in the paper's order (I1, I2).
PAPER_ROWS = {"seed": {"setting": "seed 42 vs 123", "o1": 0.605, "o2": 0.606, "o1_random": 0.367, "o2_random": 0.367},
              "data": {"setting": "Tulu vs PRIME data", "o1": 0.267, "o2": 0.671, "o1_random": 0.146,
                       "o2_random": 0.367},
              "algorithm": {"setting": "DPO vs PRIME (seed, data, algorithm)", "o1": 0.591, "o2": 0.332,
                            "o1_random": 0.230, "o2_random": 0.129}}
FACTORS = tuple(PAPER_ROWS)


def rows(results: dict) -> list[dict]:
    """Every Table 4 row of a run: the seed sweeps' rows first, then ``results["table4"]``'s, in order."""
    out = []
    for name, entry in results["recipes"].items():
        for o in entry.get("seed_overlap", []):
            # the runner's rows carry no sparsities: the two cells' own, at the paper's tolerance
            seeds = o.get("seeds") or [None, None]
            cells = [next((p for p in entry["points"] if p.get("seed") == s and p["learning_rate"] == o["learning_rate"]),
                          {}) for s in seeds[:2]]
            sparsity = [c.get("sparsity", {}).get(TOL) for c in cells]
            out.append({"factor": "seed", "a": name, "b": name, "source": "seed sweep", "sparsity_a": sparsity[0],
                        "sparsity_b": sparsity[1], **o})
    return out + list((results.get("table4") or {}).get("rows", []))


def _algorithm(results: dict, name: str) -> str | None:
    entry = results["recipes"].get(name)
    return entry["recipe"]["algorithm"] if entry else None


def _excess(row: dict, null: str) -> float | None:
    """The smaller of o1 - its null and o2 - its null (a side not recorded is left out); None if unmeasured."""
    sides = [(row.get(o), row.get(f"{o}_{null}")) for o in ("o1", "o2")]
    gaps = [v - n for v, n in sides if v is not None and n is not None]
    return min(gaps) if gaps else None


def label(row: dict) -> str:
    cells = row["a"] if row["a"] == row["b"] else f"{row['a']} vs {row['b']}"
    lr = f" lr {row['learning_rate']:g}" if row.get("learning_rate") is not None else ""
    pair = row.get("seeds") or []
    if row.get("factor", "seed") == "seed":
        seeds = f" seeds {pair[0]}/{pair[1]}" if pair else ""
    else:  # a declared pair: both cells share the seed (one row per seed)
        seeds = f" seed {pair[0]}" if len(pair) == 2 and pair[0] == pair[1] and pair[0] is not None else ""
    return f"{row.get('factor', 'seed')}: {cells}{lr}{seeds}"


def finding(results: dict, prereg) -> Finding:
    margin = prereg["noise_margin"]
    rule = (f"Rows are judged where both cells are RL (SFT pairs are context). A row beats a null when o1 and o2 each "
            f"exceed that null's o1 and o2 by more than {100 * margin:.0f} points. Reproduces when every judged row "
            "beats the magnitude-stratified null and each of the paper's three settings (seed, data, algorithm) has a "
            "judged row; partly when at least one judged row beats the uniform null (Appendix E) but not all of the "
            "above holds; otherwise does not reproduce.")
    control = ("The magnitude-stratified null: subnetworks drawn at random within each tensor x bf16-exponent cell of "
               "the common start. Beating only the uniform null says the overlap could come from which weights bf16 "
               "lets move.")
    every = [dict(r) for r in rows(results)]
    for row in every:
        rl = all(_algorithm(results, n) in RL_ALGORITHMS for n in (row["a"], row["b"]))
        measured = "not_measured" not in row and row.get("o1") is not None and row.get("o1_random") is not None
        row["judged"] = rl and measured
        row["excess_uniform"], row["excess_stratified"] = _excess(row, "random"), _excess(row, "stratified")
    judged = [r for r in every if r["judged"]]
    data = {"rows": every, "paper": PAPER_ROWS, "declared": (results.get("table4") or {}).get("declared", "")}
    if not judged:
        why = "No pair of RL cells was measured (a seed sweep, a reseeded Conjecture 1 run or a declared pair)."
        missing = [f"{label(r)}: {r['not_measured']}" for r in every if r.get("not_measured")]
        found = not_measured("table4", TITLE, PAPER, why + (" " + "; ".join(missing) + "." if missing else ""),
                             rule, control)
        found.data = data
        return found
    beats = lambda r, null: r[f"excess_{null}"] is not None and r[f"excess_{null}"] > margin  # noqa: E731
    strat = [r for r in judged if beats(r, "stratified")]
    uniform = [r for r in judged if beats(r, "uniform")]
    covered = {r["factor"] for r in judged}
    if len(strat) == len(judged) and covered >= set(FACTORS):
        verdict = "reproduces"
    elif uniform:
        verdict = "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    parts = [f"{label(r)}: o1 {pct(r['o1'])} / o2 {pct(r.get('o2'))} (uniform {pct(r['o1_random'])} / "
             f"{pct(r.get('o2_random'))}, stratified {pct(r.get('o1_stratified'))} / {pct(r.get('o2_stratified'))})"
             for r in judged]
    sentence = (f"{len(strat)}/{len(judged)} judged rows beat the stratified null and {len(uniform)}/{len(judged)} the "
                f"uniform one by more than {100 * margin:.0f} points. " + "; ".join(parts) + ".")
    absent = [f for f in FACTORS if f not in covered]
    if absent:
        sentence += f" Not measured here: {', '.join(absent)}."
    return Finding("table4", TITLE, PAPER, verdict, sentence, data, "table4_overlap.png",
                   {label(r): r.get("seeds") for r in judged}, rule, control)


HEADERS = ["setting", "cells (I1 vs I2)", "source", "sparsity I1 / I2", "o1 / o2", "uniform null o1 / o2",
           "stratified null o1 / o2", "judged"]


def table(f: Finding) -> list[list[str]]:
    """Our rows and, first in each setting, the paper's row (as the report shows them)."""
    out = []
    by_factor: dict[str, list[dict]] = {}
    for r in f.data.get("rows", []):
        by_factor.setdefault(r.get("factor", "seed"), []).append(r)
    for factor in FACTORS:
        p = f.data.get("paper", PAPER_ROWS)[factor]
        out.append([factor, f"paper: {p['setting']}", "paper (Table 4)", "", f"{pct(p['o1'])} / {pct(p['o2'])}",
                    f"{pct(p['o1_random'])} / {pct(p['o2_random'])}", "n/a", ""])
        for r in by_factor.get(factor, []):
            cells = label(r).split(": ", 1)[1]
            if r.get("not_measured"):
                out.append([factor, cells, r.get("source", ""), "", "not measured: " + r["not_measured"], "", "", ""])
                continue
            sa, sb = r.get("sparsity_a"), r.get("sparsity_b")
            out.append([factor, cells, r.get("source", ""), f"{pct(sa)} / {pct(sb)}",
                        f"{pct(r.get('o1'))} / {pct(r.get('o2'))}",
                        f"{pct(r.get('o1_random'))} / {pct(r.get('o2_random'))}",
                        f"{pct(r.get('o1_stratified'))} / {pct(r.get('o2_stratified'))}",
                        "yes" if r.get("judged") else "no (not RL)"])
    return out


def markdown(f: Finding) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table(f)]
    if f.data.get("declared"):
        lines += ["", f"Pairs: {f.data['declared']}"]
    return lines + [""]


def html_table(f: Finding) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table(f))
    declared = f"<p><i>Pairs:</i> {e(f.data['declared'])}</p>" if f.data.get("declared") else ""
    return f"<table><tr>{head}</tr>{body}</table>{declared}"


def plot(f: Finding, path) -> None:
    """Per measured row, o1 and o2 beside their uniform and stratified nulls (the paper's rows for scale)."""
    from matplotlib.figure import Figure

    from rlsparse.report.plots import save_figure

    measured = [r for r in f.data["rows"] if not r.get("not_measured") and r.get("o1") is not None]
    paper = [{"label": f"paper {k}: {p['setting']}", "o1": p["o1"], "o2": p["o2"], "o1_random": p["o1_random"],
              "o2_random": p["o2_random"]} for k, p in f.data.get("paper", PAPER_ROWS).items()]
    bars = [{**r, "label": label(r) + ("" if r.get("judged") else " (context)")} for r in measured] + paper
    fig = Figure(figsize=(6.9, 0.55 * len(bars) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    height = 0.2
    for k, (key, name, colour) in enumerate((("", "observed", "C0"), ("_stratified", "stratified null", "C2"),
                                            ("_random", "uniform null (Appendix E)", "C7"))):
        for side, hatch in (("o1", None), ("o2", "//")):
            ys = [i + (2 * k + (side == "o2")) * height / 2 - 0.3 for i in range(len(bars))]
            xs = [100 * (b.get(side + key) or 0) for b in bars]
            ax.barh(ys, xs, height=height / 2, color=colour, hatch=hatch, edgecolor="white",
                    label=name if side == "o1" else None)
    ax.set_yticks(range(len(bars)), [b["label"] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("overlap (%): o1 solid, o2 hatched")
    fig.legend(fontsize=7, loc="outside lower center", ncol=3)
    save_figure(fig, path)
