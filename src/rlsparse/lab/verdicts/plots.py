"""Figures for the findings the verdict modules add (Table 5, Figure 4, the scale trend); the
others are drawn by ``report._plot``. Every PNG is written atomically."""

from __future__ import annotations

from pathlib import Path

from rlsparse.io.atomic import atomic_path
from rlsparse.lab.verdicts.common import Finding


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _sparsity_vs_gain(f: Finding, figdir: Path) -> None:
    """Figure 1's verdict as a picture: sparsity against held-out gain, the matched gain marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in f.data["curves"].items():
        style = "-o" if name in f.data["rl"] else "--x" if name in f.data["sft"] else ":."
        ax.plot([100 * p["gain"] for p in pts], [100 * p["sparsity"] for p in pts], style, label=name)
    ax.axvline(100 * f.data["matched_gain"], color="k", ls=":", lw=1, label="matched gain")
    ax.set_xlabel("held-out accuracy gain on the recipe's own task (points), seed mean")
    ax.set_ylabel("sparsity at 1e-5 (%), seed mean")
    ax.legend(fontsize=7)
    _save(fig, figdir / "sparsity_vs_gain.png")


def plot(f: Finding, figdir: Path) -> bool:
    """Draw ``f``'s figure if this module owns it; True when handled (drawn, or drawn by another finding)."""
    if f.key == "grid":
        from rlsparse.lab.verdicts import grid

        if f.figure:
            grid.plot(f, figdir / f.figure)
        return True
    if f.key == "table4":
        from rlsparse.lab.verdicts import table4

        if f.figure:
            table4.plot(f, figdir / f.figure)
        return True
    if f.key == "series":
        from rlsparse.lab.verdicts import series

        if f.figure:
            series.plot(f, figdir / f.figure)
        return True
    if f.key == "figure4":
        return True  # shares conjecture_loss.png, drawn with the Conjecture 1 finding
    if f.key == "sparsity_sft_vs_rl" and f.data.get("curves"):
        _sparsity_vs_gain(f, figdir)
        return False  # the learning-rate figure is report._plot's
    if f.key not in ("table5", "scale") or f.figure is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if f.key == "table5":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, pts in f.data["curves"].items():
            axes[0].plot([p["lr"] for p in pts], [100 * p["sparsity"] for p in pts], marker="o", label=name)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("learning rate")
        axes[0].set_ylabel("sparsity at 1e-5 (%), seed mean")
        axes[0].legend(fontsize=7)
        for name, nll in f.data["nll"].items():
            pts = f.data["curves"][name]
            axes[1].scatter([nll] * len(pts), [100 * p["sparsity"] for p in pts], label=name, s=18)
        axes[1].set_xlabel("target NLL under the starting policy (nats/token)")
        axes[1].set_ylabel("sparsity at 1e-5 (%), one dot per lr")
        axes[1].legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        # Lines join only runs read the same way at the same gain (one family); others stand alone, labelled.
        families: dict = {}
        for r in f.data["rows"]:
            key = (r.get("matched_gain", f.data["matched_gain"]), r.get("source", ""))
            families.setdefault(key, []).append(r)
        for i, ((level, source), rows) in enumerate(families.items()):
            for kind, style, colour in (("rl", "-o", "C0"), ("sft", "--s", "C1")):
                have = [r for r in rows if r.get(kind) is not None]
                if not have:
                    continue
                label = f"{kind.upper()} at +{100 * level:.0f} pts" + (f" ({source.split(' (')[0]})" if source else "")
                ax.plot([r["parameters"] for r in have], [100 * r[kind] for r in have], style, color=colour,
                        alpha=1.0 if i == 0 else 0.6, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        levels = {r.get("matched_gain", f.data["matched_gain"]) for r in f.data["rows"]}
        ax.set_ylabel(f"sparsity at a matched gain of +{100 * f.data['matched_gain']:.0f} pts (%)" if len(levels) == 1
                      else "sparsity at each run's matched gain (%)")
        ax.legend(fontsize=7)
    _save(fig, figdir / f.figure)
    return True
