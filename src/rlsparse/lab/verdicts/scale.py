"""The scale trend: sparsity at a matched accuracy gain against model size, RL and SFT as two
curves, from several lab run folders (tiny bases of different widths, each pretrained to the same
accuracy, and the real base when its results exist).

Each run folder contributes one point per side: the mean over its in-distribution RL recipes and
its SFT recipes (group ``sft_vs_rl``) of the sparsity where the learning-rate curve reaches the
pre-registered matched gain (Figure 1's measurement, seeds averaged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.io.atomic import write_json, write_text
from rlsparse.lab.preregistration import for_run
from rlsparse.lab.verdicts import figure1
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


def trend(run_dirs: list[str | os.PathLike]) -> Finding:
    """The scale-trend finding from lab run folders (one point per folder, sorted by size)."""
    rows, prereg = [], None
    for d in run_dirs:
        src = Path(d) / "results.json"
        if not src.is_file():
            raise CheckpointError(f"{d} has no results.json; expected folders written by `rlsparse lab run`")
        results = json.loads(src.read_text())
        prereg = prereg or for_run(results["run"])
        f = figure1.finding(results, for_run(results["run"]))
        base = (results["run"].get("base_metadata") or {})
        rows.append({"run": str(d), "parameters": _parameters(results["run"]),
                     "hidden_size": ((base.get("config") or {}).get("hidden_size")),
                     "base_accuracy": base.get("test_accuracy"),
                     "rl": f.data.get("rl_at_gain") if f.data.get("rl_at_gain") == f.data.get("rl_at_gain") else None,
                     "sft": f.data.get("sft_at_gain") if f.data.get("sft_at_gain") == f.data.get("sft_at_gain") else None,
                     "verdict": f.verdict})
    rows.sort(key=lambda r: r["parameters"] or 0)
    both = [r for r in rows if r["rl"] is not None and r["sft"] is not None]
    sentence = ("; ".join(f"{r['parameters']:,} parameters: RL {pct(r['rl'])}, SFT {pct(r['sft'])}" for r in rows
                          if r["parameters"]) or "no run had a size")
    if len(both) >= 2:
        first, last = both[0], both[-1]
        sentence += (f". From the smallest to the largest model, RL minus SFT goes from "
                     f"{100 * (first['rl'] - first['sft']):+.1f} to {100 * (last['rl'] - last['sft']):+.1f} points")
    rule = ("Context, not a paper claim: sparsity where each run's learning-rate curve reaches the matched gain "
            f"(+{100 * prereg['matched_gain']:.0f} points), RL and SFT separately, per model size.") if prereg else ""
    return Finding("scale", TITLE, PAPER, "context (not a paper claim)", sentence + ".",
                   {"rows": rows, "matched_gain": prereg["matched_gain"] if prereg else None}, "scale_trend.png",
                   rule=rule, control="Every base is pretrained to the same held-out accuracy before finetuning.")


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
             "| parameters | hidden | base accuracy | RL at matched gain | SFT at matched gain | run |", "|---|---|---|---|---|---|"]
    for r in f.data["rows"]:
        acc = ", ".join(f"{k} {pct(v)}" for k, v in (r["base_accuracy"] or {}).items())
        lines.append(f"| {r['parameters']} | {r['hidden_size']} | {acc} | {pct(r['rl'])} | {pct(r['sft'])} | {r['run']} |")
    lines += ["", f"![scale](figures/{f.figure})", ""]
    md = out / "scale.md"
    write_text(md, "\n".join(lines))
    return md
