"""Figures for the analyses (matplotlib without pyplot: no global state), written atomically in
the format of the path's suffix (PNG, PDF, SVG...). The numbers drawn are the results' own properties, tested there."""

from __future__ import annotations

import os

import numpy as np

from rlsparse.report.plots import save_figure


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _save(fig, path: str | os.PathLike) -> None:
    save_figure(fig, path)


def _pct(x) -> float:
    return float("nan") if x is None else 100.0 * x


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def overlap_plot(result, path: str | os.PathLike) -> None:
    """Two masks: o1 / o2 per matrix type against the random baselines (Table 4 per type).
    More: the k x k matrix of one-sided overlaps (row i covered by column j)."""
    if len(result.labels) == 2:
        pair = result.pairs[0]
        types = list(pair.by_type)
        x = np.arange(len(types) + 1)
        stats = [pair.total] + [pair.by_type[t] for t in types]
        fig = _figure(1.5 + 0.8 * len(x), 4)
        ax = fig.add_subplot()
        w = 0.2
        for off, key, label, hatch in ((-1.5, "o1", "o1", None), (-0.5, "o1_random", "o1 random", "//"),
                                       (0.5, "o2", "o2", None), (1.5, "o2_random", "o2 random", "//")):
            ax.bar(x + off * w, [_pct(getattr(s, key)) for s in stats], w, label=label, hatch=hatch)
        ax.set_xticks(x, ["all"] + types, rotation=45, ha="right")
        ax.set_ylabel("overlap %")
        ax.set_ylim(0, 100)
        ax.set_title(f"Subnetwork overlap: a={_short(pair.a)}, b={_short(pair.b)}", fontsize=9)
        ax.legend(fontsize=8)
    else:
        m = result.matrix()
        k = len(result.labels)
        fig = _figure(2.5 + 0.9 * k, 2 + 0.8 * k)
        ax = fig.add_subplot()
        im = ax.imshow(100 * m, cmap="viridis", vmin=0, vmax=100)
        names = [_short(lab, 20) for lab in result.labels]
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{100 * m[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] < 0.6 else "black")
        ax.set_title("% of row's subnetwork covered by column's")
        fig.colorbar(im, ax=ax, label="overlap %")
    _save(fig, path)


def series_plot(result, path: str | os.PathLike) -> None:
    """Four panels: sparsity vs base (Fig. 5 / 7a), between consecutive checkpoints (Fig. 7b),
    updated weights outside the final subnetwork (Fig. 6), and the three-way split (Fig. 2)."""
    steps = result.steps
    x = steps if all(s is not None for s in steps) else list(range(1, len(steps) + 1))
    xlabel = "step" if x is steps else "checkpoint"
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    a = axes[0][0]
    a.plot(x, [100 * s for s in result.sparsity], marker="o")
    a.set_title("Update sparsity vs base (%)")
    a.set_xlabel(xlabel)
    b = axes[0][1]
    b.plot(x[1:], [100 * s for s in result.consecutive_sparsity], marker="o", color="tab:orange")
    b.set_title("Sparsity between consecutive checkpoints (%)")
    b.set_xlabel(xlabel)
    c = axes[1][0]
    c.plot(x, [100 * f for f in result.outside_final_fraction], marker="o", color="tab:red")
    c.set_title("Updated but outside the final subnetwork (% of params)")
    c.set_xlabel(xlabel)
    d = axes[1][1]
    parts = [("never updated", result.never_updated, "tab:gray"), ("cancelled", result.cancelled, "tab:orange"),
             ("final subnetwork", result.final_subnetwork, "tab:blue")]
    left = 0.0
    for label, frac, color in parts:
        d.barh([0], [100 * frac], height=0.5, left=[left], color=color, label=f"{label} {100 * frac:.1f}%")
        left += 100 * frac
    d.set_xlim(0, 100)
    d.set_ylim(-0.5, 1.2)
    d.set_yticks([])
    d.set_title("Every parameter, over the whole run (%)")
    d.legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle(f"tolerance {result.tolerance:g}", fontsize=9)
    _save(fig, path)


def _by_type_bars(groups: dict[str, dict], series: list[tuple[str, str]], ylabel: str, title: str, path) -> None:
    types = list(groups)
    x = np.arange(len(types))
    fig = _figure(2 + 0.8 * len(types), 4)
    ax = fig.add_subplot()
    w = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        vals = [groups[t][key] for t in types]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [np.nan if v is None else v for v in vals], w, label=label)
    ax.set_xticks(x, types, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def rank_plot(result, path: str | os.PathLike) -> None:
    """Mean rank and effective rank per matrix type, as % of the maximum rank (Table 2 per type)."""
    _by_type_bars(result.by_type(), [("rank_pct", "numerical rank"), ("effective_rank_pct", "effective rank")],
                  "% of max rank", f"Update rank by matrix type (mean {result.mean_rank_pct:.1f}%)", path)


def spectral_plot(result, path: str | os.PathLike) -> None:
    """Per matrix type: top-k subspace rotation (degrees) and energy outside the top-k block (%)."""
    groups = {t: {**g, "energy_outside_pct": None if g["energy_outside"] is None else 100 * g["energy_outside"]}
              for t, g in result.by_type().items()}
    _by_type_bars(groups, [("left_angle_max", "left max angle (deg)"), ("right_angle_max", "right max angle (deg)"),
                           ("energy_outside_pct", "energy outside top-k (%)")],
                  "degrees / %", f"Spectral change, top {result.top_k}", path)


def precision_plot(result, path: str | os.PathLike) -> None:
    """Changed elements by ULP distance, and the share of elements where each tolerance is below the grid."""
    t = result.total
    fig = _figure(9, 3.8)
    left, right = fig.subplots(1, 2)
    counts = [t.ulp1, t.ulp2, t.ulp3_plus]
    left.bar(["1 ULP", "2 ULP", "3+ ULP"], [100 * c / t.changed if t.changed else 0 for c in counts])
    left.set_ylabel("% of changed elements")
    left.set_title(f"Update size in ULPs ({t.changed:,} changed)", fontsize=9)
    right.plot(result.tolerances, [100 * t.spacing_above[lab] / max(t.numel, 1) for lab in result.labels], marker="o")
    right.set_xscale("log")
    right.set_xlabel("tolerance")
    right.set_ylabel("% of elements with spacing > tolerance")
    right.set_title("Where the tolerance cannot matter", fontsize=9)
    _save(fig, path)
