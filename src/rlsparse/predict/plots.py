"""Precision-recall curves of predictors (matplotlib, Agg; PNG written atomically)."""

from __future__ import annotations

import os

from rlsparse.io.atomic import atomic_path


def pr_curves(curves: dict, path: str | os.PathLike, title: str = "Predicted vs final subnetwork",
              final_density: float | None = None) -> None:
    """Recall and precision against density, one line per predictor, with the random baseline.

    Args:
        curves: ``{label: score.Curve}`` (all against the same final mask).
        path: PNG path.
        final_density: Marks the final mask's density.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, c in curves.items():
        pts = [p for p in c.points() if p["predicted"] > 0]
        d = [p["density"] for p in pts]
        ax_r.plot(d, [p["recall"] for p in pts], label=label, lw=1.4)
        ax_p.plot(d, [p["precision"] for p in pts], label=label, lw=1.4)
    if curves:
        c = next(iter(curves.values()))
        pts = [p for p in c.points() if p["predicted"] > 0]
        d = [p["density"] for p in pts]
        ax_r.plot(d, [p["random"]["recall"] for p in pts], "k--", lw=1, label="random")
        ax_p.plot(d, [p["random"]["precision"] for p in pts], "k--", lw=1, label="random")
    for ax, what in ((ax_r, "recall"), (ax_p, "precision")):
        ax.set_xscale("log")
        ax.set_xlabel("predicted density (fraction of elements)")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.02)
        if final_density:
            ax.axvline(final_density, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
