"""The scale trend: sparsity at a matched accuracy gain against model size, RL and SFT as two
curves, from several lab run folders (tiny bases of different widths, each pretrained to the same
accuracy, and the real base when its results exist).

Each run folder contributes one point per side. A sweep run (``lab run``): the mean over its
in-distribution RL recipes and its SFT recipes (group ``sft_vs_rl``) of the sparsity where the
learning-rate curve reaches the pre-registered matched gain (Figure 1's measurement, seeds
averaged). A grid run (``lab run --grid``): the mean over its RL and its SFT grid recipes of the
sparsity where each recipe's sparsity-gain frontier over learning rate x steps reaches that gain
(``verdicts.grid``; a best case over the grid). Each run is read at its own pre-registered gain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.io.atomic import write_json, write_text
from rlsparse.lab.preregistration import for_run
from rlsparse.lab.stats import value_at_level
from rlsparse.lab.verdicts import figure1, grid
from rlsparse.lab.verdicts.common import Finding, pct

SCALE_SCHEMA_VERSION = 1
TITLE = "Scale trend: sparsity at a matched gain vs model size (RL and SFT)"
PAPER = "no scale trend reported; RL 68.5-96% sparse on 1.5B-70B models (Table 1)"


def _parameters(run: dict) -> int | None:
    meta = run.get("base_metadata") or {}
    n = meta.get("num_parameters")
    if n is None and run.get("base"):
        from rlsparse.io.checkpoint import Checkpoint

        try:
            n = sum(t.numel for t in Checkpoint.open(run["base"]).tensors.values())
        except Exception:  # noqa: BLE001 - a moved base folder leaves the size unknown, not the trend
            n = None
    return n


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _hidden(run: dict) -> int | None:
    config = _json(Path(run["base"]) / "config.json") if run.get("base") else None
    return (config or {}).get("hidden_size")


def trend(run_dirs: list[str | os.PathLike]) -> Finding:
    """The scale-trend finding from lab run folders (one point per folder, sorted by size)."""
    rows, prereg = [], None
    for d in run_dirs:
        src = Path(d) / "results.json"
        if not src.is_file():
            raise CheckpointError(f"{d} has no results.json; expected folders written by `rlsparse lab run`")
        results = json.loads(src.read_text())
        prereg = prereg or for_run(results["run"])
        base = (results["run"].get("base_metadata") or {})
        row = {"run": str(d), "parameters": _parameters(results["run"]),
               "hidden_size": ((base.get("config") or {}).get("hidden_size")) or _hidden(results["run"]),
               # a real base has no lab metadata: its accuracy is the run's own measurement
               "base_accuracy": base.get("test_accuracy") or _json(Path(d) / "base_accuracy.json"),
               "matched_gain": for_run(results["run"])["matched_gain"]}
        if results.get("grid"):
            row.update(_from_grid(results))
        else:
            f = figure1.finding(results, for_run(results["run"]))
            row.update(source="learning-rate sweep (Figure 1)", verdict=f.verdict,
                       rl=f.data.get("rl_at_gain") if f.data.get("rl_at_gain") == f.data.get("rl_at_gain") else None,
                       sft=f.data.get("sft_at_gain") if f.data.get("sft_at_gain") == f.data.get("sft_at_gain") else None)
        rows.append(row)
    rows.sort(key=lambda r: r["parameters"] or 0)
    both = [r for r in rows if r["rl"] is not None and r["sft"] is not None]
    sentence = ("; ".join(f"{r['parameters']:,} parameters: RL {pct(r['rl'])}, SFT {pct(r['sft'])}" for r in rows
                          if r["parameters"]) or "no run had a size")
    if len(both) >= 2:
        first, last = both[0], both[-1]
        sentence += (f". From the smallest to the largest model, RL minus SFT goes from "
                     f"{100 * (first['rl'] - first['sft']):+.1f} to {100 * (last['rl'] - last['sft']):+.1f} points")
    levels = sorted({r["matched_gain"] for r in rows})
    if len(levels) > 1:
        sentence += (". The runs were pre-registered at different matched gains ("
                     + ", ".join(f"+{100 * g:.0f}" for g in levels) + " points), so their levels are not one match")
    rule = ("Context, not a paper claim: sparsity where each run's learning-rate curve (sweep runs) or each "
            "recipe's sparsity-gain frontier over learning rate x steps (grid runs) reaches its pre-registered matched "
            f"gain (+{100 * prereg['matched_gain']:.0f} points for the first run), RL and SFT separately, per model "
            "size.") if prereg else ""
    return Finding("scale", TITLE, PAPER, "context (not a paper claim)", sentence + ".",
                   {"rows": rows, "matched_gain": prereg["matched_gain"] if prereg else None}, "scale_trend.png",
                   rule=rule, control="Every base is pretrained to the same held-out accuracy before finetuning.")


def _from_grid(results: dict) -> dict:
    """RL and SFT sparsity at the matched gain along each grid recipe's frontier (None where out of range)."""
    f = grid.finding(results, for_run(results["run"]))
    level = f"{f.data['matched_gain']:g}"
    readings = {n: f.data["at_gain"][n][level] for n in f.data["recipes"]}
    sides = {}
    for side, wanted in (("rl", True), ("sft", False)):
        names = [n for n, v in f.data["recipes"].items()
                 if v["rl"] == wanted and (wanted or v["algorithm"] == "sft")]
        values = [readings[n]["value"] for n in names]
        sides[side] = sum(values) / len(values) if values and None not in values else None
    # Beside the best case: at each learning rate, where the run's step curve reaches the gain.
    along = {n: {f"{lr:g}": value_at_level([(p["gain"], p["sparsity"]) for p in v["points"] if p["lr"] == lr],
                                           f.data["matched_gain"])
                 for lr in sorted({p["lr"] for p in v["points"]})} for n, v in f.data["recipes"].items()}
    return {"source": "grid frontier (best case over learning rate x steps)", "verdict": f.verdict,
            "grid": {n: {"algorithm": f.data["recipes"][n]["algorithm"], **r, "along_steps_by_lr": along[n]}
                     for n, r in readings.items()}, **sides}


def render_trend(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write ``scale.json``, ``scale.md`` and ``figures/scale_trend.png`` under ``out``; returns the Markdown path.

    Example:
        >>> render_trend(["runs/w64", "runs/w128", "runs/w256"], "runs/scale")
    """
    from dataclasses import asdict

    from rlsparse.lab.verdicts.plots import plot

    f = trend(run_dirs)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    plot(f, out / "figures")
    write_json(out / "scale.json", {"schema_version": SCALE_SCHEMA_VERSION, "finding": asdict(f)}, indent=1,
               allow_nan=True, default=float)
    lines = [f"# {f.title}", "", f"{f.sentence}", "", f"Rule: {f.rule}", "", f"Control: {f.control}", "",
             "| parameters | hidden | base accuracy | matched gain | RL at matched gain | SFT at matched gain | read from | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in f.data["rows"]:
        acc = ", ".join(f"{k} {pct(v)}" for k, v in (r["base_accuracy"] or {}).items())
        lines.append(f"| {r['parameters']} | {r['hidden_size']} | {acc} | +{100 * r['matched_gain']:.0f} pts | "
                     f"{pct(r['rl'])} | {pct(r['sft'])} | {r.get('source', '')} | {r['run']} |")
    for r in f.data["rows"]:
        for name, g in (r.get("grid") or {}).items():
            lines.append("")
            steps = ", ".join(f"lr {lr}: {pct(v) if v is not None else 'not reached'}"
                              for lr, v in (g.get("along_steps_by_lr") or {}).items())
            lines.append(f"- {r['parameters']} parameters, {name} ({g['algorithm']}): frontier "
                         + (f"{pct(g['value'])} at +{100 * g['level']:.0f} pts" if g["value"] is not None else
                            "out of range (frontier gains "
                            + (f"{100 * g['range'][0]:+.1f} to {100 * g['range'][1]:+.1f} pts)" if g["range"] else "none)"))
                         + (f"; along the steps of one run: {steps}" if steps else ""))
    lines += ["", f"![scale](figures/{f.figure})", ""]
    md = out / "scale.md"
    write_text(md, "\n".join(lines))
    return md
