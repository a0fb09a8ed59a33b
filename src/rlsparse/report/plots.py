"""Plots (matplotlib's object API, no pyplot state): written atomically, in the format the file name asks for."""

from __future__ import annotations

import os

import numpy as np

from rlsparse.io.atomic import atomic_path
from rlsparse.io.naming import type_sort_key


def plot_format(path: str | os.PathLike) -> str:
    """The matplotlib format for a plot path's suffix (``out.pdf`` -> ``"pdf"``).

    Raises UsageError for a suffix matplotlib cannot write, before any work is done.

    Example:
        >>> plot_format("fig.svg")
        'svg'
    """
    from matplotlib.backend_bases import FigureCanvasBase

    from rlsparse.errors import UsageError

    supported = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in supported:
        raise UsageError(f"--plot {os.fspath(path)}: cannot tell the format from {'.' + suffix if suffix else 'no suffix'}; "
                         f"expected a file name ending in one of {', '.join('.' + s for s in sorted(supported))}")
    return suffix


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically, in the format of ``path``'s suffix."""
    fmt = plot_format(path)
    with atomic_path(path, suffix="." + fmt) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)


def grid_matrix(result, label: str) -> tuple[list[int], list[str], np.ndarray]:
    """The data behind the layer x type heatmap: (layers, types, sparsity matrix with NaN gaps)."""
    grid = result.grid()
    layers = sorted({k[0] for k in grid})
    types = sorted({k[1] for k in grid}, key=type_sort_key)
    m = np.full((len(layers), len(types)), np.nan)
    for (layer, typ), agg in grid.items():
        m[layers.index(layer), types.index(typ)] = agg.sparsity(label)
    return layers, types, m


def sparsity_heatmap(result, path: str | os.PathLike, label: str) -> None:
    """Layer x matrix-type update sparsity (the paper's Figure 3), in the format of ``path``'s suffix."""
    from matplotlib.figure import Figure  # the object API: no global backend, nothing to close

    layers, types, m = grid_matrix(result, label)
    if not layers:
        from rlsparse.errors import UsageError

        raise UsageError("no tensors inside transformer blocks: nothing to plot per layer")
    fig = Figure(figsize=(1.0 + 0.7 * len(types), 1.2 + 0.28 * len(layers)))
    ax = fig.subplots()
    im = ax.imshow(100 * m, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(f"Update sparsity (%) at tolerance {label}")
    if len(layers) * len(types) <= 400:
        for i in range(len(layers)):
            for j in range(len(types)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="sparsity %")
    fig.tight_layout()
    save_figure(fig, path)
