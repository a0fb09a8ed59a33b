"""Plots (matplotlib's object API, no pyplot state): written atomically as PNG."""

from __future__ import annotations

import os

import numpy as np

from rlsparse.io.atomic import atomic_path
from rlsparse.io.naming import type_sort_key


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
    """Layer x matrix-type update sparsity (the paper's Figure 3) as a PNG."""
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
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
