"""Random baselines for subnetwork overlap that keep more of the structure than Appendix E's.

Appendix E's baseline draws a subnetwork uniformly at random over the whole model. But which
elements can change in a bf16 checkpoint depends strongly on their magnitude: the grid spacing
doubles with every binade, so two runs from the same base share small-magnitude elements by the
number format alone. The *magnitude-stratified* baseline draws subnetwork A at random within each
cell (tensor x bf16 exponent of the base value), keeping A's count in every cell. Its expected
intersection with B is exact, not sampled::

    E|A' ∩ B| = Σ_cells a_c * b_c / n_c

(a_c, b_c: elements of A, B in the cell; n_c: elements in the cell). The formula is symmetric,
so it is also the expectation when B is the one redrawn. The stratified o1 is ``E / |A|``, o2 is
``E / |B|``.

Example:
    >>> r = overlap(["seed0.mask.safetensors", "seed1.mask.safetensors"], base="base_model")
    >>> r.to_json()["pairs"][0]["o1_stratified"]
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rlsparse.errors import MismatchError
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.naming import strip_prefixes
from rlsparse.io.reader import TensorReader
from rlsparse.masks import Mask

CELLS = 256  # bf16 exponent field values


def exponent_cells(base: str | os.PathLike | Checkpoint, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per tensor (clean name), the bf16 exponent field (0..255) of each base value, flattened.

    A base stored in another float dtype is rounded to bf16 first (as a bf16 checkpoint would be).
    """
    ck = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    wanted = set(names) if names is not None else None
    out: dict[str, np.ndarray] = {}
    with TensorReader() as reader:
        for raw_name, info in ck.tensors.items():
            name = strip_prefixes(raw_name)[0]
            if wanted is not None and name not in wanted:
                continue
            values = dtypes.widen(reader.read(info, 0, info.numel), info.dtype).astype(np.float32)
            bits = dtypes.round_to(values, "BF16").view(np.uint32)
            out[name] = ((bits >> 23) & 0xFF).astype(np.uint8)
    return out


def stratified_intersections(masks: Sequence[Mask], base: str | os.PathLike | Checkpoint) -> np.ndarray:
    """``E[i, j]``: expected ``|I_i' ∩ I_j|`` when mask i is redrawn at random within every
    tensor x bf16-exponent cell of ``base`` (its count per cell kept); the diagonal holds ``|I_i|``.

    Raises:
        MismatchError: the base lacks a mask tensor or has another shape.
    """
    names = masks[0].names
    cells = exponent_cells(base, names)
    problems = [n for n in names if n not in cells or cells[n].size != int(np.prod(masks[0].shape(n)))]
    if problems:
        raise MismatchError(f"the base checkpoint does not match the masks: {len(problems)} tensors missing or of "
                            f"another size (e.g. {problems[:3]}); pass the base the masks were made against")
    k = len(masks)
    expected = np.zeros((k, k), dtype=np.float64)
    for name in names:
        c = cells[name]
        n_c = np.bincount(c, minlength=CELLS).astype(np.float64)
        per = np.stack([np.bincount(c[m.get(name).numpy().reshape(-1)], minlength=CELLS) for m in masks])
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(n_c > 0, per / np.where(n_c > 0, n_c, 1), 0.0)
        expected += share @ per.T.astype(np.float64)
    np.fill_diagonal(expected, [m.ones for m in masks])
    return expected


def add_stratified(doc: dict, labels: Sequence[str], expected: np.ndarray) -> None:
    """Add the stratified baseline to an overlap JSON document (its ``pairs``), in place."""
    index = {lab: i for i, lab in enumerate(labels)}
    doc["definitions"]["o1_stratified"] = ("expected o1 when a's subnetwork is redrawn at random within each "
                                           "tensor x bf16-exponent cell of the base (counts per cell kept)")
    doc["definitions"]["o2_stratified"] = "the same, over |I_b|"
    for pair in doc["pairs"]:
        i, j = index[pair["a"]], index[pair["b"]]
        e = float(expected[i, j])
        pair["intersection_stratified"] = e
        pair["o1_stratified"] = e / pair["changed_a"] if pair["changed_a"] else None
        pair["o2_stratified"] = e / pair["changed_b"] if pair["changed_b"] else None


def stratified_table(result):
    """A rich table: o1/o2 observed, against the uniform and the magnitude-stratified baselines."""
    from rich.table import Table

    t = Table(title="Overlap vs two random baselines (uniform: Appendix E; strat: within tensor x bf16 exponent)")
    for col in ("a | b", "o1 %", "o1 uniform %", "o1 strat %", "o2 %", "o2 uniform %", "o2 strat %"):
        t.add_column(col, justify="left" if col == "a | b" else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    doc = result.to_json()
    for p in doc["pairs"]:
        t.add_row(f"{p['a']} | {p['b']}", pct(p["o1"]), pct(p["o1_random"]), pct(p["o1_stratified"]), pct(p["o2"]),
                  pct(p["o2_random"]), pct(p["o2_stratified"]))
    return t
