"""The lab report: per finding, our figure beside the paper's number and one sentence on agreement.

``render(run_dir)`` reads ``results.json`` (and, once, Table 4's overlaps from the run's
checkpoints: ``lab.overlaps``, cached in ``table4.json``), computes the findings (``findings()``, the data
behind every figure and sentence), draws PNGs with matplotlib and writes ``report.html``,
``report.md`` and ``report.json`` atomically.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.io.atomic import atomic_path, write_text
from rlsparse.lab import overlaps, stats
from rlsparse.lab.preregistration import for_run
from rlsparse.lab.verdicts import (conjecture, figure1, figure1_grid, figure5, grid, kl_clip, precision, series, table2,
                                   table4, table5, table6)
from rlsparse.lab.verdicts import plots as verdict_plots
from rlsparse.lab.verdicts import render as verdict_text
from rlsparse.lab.verdicts.common import RL_ALGORITHMS, Finding

REPORT_SCHEMA_VERSION = 1
TOL = "1e-05"
RL = RL_ALGORITHMS  # every RL algorithm of the paper's Table 1 the lab runs
SFT = ("sft",)  # conventional SFT on data the policy did not write; RFT is compared separately


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _points(results: dict, algos) -> dict[str, list[dict]]:
    return {name: e["points"] for name, e in results["recipes"].items() if e["recipe"]["algorithm"] in algos}


def _eval_family(results: dict) -> str:
    return "jsonl" if results["run"].get("dataset") else results["run"].get("eval_family", "add")


def _seeds(results: dict, names) -> dict:
    return {n: results["recipes"][n]["recipe"]["seed"] for n in names if n in results["recipes"]}


def _chosen(results: dict, name: str) -> dict | None:
    """The run shown in per-run figures: the Conjecture 1 run if any, else chosen by the same rule."""
    if name not in results["recipes"]:
        return None
    pts = results["recipes"][name]["points"]
    conj = results.get("conjecture", {}).get(name)
    if conj:
        return next(p for p in pts if p["learning_rate"] == conj["learning_rate"])
    threshold = for_run(results["run"])["learned_gain"]
    learned = [p for p in pts if stats.at_least(p["accuracy_gain"].get(_eval_family(results)), threshold)]
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
    spread = for_run(results["run"]).values.get("figure3", {}).get("layer_spread", 0.2)
    even = all(s <= spread + 1e-12 for s in spreads.values())
    norm_sparser = all(v["norm"] is not None and v["norm"] >= v["matrices"] for v in norms.values())
    verdict = "reproduces" if even and norm_sparser else "partly reproduces" if even or norm_sparser else \
        "does not reproduce at this scale"
    sentence = ("; ".join(f"{n}: layer sparsities span {100 * spreads[n]:.1f} points, norm layers "
                          f"{_pct(norms[n]['norm'])} vs matrices {_pct(norms[n]['matrices'])} sparse" for n in spreads)
                + " (paper: all layers similarly sparse, layer norms almost never updated).")
    conj = results.get("conjecture") or {}
    selection = "; ".join(f"{n}: " + (conj[n].get("selection", "the Conjecture 1 run") if n in conj else
                                      "best case (the sparsest run that learned)") for n in spreads)
    return Finding("layers", "Figure 3: update sparsity per layer and parameter matrix",
                   "all layers similarly sparse; layer normalization receives little to no update (DPO, PRIME)",
                   verdict, sentence, {"grids": grids, "layer_spread": spreads, "norm_vs_matrices": norms},
                   "layer_matrix.png", _seeds(results, spreads),
                   rule="Reproduces when every shown run's layer sparsities span at most 20 points and its norm "
                        "layers are at least as sparse as its matrices; partly when one of the two holds.",
                   control="The norm weights sit near 1.0, where the bf16 spacing (2^-7) exceeds most updates: "
                           "see the Table 6 spacing control and the fp32 view.",
                   selection=selection)


def findings(results: dict) -> list[Finding]:
    """Every finding computed from a run's ``results.json`` data (no plotting), judged with the
    thresholds pre-registered for that run (its ``run.json`` record, else the built-in file)."""
    prereg = for_run(results["run"])
    extra = []
    if results.get("grid"):
        on_grid = grid.finding(results, prereg)
        extra = [on_grid, figure1_grid.finding(on_grid, prereg)]
    if not results.get("recipes"):
        return extra  # a --grid run: its sections only
    return extra + [figure1.finding(results, prereg), table5.finding(results, prereg), table6.finding(results, prereg),
            table2.finding(results, prereg), _layer_finding(results), table4.finding(results, prereg),
            kl_clip.finding(results, prereg),
            conjecture.finding(results, prereg), conjecture.figure4(results, prereg), figure5.finding(results, prereg),
            series.finding(results, prereg), precision.finding(results, prereg)]


# Figures are drawn at the width the HTML page shows them (620 px at 90 dpi), so that 8-9 pt text
# stays 10-11 px on screen; multi-panel figures grow downwards, never wider.
FIG_WIDTH_IN = 6.9
FIG_DPI = 90
_FONTS = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "legend.fontsize": 8, "legend.title_fontsize": 8}


def _plot(f: Finding, results: dict, figdir: Path) -> None:
    fig = _figure(f, results)
    if fig is None:
        return
    with atomic_path(figdir / f.figure, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=FIG_DPI, format="png")


def _grid(n: int, ncols: int, row_height: float, extra: float = 0.8):
    """A constrained-layout figure of ``n`` panels, ``ncols`` a row, at the report's width."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(FIG_WIDTH_IN, row_height * nrows + extra), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _legend_below(fig, ncol: int = 3, **kwargs) -> None:
    """One legend for the figure, under the panels: it never covers data."""
    fig.legend(loc="outside lower center", ncol=ncol, frameon=False, **kwargs)


def _colour(i: int, n: int):
    """Distinct colours for up to 20 lines (tab10, then tab20), a colormap beyond."""
    import matplotlib

    if n <= 10:
        return matplotlib.colormaps["tab10"](i)
    if n <= 20:
        return matplotlib.colormaps["tab20"](i)
    return matplotlib.colormaps["turbo"](i / (n - 1))


def _split_run(label: str) -> tuple[str, str]:
    name, _, lr = label.rpartition(" lr ")
    return (name, lr) if name else (label, "")


def _figure(f: Finding, results: dict):
    """The matplotlib Figure for a finding (None when it has none)."""
    import matplotlib

    if f.figure is None:
        return None
    with matplotlib.rc_context(_FONTS):
        return _draw(f, results)


def _draw(f: Finding, results: dict):
    import matplotlib
    from matplotlib.lines import Line2D

    from rlsparse.io.naming import type_sort_key

    if f.key == "sparsity_sft_vs_rl":
        fig, axes = _grid(2, 2, 3.0, extra=1.3)
        for i, (name, pts) in enumerate(f.data["curves"].items()):
            algo = results["recipes"][name]["recipe"]["algorithm"]
            style = "-" if algo in RL else "--"
            marker = "o" if f.data["in_distribution"].get(name) else "x"
            lrs = [p["lr"] for p in pts]
            color = _colour(i, len(f.data["curves"]))
            axes[0].plot(lrs, [100 * p["sparsity"] for p in pts], style, marker=marker, color=color, label=name)
            axes[1].plot(lrs, [100 * (p["gain"] or 0) for p in pts], style, marker=marker, color=color)
        for ax, ylabel in zip(axes, ("update sparsity at 1e-5 (%)", "held-out accuracy gain (points)")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
        axes[0].axhspan(68.5, 96.0, color="tab:green", alpha=0.12, label="paper RL range")
        axes[0].axhspan(6, 15, color="tab:red", alpha=0.12, label="paper SFT range")
        _legend_below(fig, ncol=3, title="RL solid, SFT dashed; o in-distribution, x not")
        return fig
    if f.key == "tolerance":
        # Small multiples: one panel per recipe, one line per learning rate (colour = learning rate,
        # the same in every panel), instead of every run on one crowded axis.
        labels = f.data["labels"]
        runs: dict[str, list[tuple[str, dict]]] = {}
        for label, s in f.data["rows"].items():
            name, lr = _split_run(label)
            runs.setdefault(name, []).append((lr, s))
        lrs = sorted({lr for rs in runs.values() for lr, _ in rs}, key=lambda x: (float(x.split()[0]) if x else 0.0, x))  # "1e-05" or "1e-05 seed 1"
        cmap = matplotlib.colormaps["viridis"]
        colour = {lr: cmap(i / max(1, len(lrs) - 1) * 0.9) for i, lr in enumerate(lrs)}
        fig, axes = _grid(len(runs), 3, 1.7, extra=0.9)
        for ax, (name, rs) in zip(axes, runs.items()):
            for lr, s in rs:
                ax.plot(range(len(labels)), [100 * s[t] for t in labels], marker="o", ms=3, color=colour[lr])
            ax.set_title(name)
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        for ax in axes[::3]:
            ax.set_ylabel("sparsity (%)")
        handles = [Line2D([], [], color=colour[lr], marker="o", ms=3, label=f"lr {lr}") for lr in lrs]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), frameon=False,
                   title="tolerance on the x axis; colour = learning rate")
        return fig
    if f.key == "rank":
        names = list(f.data["ranks"])
        fig, (ax,) = _grid(1, 1, 0.25 * len(names) + 1.2)
        ax.barh(names, [100 * f.data["ranks"][n] for n in names])
        ax.axvline(99.2, color="k", ls=":", label="paper 99.2-99.8%")
        ax.set_xlabel("mean update rank (% of full)")
        _legend_below(fig, ncol=1)
        return fig
    if f.key == "layers":
        grids = f.data["grids"]
        fig, axes = _grid(len(grids), 2, 3.0, extra=0.4)
        for ax, (name, cells) in zip(axes, grids.items()):
            inside = [k.split("|") for k in cells if k.split("|")[0] != "None"]
            layers = sorted({layer for layer, _ in inside}, key=int)
            types = sorted({t for _, t in inside}, key=type_sort_key)  # model order: q k v o gate up down norm
            grid = [[100 * cells.get(f"{layer}|{t}", float("nan")) for t in types] for layer in layers]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), layers)
            ax.set_ylabel("layer")
            ax.set_title(name)
        fig.colorbar(im, ax=axes, label="sparsity at 1e-5 (%)", shrink=0.9)
        return fig
    if f.key == "kl_clip":
        fig, (ax,) = _grid(1, 1, 3.2, extra=0.8)
        for name, v in f.data["variants"].items():
            ax.plot([c["lr"] for c in v["curve"]], [100 * c["sparsity"] for c in v["curve"]], marker="o",
                    label=f"{name} (KL {'on' if v['kl'] else 'off'}, clip {'on' if v['clip'] else 'off'})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("sparsity at 1e-5 (%)")
        _legend_below(fig, ncol=2)
        return fig
    if f.key == "conjecture":
        conj = {n: c for n, c in results["conjecture"].items() if not c.get("skipped")}
        fig, axes = _grid(len(conj), 2, 2.6, extra=0.6)
        for ax, (name, c) in zip(axes, conj.items()):
            for which, style in (("full", "-"), ("sub", "--")):
                pts = c["loss"][which]
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], style, color="C0" if which == "full" else "C1",
                        label=f"theta_{which}" if ax is axes[0] else None)
            ax.set_title(f"{name} lr {c['learning_rate']:g}")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
        _legend_below(fig, ncol=2)
        return fig
    if f.key == "dynamics":
        fig, (ax,) = _grid(1, 1, 3.4, extra=1.0)
        for i, (name, tr) in enumerate(f.data["curves"].items()):
            color = _colour(i, len(f.data["curves"]))
            ax.plot([t["step"] for t in tr], [100 * t["bf16"] for t in tr], "-o", ms=3, color=color, label=name)
            ax.plot([t["step"] for t in tr], [100 * t["fp32"] for t in tr], ":", color=color)
        ax.set_xlabel("step")
        ax.set_ylabel("sparsity (%)")
        _legend_below(fig, ncol=3, title="bf16 checkpoint solid, fp32 master weights dotted")
        return fig
    if f.key == "precision":
        fig, (ax,) = _grid(1, 1, 3.4, extra=1.2)
        for i, (name, rs) in enumerate(f.data["rows"].items()):
            color = _colour(i, len(f.data["rows"]))
            ax.plot([r["lr"] for r in rs], [100 * r["bf16"] for r in rs], "-o", ms=3, color=color, label=name)
            ax.plot([r["lr"] for r in rs], [100 * r["fp32"] for r in rs], ":x", color=color)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("sparsity (%)")
        _legend_below(fig, ncol=3, title="bf16 checkpoint solid, fp32 master weights dotted")
        return fig
    return None  # pragma: no cover


def _precision_text(run: dict) -> str:
    """How the run trained; run.json files from before the compute option say only "training"."""
    pr = run.get("precision") or {}
    if "master_weights" in pr:
        how = (f"pure {pr['master_weights']} weights" if pr["master_weights"] == "bfloat16" else
               f"{pr['master_weights']} master weights, {pr['compute']} compute")
    else:
        how = f"trained in {pr.get('training', '?')}"
    return f"{how}, checkpoints in {pr.get('checkpoint', '?')}"


# Every report points at the measured real-base results (the paper's claims are about pretrained LLMs).
REAL_BASE_NOTE = ("Measured on a real pretrained LLM (SmolLM2-135M-Instruct, `rlsparse lab run real`): "
                  "docs/lab-real.md in the rlsparse repository, with the command, date and machine of each number.")


def _markdown(results: dict, items: list[Finding]) -> str:
    run = results["run"]
    base = run.get("base_metadata") or {}
    lines = ["# rlsparse lab report", "",
             f"Base: `{run['base']}` ({base.get('num_parameters', '?')} parameters, held-out accuracy "
             f"{', '.join(f'{k} {_pct(v)}' for k, v in (base.get('test_accuracy') or {}).items()) or 'n/a'}). "
             f"Precision: {_precision_text(run)}; "
             f"sparsity compares the checkpoints as stored, at tolerance {TOL} unless stated. "
             f"Device: {run['device']}. Quick: {run['quick']}. Nothing here is tuned to match the paper.", "",
             verdict_text.preregistration_statement(results), "", REAL_BASE_NOTE, ""]
    for f in items:
        lines += [f"## {f.title}", "", f"**Verdict: {f.verdict}.** {f.sentence}", "", f"Paper: {f.paper}", "",
                  *verdict_text.finding_markdown(f), *(grid.markdown(f) if f.key == "grid" else []),
                  *(table4.markdown(f) if f.key == "table4" else []),
                  *(series.markdown(f) if f.key == "series" and f.data.get("runs") else []),
                  f"Seeds: {', '.join(f'{k}={v}' for k, v in f.seeds.items()) or 'n/a'}", ""]
        if f.figure:
            lines += [f"![{f.key}](figures/{f.figure})", ""]
    if not results["recipes"]:
        return "\n".join(lines) + "\n"  # a --grid run: its checkpoints are in the Grid tables
    heads = ["recipe", "lr", "steps", "sparsity 0", "sparsity 1e-5", "accuracy", "gain", *verdict_text.RUN_HEADERS]
    lines += ["## Runs", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    fam = _eval_family(results)
    for name, e in results["recipes"].items():
        for p in e["points"]:
            lines.append(f"| {name} | {p['learning_rate']:g} | {e['recipe']['steps']} | {_pct(p['sparsity']['0'])} | "
                         f"{_pct(p['sparsity'][TOL])} | {_pct(p['accuracy'].get(fam))} | "
                         f"{100 * p['accuracy_gain'].get(fam, float('nan')):+.1f} | "
                         + " | ".join(verdict_text.run_columns(p)) + " |")
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
             f"quick {run['quick']}. Nothing here is tuned to match the paper.</p>",
             f"<p>{e(verdict_text.preregistration_statement(results))}</p>",
             f"<p>{e(REAL_BASE_NOTE)}</p>"]
    for f in md_items:
        img = f"<img src='figures/{e(f.figure)}' alt='{e(f.key)}'>" if f.figure else ""
        parts.append(f"<div class='f'><div>{img}</div><div><h2>{e(f.title)}</h2><p class='v'>{e(f.verdict)}</p>"
                     f"<p>{e(f.sentence)}</p><p><i>Paper:</i> {e(f.paper)}</p>{verdict_text.finding_html(f)}"
                     f"{grid.html_tables(f) if f.key == 'grid' else ''}"
                     f"{table4.html_table(f) if f.key == 'table4' else ''}"
                     f"{series.html_table(f) if f.key == 'series' and f.data.get('runs') else ''}"
                     f"<p><i>Seeds:</i> {e(', '.join(f'{k}={v}' for k, v in f.seeds.items()))}</p></div></div>")
    fam = _eval_family(results)
    if not results["recipes"]:
        parts.append("</body></html>")
        return "\n".join(parts)
    parts.append("<h2>Runs</h2><table><tr><th>recipe</th><th>lr</th><th>steps</th><th>sparsity 0</th>"
                 "<th>sparsity 1e-5</th><th>accuracy</th><th>gain</th><th>rank</th>"
                 + "".join(f"<th>{e(h)}</th>" for h in verdict_text.RUN_HEADERS) + "</tr>")
    for name, en in results["recipes"].items():
        for p in en["points"]:
            parts.append(f"<tr><td>{e(name)}</td><td>{p['learning_rate']:g}</td><td>{en['recipe']['steps']}</td>"
                         f"<td>{_pct(p['sparsity']['0'])}</td><td>{_pct(p['sparsity'][TOL])}</td>"
                         f"<td>{_pct(p['accuracy'].get(fam))}</td>"
                         f"<td>{100 * p['accuracy_gain'].get(fam, float('nan')):+.1f}</td>"
                         f"<td>{_pct(p['update_rank'])}</td>"
                         + "".join(f"<td>{e(c)}</td>" for c in verdict_text.run_columns(p)) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _write(path: Path, text: str) -> None:
    write_text(path, text)


def render(run_dir: str | os.PathLike, log=None) -> tuple[Path, Path]:
    """Render ``report.html``, ``report.md``, ``report.json`` and ``figures/`` for a lab run folder.

    Table 4's rows that are not yet in ``RUN_DIR/table4.json`` are measured first from the run's
    checkpoints (``lab.overlaps``: reseeded Conjecture 1 runs, further seed pairs, the suite's declared pairs).

    Args:
        run_dir: A folder written by ``rlsparse lab run``.
        log: Progress printer for that measurement (None: quiet).

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
    from rlsparse.lab import grid as grid_run

    results["grid"] = grid_run.with_unfinished(run_dir, results)  # a grid stopped part way shows what it measured
    if results.get("recipes"):
        results["table4"] = overlaps.table4_rows(run_dir, results, log=log)
    items = findings(results)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    for f in items:
        if not verdict_plots.plot(f, figdir):
            _plot(f, results, figdir)
    _write(run_dir / "report.json", json.dumps({"schema_version": REPORT_SCHEMA_VERSION,
                                                "preregistration": for_run(results["run"]).to_json(),
                                                "findings": [asdict(f) for f in items]}, indent=1, default=float))
    md, page = run_dir / "report.md", run_dir / "report.html"
    _write(md, _markdown(results, items))
    _write(page, _html(items, results))
    return page, md
