"""The grid (``lab run --grid``): per algorithm, sparsity against accuracy gain over learning rate x
steps, its Pareto frontier, and sparsity read at a matched gain and a matched KL along each frontier.

A matched learning rate or step count is not a fair match (algorithms learn at different speeds),
and one point per algorithm hides how sparsity trades against gain. The grid measures every
(learning rate, step) checkpoint; the frontier keeps those no other checkpoint of the same recipe
beats on both sparsity and gain; reading every frontier at the same gain (or KL) compares the best
each algorithm achieves. That is a best-case selection, said so in the report.
"""

from __future__ import annotations

import html
import math
import re

from rlsparse.lab.stats import GAIN_TOLERANCE
from rlsparse.lab.verdicts.common import TOL, Finding, RL_ALGORITHMS, pct, pts, train_family

TITLE = "Grid: sparsity vs accuracy gain over learning rate x steps (Pareto frontier per algorithm)"
PAPER = ("one checkpoint per algorithm, at learning rates down to 5e-7: RL 68.5-96% sparse (Table 1), SFT 6-15% "
         "(Figure 1); no sparsity-gain frontier reported")
FIGURE = "grid_frontier.png"
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def dominates(a: dict, b: dict) -> bool:
    """``a`` is at least as sparse and gains at least as much as ``b``, and is strictly better in one."""
    return (a["sparsity"] >= b["sparsity"] and a["gain"] >= b["gain"]
            and (a["sparsity"] > b["sparsity"] or a["gain"] > b["gain"]))


def pareto_frontier(points: list[dict]) -> list[dict]:
    """The non-dominated points of (sparsity, gain), both maximised, ordered by gain (then sparsity).

    Example:
        >>> pareto_frontier([{"sparsity": .9, "gain": .0}, {"sparsity": .5, "gain": .1}, {"sparsity": .4, "gain": .05}])
        [{'sparsity': 0.9, 'gain': 0.0}, {'sparsity': 0.5, 'gain': 0.1}]
    """
    kept = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(kept, key=lambda p: (p["gain"], p["sparsity"]))


def read_at(points: list[dict], key: str, level: float, value: str = "sparsity", tol: float = GAIN_TOLERANCE) -> dict:
    """``value`` where the points, ordered by ``key``, reach ``level``: linear between the two points
    that bracket it (the largest ``value`` where several share a ``key``); not read outside their range.

    Returns:
        {"level", "value" (None when out of range), "range": [lowest, highest] of ``key``, "in_range"}.
    """
    best: dict[float, float] = {}
    for p in points:
        if _finite(p.get(key)) and _finite(p.get(value)):
            best[p[key]] = max(best.get(p[key], -math.inf), p[value])
    xs = sorted(best)
    if not xs:
        return {"level": level, "value": None, "range": None, "in_range": False}
    lo, hi = xs[0], xs[-1]
    out = {"level": level, "value": None, "range": [lo, hi], "in_range": lo - tol <= level <= hi + tol}
    if not out["in_range"]:
        return out
    for x in xs:
        if abs(x - level) <= tol:
            out["value"] = best[x]
            return out
    for x0, x1 in zip(xs, xs[1:]):
        if x0 < level < x1:
            y0, y1 = best[x0], best[x1]
            out["value"] = y0 + (y1 - y0) * (level - x0) / (x1 - x0)
            return out
    return out  # pragma: no cover  (in range and not bracketed cannot happen)


def _points(results: dict, name: str) -> list[dict]:
    fam = train_family({"run": results["run"], "recipes": results["grid"]}, name)
    out = []
    for p in results["grid"][name]["points"]:
        g = p.get("accuracy_gain", {}).get(fam)
        if not _finite(g):
            continue
        out.append({"lr": p["learning_rate"], "step": p["step"], "sparsity": p["sparsity"][TOL],
                    "sparsity_0": p["sparsity"]["0"], "gain": g, "kl": p.get("probe_kl"),
                    "delta_norm": p.get("delta_norm")})
    return sorted(out, key=lambda q: (q["lr"], q["step"]))


def finding(results: dict, prereg) -> Finding:
    """The grid finding: tables, frontiers and matched readings, from ``results["grid"]``."""
    names = list(results.get("grid") or {})
    recipes = {}
    for n in names:
        r = results["grid"][n]["recipe"]
        everything = _points(results, n)
        planned = len(r["grid"]["learning_rates"]) * len(r["grid"]["checkpoints"]) if r.get("grid") else len(everything)
        recipes[n] = {"algorithm": r["algorithm"], "rl": r["algorithm"] in RL_ALGORITHMS, "points": everything,
                      "frontier": pareto_frontier(everything), "family": r.get("family", "add"),
                      "complete": results["grid"][n].get("complete", True), "planned": planned}
    gains = sorted({prereg["learned_gain"], prereg["matched_gain"]})
    at_gain = {n: {f"{g:g}": read_at(v["frontier"], "gain", g) for g in gains} for n, v in recipes.items()}
    # Matched KL: the KL the SFT recipes' frontiers need for the matched gain (as Figure 1 matches KL);
    # without an SFT frontier that reaches it, the median KL of every grid point.
    sft_kl = [read_at(v["frontier"], "gain", prereg["matched_gain"], value="kl")["value"]
              for v in recipes.values() if v["algorithm"] == "sft"]
    sft_kl = [k for k in sft_kl if _finite(k)]
    all_kl = sorted(p["kl"] for v in recipes.values() for p in v["points"] if _finite(p["kl"]))
    kl_level = (sum(sft_kl) / len(sft_kl) if sft_kl else all_kl[len(all_kl) // 2] if all_kl else None)
    kl_source = ("SFT's KL at the matched gain" if sft_kl else "the median KL of all grid checkpoints")
    at_kl = {n: read_at(v["frontier"], "kl", kl_level) for n, v in recipes.items()} if kl_level is not None else {}
    level = f"{prereg['matched_gain']:g}"
    parts = []
    for n, v in recipes.items():
        reading = at_gain[n][level]
        where = (f"{pct(reading['value'])} sparse at {pts(prereg['matched_gain'])}" if reading["value"] is not None
                 else f"matched gain out of range (frontier gains {_range(reading['range'], pts)})")
        kl = at_kl.get(n) or {}
        at = (f", {pct(kl['value'])} at KL {kl_level:.3g}" if kl.get("value") is not None else
              f", KL {kl_level:.3g} out of range ({_range(kl.get('range'), lambda x: f'{x:.3g}')})" if kl_level else "")
        unfinished = "" if v["complete"] else f" of {v['planned']} planned (the grid stopped part way)"
        parts.append(f"{n} ({v['algorithm']}, {len(v['points'])} checkpoints{unfinished}, {len(v['frontier'])} on the "
                     "frontier): "
                     f"{where}{at}")
    sentence = "; ".join(parts) + "." if parts else "No grid checkpoint was measured."
    rule = (f"Context, not a paper claim. Each recipe's frontier is the set of its (learning rate, step) checkpoints "
            f"that no other checkpoint of the same recipe beats on both sparsity at {TOL} and held-out gain; sparsity "
            "at a matched gain (the pre-registered learned and matched gains) or KL is interpolated linearly between "
            "the two frontier points that bracket the level, and not read outside the frontier's range.")
    control = ("The tables give every checkpoint at matched learning rate and step; the frontier picks each "
               "algorithm's best settings, so a difference at matched gain is a difference of best cases.")
    data = {"recipes": recipes, "gain_levels": gains, "matched_gain": prereg["matched_gain"], "at_gain": at_gain,
            "kl_level": kl_level, "kl_level_source": kl_source, "at_kl": at_kl, "tolerance": TOL}
    return Finding("grid", TITLE, PAPER, "context (not a paper claim)", sentence, data, FIGURE if recipes else None,
                   {n: results["grid"][n]["recipe"].get("seed", 0) for n in names}, rule=rule, control=control,
                   selection="best case over the grid (the Pareto frontier), read at pre-registered gain levels")


def _range(r, fmt) -> str:
    return "none" if not r else f"{fmt(r[0])} to {fmt(r[1])}"


def tables(f: Finding) -> list[tuple[str, list[str], list[list[str]]]]:
    """The grid's tables as (title, header, rows): lr x step per recipe, then the matched readings."""
    out = []
    for n, v in f.data["recipes"].items():
        steps = sorted({p["step"] for p in v["points"]})
        cell = {(p["lr"], p["step"]): p for p in v["points"]}
        frontier = {(p["lr"], p["step"]) for p in v["frontier"]}
        rows = []
        for lr in sorted({p["lr"] for p in v["points"]}):
            row = [f"{lr:g}"]
            for s in steps:
                p = cell.get((lr, s))
                row.append("" if p is None else
                           f"{'**' if (lr, s) in frontier else ''}{pct(p['sparsity'])}{'**' if (lr, s) in frontier else ''}"
                           f" (at 0: {pct(p['sparsity_0'])}), {pts(p['gain'])}, KL "
                           + ("n/a" if not _finite(p["kl"]) else f"{p['kl']:.2e}"))
            rows.append(row)
        out.append((f"{n} ({v['algorithm']}): sparsity at {f.data['tolerance']} (at 0), gain, KL(start || ft); "
                    "bold = on the frontier", ["lr \\ step"] + [str(s) for s in steps], rows))
    heads = ["recipe"] + [f"at gain {pts(g)}" for g in f.data["gain_levels"]]
    if f.data["kl_level"] is not None:
        heads.append(f"at KL {f.data['kl_level']:.3g}")

    def read(r, fmt):
        return pct(r["value"]) if r and r["value"] is not None else f"out of range ({_range(r and r['range'], fmt)})"

    rows = []
    for n in f.data["recipes"]:
        row = [n] + [read(f.data["at_gain"][n][f"{g:g}"], pts) for g in f.data["gain_levels"]]
        if f.data["kl_level"] is not None:
            row.append(read(f.data["at_kl"].get(n), lambda x: f"{x:.3g}"))
        rows.append(row)
    out.append((f"sparsity at matched levels along each frontier (matched KL = {f.data['kl_level_source']})", heads, rows))
    return out


def markdown(f: Finding) -> list[str]:
    lines = []
    for title, heads, rows in tables(f):
        lines += [f"**{title}**", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return lines


def _bold(text: str) -> str:
    return _BOLD.sub(r"<b>\1</b>", text)


def html_tables(f: Finding) -> str:
    e = html.escape
    parts = []
    for title, heads, rows in tables(f):
        parts.append(f"<p><b>{e(title)}</b></p><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{_bold(e(c))}</td>" for c in r) + "</tr>" for r in rows)
                     + "</table>")
    return "".join(parts)


def plot(f: Finding, path) -> None:
    """Sparsity against gain: every checkpoint faint, each recipe's frontier as a line (RL solid, SFT dashed)."""
    from matplotlib.figure import Figure

    from rlsparse.report.plots import save_figure

    fig = Figure(figsize=(6.9, 4.2), layout="constrained")
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, (n, v) in enumerate(f.data["recipes"].items()):
        colour, marker = f"C{i % 10}", markers[i % len(markers)]
        ax.scatter([100 * p["gain"] for p in v["points"]], [100 * p["sparsity"] for p in v["points"]], s=14,
                   color=colour, marker=marker, alpha=0.35)
        ax.plot([100 * p["gain"] for p in v["frontier"]], [100 * p["sparsity"] for p in v["frontier"]],
                "-" if v["rl"] else "--", marker=marker, color=colour, label=f"{n} ({v['algorithm']})")
    ax.axvline(100 * f.data["matched_gain"], color="k", ls=":", lw=1, label="matched gain")
    ax.set_xlabel("held-out accuracy gain on the recipe's task (points)")
    ax.set_ylabel(f"sparsity at {f.data['tolerance']} (%)")
    ax.set_title("every lr x step checkpoint (faint); Pareto frontier per recipe (RL solid, SFT dashed)", fontsize=8)
    fig.legend(loc="outside lower center", ncol=3, frameon=False, fontsize=7)
    save_figure(fig, path, dpi=90)
